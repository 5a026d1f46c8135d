"""Logging set-up from `KTULHU_LOG` (`level[,logger=level...]`) in text or JSON lines, request ids,
and the access log (`ktulhu.access`).

User text never goes to INFO: modules log ids, sizes and timings at INFO and keep message content
for DEBUG of their own logger.

The access log has one INFO line per HTTP request and one per `/ws` prompt. An HTTP line is written
when the response's last byte was handed to the server (for a stream: when the stream ended) or, when
that never happened (the client left, the response failed), when the request's handling ended with
`complete` false. Its `duration_ms` runs from the moment the app received the request until then.
A prompt's line is written when its `done` frame went to the socket; its `duration_ms` runs from the
prompt frame's arrival. Neither carries message text, query strings or credentials; HTTP lines name the
route (`/chat-thread/<chat_id>`), not the path, since ids in paths are capabilities for anonymous chats.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs


__all__ = ["ACCESS", "AccessLog", "HttpExchange", "PromptAccessLog", "configure_logging", "exchange_of",
           "request_id_from"]

#: The access log's logger (`KTULHU_LOG=info,ktulhu.access=warning` silences it).
ACCESS = logging.getLogger("ktulhu.access")
#: A client's `X-Request-ID` is kept only when it matches this; otherwise a fresh one replaces it.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: Where `AccessLog` keeps the request's `HttpExchange` in the ASGI scope.
_SCOPE_KEY = "ktulhu.access"
#: Recorded on a request that matched no route (the same label as `/metrics`).
UNMATCHED = "<unmatched>"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Send], Awaitable[None]]

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
# Chatty third-party loggers are quieter than ours unless named explicitly.
_QUIET = {"hypercorn.access": logging.WARNING, "httpx": logging.WARNING, "httpcore": logging.WARNING}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and `extra` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD:
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(spec: str, fmt: str = "text") -> None:
    """Apply a parsed `KTULHU_LOG` spec (already validated by settings) to the root logger."""
    root_level = logging.INFO
    per_logger: dict[str, int] = dict(_QUIET)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            name, level = part.split("=", 1)
            per_logger[name.strip()] = _LEVELS[level.strip()]
        else:
            root_level = _LEVELS[part]
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    for name, level in per_logger.items():
        logging.getLogger(name).setLevel(level)


# --- request ids -------------------------------------------------------------------------------


def request_id_from(value: str | None) -> str:
    """The client's request id when it is safe to echo and log (1-128 of `A-Za-z0-9._:-`), else a new one."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# --- HTTP access log ---------------------------------------------------------------------------


@attrs.define(eq=False)
class HttpExchange:
    """One request's access-log state, kept in its ASGI scope so the app can read the id and name the route."""

    request_id: str
    started: float = attrs.field(factory=time.perf_counter)
    route: str = UNMATCHED
    status: int | None = None
    logged: bool = False
    #: The `RequestMetrics` of a generation this request started (its tokens go on the line).
    generation: Any = None


def note_generation(scope: Scope, metrics: Any) -> None:
    """Have the request's access line report the prompt and generated tokens of `metrics` (read when it is
    written), and `metrics` count the request's overhead from its arrival."""
    exchange = exchange_of(scope)
    if exchange is not None:
        exchange.generation = metrics
        metrics.arrived = exchange.started  # the request overhead metric starts here


def exchange_of(scope: Scope) -> HttpExchange | None:
    """The request's `HttpExchange` (None outside `AccessLog`, e.g. an app used without it)."""
    exchange = scope.get(_SCOPE_KEY)
    return exchange if isinstance(exchange, HttpExchange) else None


