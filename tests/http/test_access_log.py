"""The access log (`ktulhu.access`): one line per HTTP request, written when the response ends
(streams too), naming route, status, request id and client, in text and as JSON keys, and never
the message text, the query string or the credentials of the request."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from quart import Response
from quart_trio import QuartTrio

from ktulhu.app_state import RUNTIME_KEY
from ktulhu.auth.tokens import issue_token
from ktulhu.logs import MAX_PENDING_PROMPTS, JsonLineFormatter, PromptAccessLog
from ktulhu.store import Store
from ktulhu.store.records import User, now_ms

SECRET_TEXT = "zebra-violet-secret-prompt"
QUERY_SECRET = "query-secret-value"
FIELDS = {"method", "route", "status", "duration_ms", "request_id", "client", "complete"}


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ktulhu.access"]


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as the text and the JSON formats would write it."""
    text = logging.Formatter("%(name)s %(message)s")
    return "\n".join(text.format(r) + "\n" + JsonLineFormatter().format(r) for r in caplog.records)


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="ktulhu.access")
    return caplog


@pytest.fixture
def app_with_store(app: QuartTrio, tmp_path: Path) -> Iterator[QuartTrio]:
    """The in-process app with a real store (no model): sign-in and quota work, generation answers 503."""
    runtime = app.extensions[RUNTIME_KEY]
    store = Store.open(tmp_path / "chatdb")
    try:
        with runtime.opened_store.providing(store):
            yield app
    finally:
        store.close()


async def test_one_line_per_request_with_the_route_not_the_path(app_with_store, access_log) -> None:
    chat_id = str(uuid.uuid4())  # an anonymous chat's id is its capability: never logged
    response = await app_with_store.test_client().get(f"/chat-thread/{chat_id}?token={QUERY_SECRET}",
                                           headers={"X-Request-ID": "rid-1"})
    [record] = _access(access_log)
    assert FIELDS <= set(vars(record))
    assert (record.method, record.route, record.status, record.request_id, record.complete) == \
        ("GET", "/chat-thread/<chat_id>", response.status_code, "rid-1", True)
    assert isinstance(record.duration_ms, float) and record.duration_ms >= 0
    logged = _everything_logged(access_log)
    assert chat_id not in logged and QUERY_SECRET not in logged


async def test_json_lines_carry_the_fields_as_keys(app, access_log) -> None:
    await app.test_client().get("/no/such/path", headers={"X-Request-ID": "rid-404"})
    [record] = _access(access_log)
    entry = json.loads(JsonLineFormatter().format(record))
    assert entry["logger"] == "ktulhu.access" and entry["level"] == "info"
    assert {k: entry[k] for k in ("method", "route", "status", "request_id", "complete")} == \
        {"method": "GET", "route": "<unmatched>", "status": 404, "request_id": "rid-404", "complete": True}
    assert isinstance(entry["duration_ms"], float) and "client" in entry


async def test_no_message_text_and_no_bearer_token(app_with_store, access_log) -> None:
    runtime = app_with_store.extensions[RUNTIME_KEY]
    user = User(id=str(uuid.uuid4()), created_ts=now_ms(), role="free", email="a@example.com")
    runtime.store.save_user(user)
    token = issue_token(runtime.settings, user.id)
    client = app_with_store.test_client()
    body = {"model": "m", "messages": [{"role": "user", "content": SECRET_TEXT}]}
    response = await client.post(f"/v1/chat/completions?user={QUERY_SECRET}", json=body,
                                 headers={"Authorization": f"Bearer {token}", "OpenAI-Organization": "org-1"})
    assert response.status_code == 503  # authenticated, body read, quota reserved; no engine here
    refused = await client.post("/v1/chat/completions", json=body,
                                headers={"Authorization": "Bearer ktk_" + "0" * 32 + "_" + "S" * 43})
    assert refused.status_code == 401
    records = _access(access_log)
    assert [(r.route, r.status) for r in records] == [("/v1/chat/completions", 503), ("/v1/chat/completions", 401)]
    assert records[0].request_id == response.headers["X-Request-ID"]
    logged = _everything_logged(access_log)
    for secret in (SECRET_TEXT, token, "S" * 43, QUERY_SECRET):
        assert secret not in logged


