"""`RemoteEngine.wait_idle` over an in-process worker (httpx's MockTransport) whose replies go on
only when the test says: idle at start, blocked while a request waits for a slot or streams, idle
again once it ends (finished, cancelled) or when no worker took it. Every wait is bounded only so
that a broken mechanism fails instead of hanging."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing

from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.remote import RemoteEngine, WorkerFailed
from ktulhu.engine.sampling import SamplingParams
from ktulhu.settings import load_settings

from tests.paths import REPO
from tests.idle import idle_waiter

QUESTION = [ChatMessage("user", "Name three colours.")]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8)
WAIT_S = 30


class HeldReply(httpx.AsyncByteStream):
    """An event stream that sends its first piece, then waits for `go` before it finishes."""

    def __init__(self) -> None:
        self.go = trio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"Red"},"finish_reason":null}]}\n\n'
        await self.go.wait()
        yield b'data: {"choices":[{"delta":{"content":", green"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


class Worker:
    """Answers health checks; each chat request gets a `HeldReply` (or HTTP 500 when `failing`)."""

    def __init__(self) -> None:
        self.replies: list[HeldReply] = []
        self.failing = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": "held"}]} if request.url.path == "/v1/models"
                                  else {"status": "ok"})
        if self.failing:
            return httpx.Response(500, json={"error": {"message": "out of memory"}})
        self.replies.append(HeldReply())
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=self.replies[-1])


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[RemoteEngine]:
    settings = load_settings(environ={"KTULHU_WORKERS": "http://worker.test:8080|slots=1", "KTULHU_QUEUE": "1"},
                             root=REPO)
    engine = RemoteEngine(settings, transport=httpx.MockTransport(worker))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


async def test_idle_at_start_busy_while_a_reply_streams_idle_once_it_finished() -> None:
    worker = Worker()
    async with running(worker) as engine:
        async with idle_waiter(engine) as idle:
            assert idle.is_set()
        with trio.fail_after(WAIT_S):
            gen = await engine.chat(QUESTION, PARAMS)
        async with idle_waiter(engine) as idle:
            assert not idle.is_set()
            worker.replies[0].go.set()
            with trio.fail_after(WAIT_S):
                assert await gen.text() == "Red, green"
                await idle.wait()


async def test_it_waits_for_a_request_queued_for_the_slot_and_a_cancel_ends_it() -> None:
    worker = Worker()
    async with running(worker) as engine:
        with trio.fail_after(WAIT_S):
            first = await engine.chat(QUESTION, PARAMS)
        queued: list = []
        streaming = trio.Event()

        async def second() -> None:
            queued.append(await engine.chat(QUESTION, PARAMS))
            streaming.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.stats().queue_depth == 1
            async with idle_waiter(engine) as idle:
                first.cancel()  # its slot goes to the queued request, which then streams
                with trio.fail_after(WAIT_S):
                    await first.text()
                    await streaming.wait()
                assert not idle.is_set()
                queued[0].cancel()
                with trio.fail_after(WAIT_S):
                    await queued[0].text()
                    await idle.wait()
        assert first.finished.reason == queued[0].finished.reason == "cancelled"


async def test_a_request_no_worker_took_leaves_it_idle() -> None:
    worker = Worker()
    worker.failing = True
    async with running(worker) as engine:
        with trio.fail_after(WAIT_S), pytest.raises(WorkerFailed):
            await engine.chat(QUESTION, PARAMS)
        async with idle_waiter(engine) as idle:
            assert idle.is_set()
