"""The browser OpenAI SDK's path on the real server (hypercorn, store, model): its preflight passes,
its streamed completion is logged once the stream ended, and a `/ws` prompt gets its access line;
no line carries the prompt's text or the bearer token."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
import trio
from prometheus_client import REGISTRY

from auth.helpers import make_user
from chat.wsclient import dones, ws_client

pytestmark = pytest.mark.model

ORIGIN = "http://localhost:5173"  # in config/allowed_origins.txt
SECRET_TEXT = "Say the word zebra-violet-secret."
SDK_HEADERS = {"x-stainless-os": "MacOS", "x-stainless-lang": "js", "x-stainless-package-version": "4.0.0",
               "openai-organization": "org-1"}


class AccessLines(logging.Handler):
    """The `ktulhu.access` records, and a wait for one (the server logs in this trio run, so
    `emit` runs on this thread and may wake a waiting task directly)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._arrived = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()

    async def wait_for(self, match: Callable[[logging.LogRecord], bool]) -> logging.LogRecord:
        with trio.fail_after(60):
            while True:
                found = [r for r in self.records if match(r)]
                if found:
                    return found[0]
                self._arrived = trio.Event()
                await self._arrived.wait()


@pytest.fixture
def access_lines() -> Iterator[AccessLines]:
    logger = logging.getLogger("ktulhu.access")
    handler, level = AccessLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _logged(lines: AccessLines) -> str:
    return "\n".join(line.getMessage() + json.dumps({k: repr(v) for k, v in vars(line).items()})
                     for line in lines.records)


async def test_sdk_stream_and_ws_prompt(live_server, access_lines) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="8", KTULHU_ANON_RATE="0") as server:
        _, token = make_user(server.runtime, role="paid")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            preflight = await http.options("/v1/chat/completions", headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": ", ".join([*SDK_HEADERS, "authorization", "content-type"])})
            assert preflight.headers["access-control-allow-origin"] == ORIGIN
            allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
            assert {*SDK_HEADERS, "authorization", "content-type"} <= allowed

            body = {"model": "any", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": SECRET_TEXT}]}
            headers = {"Origin": ORIGIN, "Authorization": f"Bearer {token}", "X-Request-ID": "sdk-req-1", **SDK_HEADERS}
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["x-request-id"] == "sdk-req-1"
                assert "X-Request-ID" in response.headers["access-control-expose-headers"]
                streamed = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert streamed.endswith(b"data: [DONE]\n\n")
        line = await access_lines.wait_for(lambda r: r.request_id == "sdk-req-1")
        assert (line.method, line.route, line.status, line.complete) == ("POST", "/v1/chat/completions", 200, True)
        usage = json.loads(streamed.split(b"data: ")[-2])["usage"]  # the chunk before [DONE]
        assert (line.prompt_tokens, line.tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert line.tokens >= 1

        overheads = REGISTRY.get_sample_value("ktulhu_request_overhead_seconds_count") or 0.0
        async with ws_client(server.ws_url + "/ws") as ws:
            await ws.register()
            rid = await ws.prompt(SECRET_TEXT)
            done = dones(await ws.until_done(rid))[0]
        # the prompt's time from its frame to the engine was measured, on the trio thread as its
        # generation ended: before the reply's `done` was sent
        assert REGISTRY.get_sample_value("ktulhu_request_overhead_seconds_count") == overheads + 1
        line = await access_lines.wait_for(lambda r: r.request_id == rid)
        assert (line.route, line.outcome, line.chat_id) == ("/ws", done["reason"], done["chat_id"])
        assert line.tokens == done["usage"]["generated_tokens"] >= 1
        assert line.duration_ms is not None and line.duration_ms >= 0

        logged = _logged(access_lines)
        assert SECRET_TEXT not in logged and "zebra" not in logged and token not in logged
