"""The app's own behaviour: Quart's response timeout must not cut streams; logging set-up."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import trio
import trio.testing
from quart import Response

from ktulhu.app import create_app
from ktulhu.logs import JsonLineFormatter, configure_logging
from ktulhu.nurseries.runtime import Runtime
from ktulhu.settings import load_settings


async def test_a_stream_longer_than_quarts_default_timeout_is_not_cut(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Quart ends responses after 60 s by default; ours stream until the generator ends."""
    app = create_app(Runtime(load_settings(environ={}, root=tmp_path)))

    @app.get("/slow-stream")
    async def slow_stream() -> Response:
        async def chunks():
            for i in range(3):
                yield f"chunk {i}\n".encode()
                await trio.sleep(45)  # 90 s in all, past Quart's 60 s default
            yield b"end\n"

        return Response(chunks(), mimetype="text/plain")

    client = app.test_client()
    started = trio.current_time()
    with trio.fail_after(300):  # virtual time: a cut stream never completes and fails here
        response = await client.get("/slow-stream")
        body = await response.get_data()
    assert body == b"chunk 0\nchunk 1\nchunk 2\nend\n"
    assert trio.current_time() - started >= 135


async def test_health_routes_in_process(tmp_path: Path) -> None:
    runtime = Runtime(load_settings(environ={}, root=tmp_path))
    client = create_app(runtime).test_client()
    assert (await (await client.get("/healthz")).get_json()) == {"status": "alive"}
    response = await client.get("/readyz")
    assert response.status_code == 503 and (await response.get_json())["status"] == "starting"
    runtime.readiness.mark("store", "ready")
    assert (await client.get("/readyz")).status_code == 200
    runtime.request_shutdown()
    response = await client.get("/readyz")
    assert response.status_code == 503 and (await response.get_json())["status"] == "stopping"


def test_log_spec_sets_root_and_named_levels() -> None:
    configure_logging("warning,ktulhu.engine=debug,hypercorn.access=info", "text")
    try:
        assert logging.getLogger().level == logging.WARNING
        assert logging.getLogger("ktulhu.engine").level == logging.DEBUG
        assert logging.getLogger("hypercorn.access").level == logging.INFO
        assert logging.getLogger("httpx").level == logging.WARNING
    finally:
        configure_logging("info", "text")


def test_json_lines_carry_extra_fields() -> None:
    record = logging.makeLogRecord({"name": "ktulhu.ws", "levelno": logging.INFO, "levelname": "INFO",
                                    "msg": "prompt %s", "args": ("r1",), "chat_id": "c1", "tokens": 12})
    entry = json.loads(JsonLineFormatter().format(record))
    assert entry["msg"] == "prompt r1" and entry["level"] == "info" and entry["logger"] == "ktulhu.ws"
    assert entry["chat_id"] == "c1" and entry["tokens"] == 12
