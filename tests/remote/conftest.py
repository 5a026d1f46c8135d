"""Remote-mode fixtures: two real llama-server workers (the pinned build, the default model) for the
session, a `RemoteEngine` over them started in the test's trio run, and a tiny hostile HTTP worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from ktulhu import native_build
from ktulhu.engine.remote import RemoteEngine
from ktulhu.local_cluster import Member, llama_server
from ktulhu.settings import default_model_path, load_settings
from tests.paths import REPO

#: Slots (`--parallel`) of each llama-server and tokens of context of each slot.
SLOTS = 2
CTX_PER_SLOT = 1024


@pytest.fixture(scope="session")
def llama_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Member]]:
    """Two llama-server workers (`-np 2`, 1024 tokens per slot, one thread each) for the session."""
    model = REPO / default_model_path()
    if not model.is_file():
        pytest.fail(f"{model} is missing: run `ktulhu models pull`")
    binary = native_build.llama_server((native_build.read_marker() or {}).get("gpu", "cpu"))
    logs = tmp_path_factory.mktemp("llama-server")
    workers = [llama_server(binary, model, f"worker{i}", logs / f"worker{i}.log", slots=SLOTS, ctx=CTX_PER_SLOT,
                            threads=1) for i in range(2)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture
def fleet(llama_workers: list[Member]) -> list[Member]:
    """The session's workers, both running (a test that killed one restarts it before the next)."""
    for worker in llama_workers:
        if not worker.running:
            worker.start()
            worker.wait_ready()
    return llama_workers


RemoteEngineFactory = Callable[..., "asynccontextmanager[RemoteEngine]"]


@pytest.fixture
def remote_engine() -> RemoteEngineFactory:
    """`async with remote_engine("http://a|slots=2,...", KTULHU_QUEUE="1") as engine:` runs a RemoteEngine."""

    @asynccontextmanager
    async def start(workers: str, **env: str) -> AsyncIterator[RemoteEngine]:
        settings = load_settings(environ={"KTULHU_WORKERS": workers, "KTULHU_WORKER_HEALTH_INTERVAL": "0.2",
                                          **env}, root=REPO)
        engine = RemoteEngine(settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()

    return start


def worker_list(workers: list[Member], slots: int = SLOTS) -> str:
    return ",".join(f"{w.url}|slots={slots}" for w in workers)


async def slots_of(worker: Member) -> list[dict]:
    """llama-server's own view of its slots (`/slots`)."""
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(worker.url + "/slots")).json()


async def worker_metric(worker: Member, name: str) -> float:
    """One value of llama-server's own `/metrics`."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(worker.url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def wait_until_idle(worker: Member) -> None:
    """Until no slot of `worker` is processing (bounded by the caller's fail_after)."""
    while any(slot["is_processing"] for slot in await slots_of(worker)):
        await trio.sleep(0.05)


# --- a hostile worker -------------------------------------------------------------------------------


class HostileWorker:
    """A tiny HTTP server: `/health` and `/v1/models` answer 200; `POST /v1/chat/completions`
    misbehaves as `mode` says: "http500", "garbage" (200 event stream of junk) or "silent" (accepts
    the connection, never answers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = 0
        self.posts = 0
        self.closed = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            method, path = head.split(" ", 2)[:2]
            if method == "GET":
                body = b'{"data":[{"id":"hostile"}]}' if path == "/v1/models" else b'{"status":"ok"}'
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                      + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                return
            self.posts += 1
            if self.mode == "http500":
                body = b'{"error":{"code":500,"message":"CUDA error: out of memory","type":"server_error"}}'
                await stream.send_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                                      + body)
            elif self.mode == "garbage":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                                      b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
                                      b"data: {this is not json\n\n")
                await trio.sleep(3600)  # the client must stop reading by itself
            else:  # silent: reads until the client hangs up
                while await stream.receive_some(65536):
                    pass
                self.closed.set()


@asynccontextmanager
async def hostile_worker(mode: str) -> AsyncIterator[HostileWorker]:
    worker = HostileWorker(mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.serve)
        yield worker
        nursery.cancel_scope.cancel()
