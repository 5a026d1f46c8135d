"""The `/ws` wire format: client frames of both dialects in, server frames out.

Two clients speak to `/ws` (original §3.2 and the web client's contract):

- the original's: `{"msg_type": "register"|"prompt"|"cancel", "request_id", "chat_id", "session_id",
  "device_hash", "text", "language"?, "attachments"?}`;
- the deployed web client's: `{"type": "register", ...}`, a prompt with no type
  (`{"id", "text", ...}` whose `text` is itself a JSON-encoded `{"text": ...}` object, unwrapped here),
  and `{"type": "cancel", "id"}`.

Missing optional fields get defaults; a frame that cannot be understood raises `FrameError` naming
the problem (the session answers with an `error` frame, plus `done` when it was a prompt).
Server frames keep the original's shapes and add `request_id` and `chat_id` to every prompt frame.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import attrs
import orjson

from ..settings import Settings
from ..store.keys import is_valid_id
from ..store.records import Message, MessageAttachment
from .attachments import parse_attachments

__all__ = [
    "Cancel", "FrameError", "Ping", "PromptFrame", "Register", "ServerFrame", "cancel_ack", "chat_created",
    "classifier_debug", "done", "error", "parse_frame", "pong", "registered", "summary", "summary_push", "token",
    "vision_summary",
]

#: Longest free-text identity field (session id, language).
MAX_SHORT_TEXT = 128


class FrameError(Exception):
    """A client frame that cannot be processed. `prompt` is True when it was a prompt (needs `done`)."""

    def __init__(self, code: str, detail: str, *, request_id: str = "", chat_id: str = "",
                 prompt: bool = False) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.chat_id = chat_id
        self.prompt = prompt


@attrs.frozen
class Register:
    chat_id: str
    session_id: str
    device_hash: str
    #: An app JWT (or API key) carried in the frame: signs the socket in.
    token: str | None = None


@attrs.frozen
class PromptFrame:
    request_id: str
    chat_id: str
    session_id: str
    device_hash: str
    text: str
    language: str | None = None
    attachments: tuple[MessageAttachment, ...] = ()
    #: The model the client names (the web client wraps `"model": "mistral-7b-lora"` in `text`); a
    #: configured KTULHU_MODELS name picks it, anything else is the default model.
    model: str | None = None
    #: When the frame was read (time.perf_counter): where the request overhead metric starts.
    received: float = attrs.field(factory=time.perf_counter, eq=False)


@attrs.frozen
class Cancel:
    #: "" cancels every prompt of the session.
    request_id: str


@attrs.frozen
class Ping:
    """`{"type": "ping"}`: answered with `{"type": "pong"}` (a JSON-level keep-alive some clients send)."""


Frame = Register | PromptFrame | Cancel | Ping


def parse_frame(raw: str | bytes, settings: Settings) -> Frame:
    """Decode one text frame. Raises `FrameError` (code `invalid_frame`, `too_large`, ...)."""
    oversized = len(raw) > settings.ws_max_frame
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        if oversized:
            raise FrameError("too_large", f"frame larger than {settings.ws_max_frame} bytes") from None
        raise FrameError("invalid_frame", "Invalid JSON: a frame must be one JSON object") from None
    if not isinstance(data, dict):
        raise FrameError("invalid_frame", "Invalid JSON: a frame must be one JSON object")
    kind, fields = _kind(data)
    if kind == "ping":
        return Ping()
    if kind == "cancel":
        return Cancel(_id(fields, "request_id", allow_empty=True))
    if kind == "register":
        token = fields.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > 8192):
            raise FrameError("invalid_frame", "`token` must be a string (an app JWT or API key)")
        return Register(_id(fields, "chat_id", allow_empty=True), _short(fields, "session_id"),
                        _id(fields, "device_hash", allow_empty=True), token or None)
    # a prompt: from here on every error needs a `done`, which names the prompt and its chat
    request_id = _request_id(fields)
    chat_id = fields.get("chat_id") if is_valid_id(fields.get("chat_id")) else ""
    try:
        chat_id = _id(fields, "chat_id", allow_empty=True)
        session_id = _short(fields, "session_id")
        device_hash = _id(fields, "device_hash", allow_empty=True)
        if oversized:
            raise FrameError("too_large", f"frame larger than {settings.ws_max_frame} bytes "
                                          "(KTULHU_WS_MAX_FRAME)")
        text = fields.get("text")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise FrameError("invalid_frame", "`text` must be a string")
        model = fields.get("model")
        if kind == "web_prompt":
            model = model or _wrapped_model(text)
            text = unwrap_web_text(text)
        if not isinstance(model, str) or len(model) > MAX_SHORT_TEXT:
            model = None  # a name no model has: the default model answers
        if len(text) > settings.max_prompt_chars:
            raise FrameError("too_large", f"the message is longer than {settings.max_prompt_chars} characters")
        language = fields.get("language")
        if language is not None and (not isinstance(language, str) or len(language) > MAX_SHORT_TEXT):
            raise FrameError("invalid_frame", "`language` must be a short string such as \"en\"")
        attachments = parse_attachments(fields.get("attachments"), settings)
        if not text.strip() and not attachments:
            raise FrameError("empty_prompt", "the message is empty")
    except FrameError as exc:
        exc.request_id, exc.chat_id, exc.prompt = request_id, chat_id, True
        raise
    return PromptFrame(request_id, chat_id, session_id, device_hash, text, language or None, attachments,
                       model or None)


def _kind(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if "msg_type" in data:
        kind = data["msg_type"]
        if kind not in ("register", "prompt", "cancel"):
            raise FrameError("invalid_frame", "`msg_type` must be register, prompt or cancel")
        return kind, data
    kind = data.get("type")
    if kind is None or kind == "prompt":
        fields = dict(data)
        fields.setdefault("request_id", data.get("id", ""))
        return "web_prompt", fields
    if kind in ("register", "ping"):
        return kind, data
    if kind == "cancel":
        return "cancel", {"request_id": data.get("request_id", data.get("id", ""))}
    raise FrameError("invalid_frame", f"unknown frame type {str(kind)[:40]!r}: use register, prompt or cancel")


def unwrap_web_text(text: str) -> str:
    """The web client wraps the typed text: `{"role": "user", "text": <typed>, ...}` as a string.

    Anything that is not such an object is the prompt as is."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return text
    try:
        inner = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return text
    if isinstance(inner, dict) and isinstance(inner.get("text"), str):
        return inner["text"]
    return text


