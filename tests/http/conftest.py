"""The real app in process (no model, no store), and a raw ASGI caller for header bytes that HTTP
clients refuse to send (newlines, non-ASCII) but a hostile peer or proxy could still deliver.

No `__init__.py` here on purpose: as a package this folder would be named `http`, which the
standard library's `http` (already imported) shadows, so its modules could not be imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from quart_trio import QuartTrio

from ktulhu.app import create_app
from ktulhu.app_state import RUNTIME_KEY
from ktulhu.nurseries import http as http_service
from ktulhu.nurseries.runtime import Runtime
from ktulhu.settings import load_settings

ALLOWED = "https://app.example"


@pytest.fixture
def app(tmp_path: Path) -> QuartTrio:
    """The real app with an allow-list of one origin, `ALLOWED` (settings for 127.0.0.1, any port)."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "allowed_origins.txt").write_text(f"# test\n{ALLOWED}\n")
    settings = load_settings(environ={"KTULHU_HOST": "127.0.0.1", "KTULHU_PORT": "0",
                                      "JWT_SECRET": "http-tests-" + "0123456789abcdef" * 3}, root=tmp_path)
    return create_app(Runtime(settings))


RawHttp = Callable[[bytes], Awaitable[tuple[int, list[tuple[str, str]]]]]


@pytest.fixture
async def served(app: QuartTrio, nursery: trio.Nursery) -> AsyncIterator[RawHttp]:
    """`app` behind the server's own hypercorn service on a loopback port. Yields
    `await send(request_bytes)` -> (status, [(lower-cased name, value)]): the bytes go out as they are,
    and only the answer's head is read."""
    stop = trio.Event()
    binds = await nursery.start(http_service.run, app, app.extensions[RUNTIME_KEY].settings, stop.wait)
    port = int(binds[0].rsplit(":", 1)[1])

    async def send(request: bytes) -> tuple[int, list[tuple[str, str]]]:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            data = b""
            with trio.fail_after(30):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    assert chunk, f"the server closed the connection after {data!r}"
                    data += chunk
        status_line, *lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        return int(status_line.split()[1]), headers

    yield send
    stop.set()


@attrs.frozen
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def get(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), decoded as latin-1."""
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == key]


RawCall = Callable[..., Awaitable[RawResponse]]


@pytest.fixture
def raw(app: QuartTrio) -> RawCall:
    """`await raw("GET", "/healthz", [(b"x-request-id", b"...")])`: one request straight into the app's
    ASGI entry point (the middlewares included), with headers as bytes. The client disconnects when
    the response is complete (or after `leave_after_chunks` body chunks)."""

    async def call(method: str, path: str, headers: list[tuple[bytes, bytes]] = (), body: bytes = b"", *,
                   leave_after_chunks: int | None = None) -> RawResponse:
        """`leave_after_chunks`: the client disconnects once that many body chunks arrived."""
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 3000), "extensions": {},
        }
        sent: list[dict[str, Any]] = []
        finished = trio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] != "http.response.body":
                return
            chunks = sum(m["type"] == "http.response.body" for m in sent)
            if not message.get("more_body", False) or chunks == leave_after_chunks:
                finished.set()

        with trio.fail_after(30):
            await app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return RawResponse(start["status"], list(start["headers"]), content)

    return call
