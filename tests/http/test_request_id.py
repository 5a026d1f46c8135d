"""`X-Request-ID`: a safe client value is echoed, a missing one generated, a hostile one replaced;
every HTTP response carries it (errors too), and handlers find it in `g.request_id`."""

from __future__ import annotations

import logging
import re

from hypothesis import given, settings as hsettings, strategies as st
from quart import Response, g

from ktulhu.logs import request_id_from

SAFE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GENERATED = re.compile(r"[0-9a-f]{32}")


async def test_a_safe_client_id_is_echoed(app) -> None:
    client = app.test_client()
    for value in ("abc", "req_01J:node-7.a", "x" * 128):
        response = await client.get("/healthz", headers={"X-Request-ID": value})
        assert response.headers.get_all("X-Request-ID") == [value]


async def test_a_missing_id_is_generated_and_unique(app) -> None:
    client = app.test_client()
    ids = [(await client.get("/healthz")).headers["X-Request-ID"] for _ in range(3)]
    assert all(GENERATED.fullmatch(i) for i in ids) and len(set(ids)) == 3


async def test_every_response_carries_it(app, caplog) -> None:
    """Errors from the framework (404, 405), from handlers (503 while starting, 500) and preflights."""

    @app.get("/fails")
    async def fails() -> Response:
        raise RuntimeError("boom")

    client = app.test_client()
    caplog.set_level(logging.CRITICAL, logger="quart")  # the 500's traceback is expected
    responses = [await client.get("/no/such/path"), await client.delete("/healthz"), await client.get("/readyz"),
                 await client.get("/fails"), await client.options("/v1/models")]
    assert [r.status_code for r in responses] == [404, 405, 503, 500, 200]
    for response in responses:
        [value] = response.headers.get_all("X-Request-ID")
        assert GENERATED.fullmatch(value)


async def test_hostile_ids_are_replaced(raw) -> None:
    hostile = [b"a" * 10_000, "r\u00e9q\u2603".encode(), b"\xff\xfe", b"", b" ", b"a b", b"a/b", b"a" * 129,
               b"<script>", b"a\x00b", b"a\tb"]
    for value in hostile:
        response = await raw("GET", "/healthz", [(b"x-request-id", value)])
        [echoed] = response.get("X-Request-ID")
        assert GENERATED.fullmatch(echoed), value[:40]


async def test_hostile_ids_over_real_http(served) -> None:
    """Through hypercorn: a folded header (its line break arrives inside the value) is replaced;
    a bare CR or LF is refused by the HTTP parser (400) before the app sees it."""

    def get(value: bytes) -> bytes:
        return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + value + b"\r\n\r\n"

    for value in (b"abc\r\n def", b"r\xc3\xa9q", b"a" * 10_000, b"x\r\n\tX-Injected: 1"):
        status, headers = await served(get(value))
        ids = [v for k, v in headers if k == "x-request-id"]
        assert status == 200 and len(ids) == 1 and GENERATED.fullmatch(ids[0]), value[:40]
        assert "x-injected" not in dict(headers)
    for value in (b"abc\ndef", b"abc\rdef"):
        status, headers = await served(get(value))
        assert status == 400 and "x-request-id" not in dict(headers)
    status, headers = await served(get(b"client-chosen.1"))
    assert status == 200 and ("x-request-id", "client-chosen.1") in headers


def test_line_breaks_never_survive_the_parser() -> None:
    """Quart cannot even build a request with a CR/LF in a header, so the id check is shown here."""
    for value in ("abc\ndef", "abc\r\ndef", "abc\n", "\n"):
        assert GENERATED.fullmatch(request_id_from(value))


async def test_the_app_sets_no_second_header(app) -> None:
    """A route that sets its own `X-Request-ID` is overridden: one id per response."""

    @app.get("/sets-its-own")
    async def sets_its_own() -> Response:
        return Response(g.request_id, headers={"X-Request-ID": "from-the-route"})

    response = await app.test_client().get("/sets-its-own", headers={"X-Request-ID": "given"})
    assert response.headers.get_all("X-Request-ID") == ["given"]
    assert await response.get_data() == b"given"  # `g.request_id` is the same id


@hsettings(max_examples=500, deadline=None)
@given(st.text(max_size=200) | st.from_regex(SAFE, fullmatch=True))
def test_the_id_is_the_value_when_safe_else_fresh(value: str) -> None:
    result = request_id_from(value)
    if SAFE.fullmatch(value):
        assert result == value
    else:
        assert GENERATED.fullmatch(result)


async def test_a_refused_websocket_handshake_carries_it(served) -> None:
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               b"Origin: https://evil.example\r\nX-Request-ID: ws-1\r\n\r\n")
    status, headers = await served(upgrade)
    assert status == 403 and ("x-request-id", "ws-1") in headers