def _wrapped_model(text: str) -> str | None:
    """The `model` the web client puts in its wrapped text, if any."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        inner = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None
    model = inner.get("model") if isinstance(inner, dict) else None
    return model if isinstance(model, str) else None


def _id(fields: dict[str, Any], name: str, *, allow_empty: bool) -> str:
    value = fields.get(name)
    if value is None or (value == "" and allow_empty):
        return ""
    if not is_valid_id(value):
        raise FrameError("invalid_frame", f"`{name}` must be 1-128 characters from A-Z a-z 0-9 _ -")
    return value


def _request_id(fields: dict[str, Any]) -> str:
    """The prompt's id: the client's when it is a safe id, otherwise a fresh one (the reply says which)."""
    value = fields.get("request_id")
    return value if is_valid_id(value) else str(uuid.uuid4())


def _short(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_SHORT_TEXT or any(ord(c) < 32 for c in value):
        raise FrameError("invalid_frame", f"`{name}` must be a string of at most {MAX_SHORT_TEXT} characters")
    return value


# --- server frames -----------------------------------------------------------------------------


# Every frame the server sends on `/ws` (original §3.3, plus `request_id` and `chat_id` on each
# prompt frame) and on `/chat-summary/ws` is built here.
ServerFrame = dict[str, Any]


def registered(frame: Register, history: list[dict[str, Any]], user_id: str | None) -> ServerFrame:
    """The answer to `register`: the chat's recent history (`history_entry` shapes) and who signed in."""
    reply: ServerFrame = {"type": "system", "event": "registered", "session_id": frame.session_id,
                          "chat_id": frame.chat_id, "device_hash": frame.device_hash, "history": history}
    if user_id is not None:
        reply["user_id"] = user_id
    return reply


def cancel_ack(cancelled: list[str], request_id: str) -> ServerFrame:
    """The prompts a `cancel` stopped (none, one, or all of the socket's when it named none)."""
    ack: ServerFrame = {"type": "system", "event": "cancel_ack", "cancelled": cancelled}
    if request_id:
        ack["request_id"] = request_id
    return ack


def pong() -> ServerFrame:
    return {"type": "pong"}


def classifier_debug(request_id: str, chat_id: str, intent_result: dict[str, Any]) -> ServerFrame:
    """The intent router's decision for a prompt, before its reply."""
    return {"type": "classifier_debug", "intent_result": intent_result, "request_id": request_id, "chat_id": chat_id}


def chat_created(request_id: str, chat_id: str) -> ServerFrame:
    """The prompt named no chat (or one it may not use) and the server made `chat_id` for it."""
    return {"type": "system", "event": "chat_created", "request_id": request_id, "chat_id": chat_id}


def vision_summary(request_id: str, chat_id: str, notes: list[str]) -> ServerFrame:
    """What the server noted of the prompt's attachments (the text the model is given about them)."""
    return {"type": "vision_summary", "summary": "\n".join(notes), "request_id": request_id, "chat_id": chat_id}


def token(request_id: str, chat_id: str, piece: str) -> ServerFrame:
    """One streamed piece of a reply."""
    return {"type": "assistant", "token": piece, "request_id": request_id, "chat_id": chat_id}


def error(code: str, detail: str, *, request_id: str = "", chat_id: str = "") -> ServerFrame:
    """`message` keeps the original's machine-readable value (e.g. `server_busy`); `detail` says why."""
    frame: ServerFrame = {"type": "error", "message": code, "detail": detail}
    if request_id:
        frame["request_id"] = request_id
    if chat_id:
        frame["chat_id"] = chat_id
    return frame


def done(request_id: str, chat_id: str, reason: str, usage: dict[str, int] | None = None) -> ServerFrame:
    """The one frame that ends every prompt; `usage` (token counts) when the model ran."""
    frame: ServerFrame = {"type": "assistant", "done": True, "request_id": request_id, "chat_id": chat_id,
                          "reason": reason}
    if usage is not None:
        frame["usage"] = usage
    return frame


def summary(message: Message, request_id: str = "") -> ServerFrame:
    """A new chat title on `/ws` (original §3.3), plus the `request_id` of the exchange it followed."""
    frame: ServerFrame = {"type": "summary", "chat_id": message.chat_id, "message_id": message.id,
                          "role": "summary", "text": message.text, "ts": message.ts, "language": message.language}
    if request_id:
        frame["request_id"] = request_id
    return frame


def summary_push(message: Message) -> ServerFrame:
    """A new chat title on `/chat-summary/ws` (the web client's contract)."""
    return {"chat_id": message.chat_id, "summary": message.text, "ts": message.ts}