class AccessLog:
    """ASGI middleware: gives every HTTP request and WebSocket handshake a request id (echoed as
    `X-Request-ID`) and writes one access line per HTTP request when its response ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        exchange = HttpExchange(request_id_from(_header(scope, b"x-request-id")))
        scope[_SCOPE_KEY] = exchange
        if scope["type"] == "websocket":  # its prompts are logged by `PromptAccessLog`
            await self.app(scope, receive, _with_request_id(send, exchange))
            return
        try:
            await self.app(scope, receive, self._observed(scope, send, exchange))
        finally:
            if not exchange.logged:
                _log_http(scope, exchange, complete=False)

    def _observed(self, scope: Scope, send: Send, exchange: HttpExchange) -> Send:
        send = _with_request_id(send, exchange)

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            if message["type"] != "http.response.body" or message.get("more_body", False):
                await send(message)
                return
            try:
                await send(message)
            finally:
                # The last part was handed over: the response is complete even when this send is
                # cancelled (hypercorn closes the stream within it, which cancels the app).
                _log_http(scope, exchange, complete=True)

        return observed


def _with_request_id(send: Send, exchange: HttpExchange) -> Send:
    """`send` that puts the request id on the response head (replacing one the app set)."""
    value = exchange.request_id.encode()
    heads = ("http.response.start", "websocket.accept", "websocket.http.response.start")

    async def sending(message: Message) -> None:
        if message["type"] in heads:
            headers = [(k, v) for k, v in message.get("headers") or () if k.lower() != b"x-request-id"]
            message = {**message, "headers": [*headers, (b"x-request-id", value)]}
        await send(message)

    return sending


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


def _log_http(scope: Scope, exchange: HttpExchange, *, complete: bool) -> None:
    exchange.logged = True
    duration_ms = round((time.perf_counter() - exchange.started) * 1000, 1)
    fields = {"method": scope.get("method", "-"), "route": exchange.route, "status": exchange.status,
              "duration_ms": duration_ms, "request_id": exchange.request_id, "client": _client(scope),
              "complete": complete, "prompt_tokens": None, "tokens": None}
    tokens = ""
    if exchange.generation is not None:
        fields["prompt_tokens"] = exchange.generation.prompt_tokens
        fields["tokens"] = exchange.generation.generated_tokens
        tokens = f" prompt_tokens={fields['prompt_tokens']} tokens={fields['tokens']}"
    ACCESS.info("%s %s %s %.1fms request_id=%s client=%s%s%s", fields["method"], exchange.route,
                exchange.status or "-", duration_ms, exchange.request_id, fields["client"], tokens,
                "" if complete else " incomplete", extra=fields)


# --- /ws prompts -------------------------------------------------------------------------------


#: Prompts of one socket awaiting their `done`; beyond this the oldest is forgotten (its line has no duration).
MAX_PENDING_PROMPTS = 256


class PromptAccessLog:
    """One `/ws` socket's access lines: one per prompt, from its frame's arrival to its `done` frame
    reaching the socket. It sees ids and counts, never text; prompts still running when the socket
    ends are logged by `end()` with outcome `disconnected`."""

    def __init__(self, client: str) -> None:
        self._client = client
        self._pending: dict[str, tuple[float, str]] = {}

    def started(self, request_id: str, chat_id: str) -> None:
        if request_id in self._pending:  # a duplicate id: the running prompt keeps its start
            return
        if len(self._pending) >= MAX_PENDING_PROMPTS:
            del self._pending[next(iter(self._pending))]
        self._pending[request_id] = (time.perf_counter(), chat_id)

    def sent(self, frame: dict[str, Any]) -> None:
        """Called with every frame written to the socket; a `done` frame ends its prompt's line."""
        if frame.get("done") is not True:
            return
        request_id = str(frame.get("request_id", ""))
        started, _ = self._pending.pop(request_id, (None, ""))
        usage = frame.get("usage")
        tokens = usage.get("generated_tokens") if isinstance(usage, dict) else None
        self._log(request_id, str(frame.get("chat_id", "")), str(frame.get("reason", "")), started, tokens)

    def end(self) -> None:
        """Log the prompts that never got their `done` (the socket went away)."""
        for request_id, (started, chat_id) in self._pending.items():
            self._log(request_id, chat_id, "disconnected", started, None)
        self._pending.clear()

    def _log(self, request_id: str, chat_id: str, outcome: str, started: float | None, tokens: Any) -> None:
        duration_ms = None if started is None else round((time.perf_counter() - started) * 1000, 1)
        fields = {"route": "/ws", "request_id": request_id, "chat_id": chat_id, "outcome": outcome,
                  "duration_ms": duration_ms, "tokens": tokens if isinstance(tokens, int) else None,
                  "client": self._client}
        ACCESS.info("WS /ws prompt %s %s request_id=%s chat_id=%s tokens=%s client=%s", outcome,
                    "-" if duration_ms is None else f"{duration_ms:.1f}ms", request_id, chat_id or "-",
                    "-" if fields["tokens"] is None else fields["tokens"], self._client, extra=fields)
