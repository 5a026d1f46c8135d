"""The router service: classification off the trio thread, micro-batched, with a deadline.

`Router.classify(text, language)` is what request handlers await. It never raises for model
problems and never takes longer than `timeout` seconds: empty input, a missing model, a failure or a
timeout all yield the default route *in the hinted language* (with a note saying why).

While `Router.run()` is running in a nursery (the router service does this), concurrent calls are
collected into batches of up to `max_batch` texts; at most `limiter.total_tokens` batches run at
once, each in a worker thread, and requests arriving meanwhile wait and form the next batch. Without
`run()` each call is classified alone in a worker thread (CLI, tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from .labels import HeadSet
from .model import REQUIRED_FILES, IntentModel, RouterLoadError
from .result import IntentRoutingResult, default_result
from .routing import Prepared, decide, prepare, route_intent

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["REQUIRED_FILES", "Router", "RouterLoadError", "RouterStatistics"]


log = logging.getLogger("ktulhu.router")

DEFAULT_TIMEOUT = 15.0
DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE = 4096


class RouterClosed(Exception):
    """The batcher stopped before this request was classified."""


@attrs.frozen
class RouterStatistics:
    """A snapshot for metrics: queue depth, batches run and how calls ended."""

    queued: int
    batches_running: int
    batches: int
    classified: int
    timeouts: int
    failures: int
    max_batch_seen: int


@attrs.define(eq=False)
class _Request:
    text: str
    done: trio.Event = attrs.field(factory=trio.Event)
    heads: HeadSet | None = None
    error: BaseException | None = None
    abandoned: bool = False


@attrs.define(eq=False)
class _Counters:
    batches: int = 0
    classified: int = 0
    timeouts: int = 0
    failures: int = 0
    max_batch_seen: int = 0


@attrs.define(eq=False)
class Router:
    """The intent router of one process: a model (or None when unavailable) and its batcher."""

    model: IntentModel | None
    timeout: float = DEFAULT_TIMEOUT
    max_batch: int = DEFAULT_MAX_BATCH
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(2))
    #: Why `model` is None (shown in notes and readiness).
    unavailable_reason: str = ""
    #: Told the seconds each `classify` took (the router service gives it the `/metrics` histogram).
    observe_latency: Callable[[float], None] = lambda seconds: None
    _send: trio.MemorySendChannel[_Request] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[_Request] = attrs.field(init=False)
    _running: bool = attrs.field(init=False, default=False)
    _counters: _Counters = attrs.field(init=False, factory=_Counters)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(DEFAULT_QUEUE)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: Path, *, seq_len: int | None = None, device: str = "auto", phatic: bool = True,
             timeout: float = DEFAULT_TIMEOUT, parallel: int = 2, max_batch: int = DEFAULT_MAX_BATCH) -> Router:
        """Load the model in `directory` (blocking; run it off the event loop) and warm it up.

        Raises `RouterLoadError` naming the missing file or mismatched head.
        """
        model = IntentModel.load(Path(directory), seq_len=seq_len, device=device, phatic=phatic)
        model.predict(["machine learning is cool"])  # the original's start-up sanity check
        return cls(model=model, timeout=timeout, max_batch=max_batch,
                   limiter=trio.CapacityLimiter(parallel))

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        """`load` with INTENT_ROUTER_DIR / _SEQ_LEN / _DEVICE / _PHATIC and KTULHU_ROUTER_TIMEOUT."""
        return cls.load(settings.router_dir, seq_len=settings.router_seq_len, device=settings.router_device,
                        phatic=settings.router_phatic, timeout=settings.router_timeout)

    @classmethod
    def unavailable(cls, reason: str) -> Router:
        """A router without a model: every message gets the default route."""
        return cls(model=None, unavailable_reason=reason)

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """Active heads and their labels (empty without a model)."""
        return dict(self.model.heads) if self.model else {}

    # --- classification ------------------------------------------------------------------------

    async def classify(self, text: str, language: str | None) -> IntentRoutingResult:
        """Route one message. Never raises for router problems and returns within `timeout` seconds.

        `language` is the client's hint (`"pt-BR"`, None...); the result's `language` is its
        normalised form whatever happens. The time taken goes to `observe_latency`.
        """
        started = time.perf_counter()
        try:
            return await self._classify(text, language)
        finally:
            self.observe_latency(time.perf_counter() - started)

    async def _classify(self, text: str, language: str | None) -> IntentRoutingResult:
        prepared = prepare(text, language)
        if isinstance(prepared, IntentRoutingResult):
            return prepared
        if self.model is None:
            return _fallback(prepared, f"router unavailable: {self.unavailable_reason or 'no model'}")
        with trio.move_on_after(self.timeout):
            try:
                heads = await self._infer(prepared.utterance)
            except Exception as error:  # noqa: BLE001 - any model failure degrades to the default route
                self._counters.failures += 1
                log.warning("intent router failed: %s: %s", type(error).__name__, error)
                return _fallback(prepared, f"router failed: {type(error).__name__}")
            return decide(prepared, heads)
        self._counters.timeouts += 1
        log.warning("intent router timed out after %.1f s", self.timeout)
        return _fallback(prepared, f"router timed out after {self.timeout:g} s")

    def classify_sync(self, text: str, language: str | None) -> IntentRoutingResult:
        """Blocking `classify` without deadline or fallback (CLI and evaluation); raises on failure."""
        if self.model is None:
            prepared = prepare(text, language)
            if isinstance(prepared, IntentRoutingResult):
                return prepared
            return _fallback(prepared, f"router unavailable: {self.unavailable_reason or 'no model'}")
        model = self.model
        return route_intent(text, language, lambda utterance: model.predict([utterance])[0])

    async def _infer(self, utterance: str) -> HeadSet:
        assert self.model is not None
        if not self._running:
            async with self.limiter:
                self._counters.batches += 1
                [heads] = await trio.to_thread.run_sync(self.model.predict, [utterance], abandon_on_cancel=True)
            self._counters.classified += 1
            return heads
        request = _Request(utterance)
        self._send.send_nowait(request)  # WouldBlock when DEFAULT_QUEUE requests wait: fall back
        try:
            await request.done.wait()
        finally:
            request.abandoned = not request.done.is_set()
        if request.heads is None:
            raise request.error or RouterClosed("batch ended without a result")
        return request.heads

    # --- batching ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Batch concurrent `classify` calls until cancelled; waiting callers then fall back."""
        if self.model is None:
            task_status.started()
            await trio.sleep_forever()
        try:
            async with trio.open_nursery() as nursery:
                self._running = True
                task_status.started()
                while True:
                    first = await self._receive.receive()
                    token = object()
                    await self.limiter.acquire_on_behalf_of(token)
                    batch = [first]
                    while len(batch) < self.max_batch:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    batch = [r for r in batch if not r.abandoned]
                    if not batch:
                        self.limiter.release_on_behalf_of(token)
                        continue
                    nursery.start_soon(self._run_batch, batch, token)
        finally:
            self._running = False
            while True:
                try:
                    request = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                request.error = RouterClosed("router stopped")
                request.done.set()

    async def _run_batch(self, batch: list[_Request], token: object) -> None:
        assert self.model is not None
        try:
            results = await trio.to_thread.run_sync(self.model.predict, [r.text for r in batch],
                                                    abandon_on_cancel=True)
        except Exception as error:  # noqa: BLE001 - handed to each caller, who falls back
            for request in batch:
                request.error = error
        else:
            for request, heads in zip(batch, results):
                request.heads = heads
            self._counters.classified += len(batch)
        finally:
            self.limiter.release_on_behalf_of(token)
            self._counters.batches += 1
            self._counters.max_batch_seen = max(self._counters.max_batch_seen, len(batch))
            for request in batch:
                if request.heads is None and request.error is None:
                    request.error = RouterClosed("router stopped")
                request.done.set()

    def statistics(self) -> RouterStatistics:
        """Counters since start-up and the current queue depth."""
        c = self._counters
        return RouterStatistics(
            queued=self._send.statistics().current_buffer_used,
            batches_running=self.limiter.borrowed_tokens,
            batches=c.batches, classified=c.classified, timeouts=c.timeouts, failures=c.failures,
            max_batch_seen=c.max_batch_seen,
        )


def _fallback(prepared: Prepared, reason: str) -> IntentRoutingResult:
    return default_result(prepared.language, notes=("default routing result", reason))