async def test_a_stream_is_logged_when_it_ends(app, access_log) -> None:
    seen_while_streaming: list[int] = []

    @app.get("/test-stream")
    async def stream() -> Response:
        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                seen_while_streaming.append(len(_access(access_log)))
                yield f"data: {i}\n\n".encode()

        return Response(events(), content_type="text/event-stream")

    response = await app.test_client().get("/test-stream")
    assert await response.get_data() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert seen_while_streaming == [0, 0, 0]  # nothing was logged when the headers went out
    [record] = _access(access_log)
    assert (record.route, record.status, record.complete) == ("/test-stream", 200, True)


async def test_a_stream_the_client_left_is_logged_incomplete(app, raw, access_log) -> None:
    @app.get("/endless")
    async def endless() -> Response:
        async def events() -> AsyncIterator[bytes]:
            while True:
                yield b"data: x\n\n"
                await trio.sleep(0)

        return Response(events(), content_type="text/event-stream")

    response = await raw("GET", "/endless", [(b"x-request-id", b"left-early")], leave_after_chunks=2)
    assert response.status == 200
    [record] = _access(access_log)
    assert (record.route, record.status, record.request_id, record.complete) == ("/endless", 200, "left-early", False)


# --- /ws prompts -------------------------------------------------------------------------------------


def _done(request_id: str, chat_id: str, reason: str, generated: int | None = None) -> dict:
    frame = {"type": "assistant", "done": True, "request_id": request_id, "chat_id": chat_id, "reason": reason}
    if generated is not None:
        frame["usage"] = {"prompt_tokens": 30, "cached_tokens": 0, "generated_tokens": generated}
    return frame


def test_one_line_per_ws_prompt(access_log) -> None:
    log = PromptAccessLog("203.0.113.7")
    log.started("p1", "")
    log.started("p2", "c2")
    log.started("p1", "")  # a duplicate id while p1 runs: p1 keeps its start
    log.started("p3", "")
    log.sent({"type": "assistant", "token": SECRET_TEXT, "request_id": "p1", "chat_id": "c1"})  # not a `done`
    log.sent(_done("p1", "c1", "eos", generated=12))
    log.sent(_done("p2", "c2", "rate_limited"))
    log.sent(_done("server-chosen", "c4", "empty_prompt"))  # its frame had no usable id
    log.end()  # p3 never finished: the client left
    lines = {r.request_id: r for r in _access(access_log)}
    assert set(lines) == {"p1", "p2", "server-chosen", "p3"}
    p1 = lines["p1"]
    assert (p1.route, p1.chat_id, p1.outcome, p1.tokens, p1.client) == ("/ws", "c1", "eos", 12, "203.0.113.7")
    assert isinstance(p1.duration_ms, float) and p1.duration_ms >= 0
    assert (lines["p2"].outcome, lines["p2"].tokens) == ("rate_limited", None)
    assert lines["server-chosen"].duration_ms is None
    assert (lines["p3"].outcome, lines["p3"].chat_id) == ("disconnected", "")
    entry = json.loads(JsonLineFormatter().format(p1))
    assert {k: entry[k] for k in ("route", "request_id", "chat_id", "outcome", "tokens")} == \
        {"route": "/ws", "request_id": "p1", "chat_id": "c1", "outcome": "eos", "tokens": 12}
    assert SECRET_TEXT not in _everything_logged(access_log)


def test_pending_prompts_are_bounded(access_log) -> None:
    log = PromptAccessLog("203.0.113.7")
    for i in range(MAX_PENDING_PROMPTS + 10):
        log.started(f"p{i}", "")
    log.end()
    assert len(_access(access_log)) == MAX_PENDING_PROMPTS
