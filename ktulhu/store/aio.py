"""The trio-facing store: every operation runs on a worker thread, so the engine never stalls the loop.

`AsyncStore` mirrors `Store`'s operations as coroutines (`store.aio.save_message(...)`: each one
declared once below, typed from the `Store` method it runs). Calls are queued and run on at most
`threads` worker threads at a time (one `trio.CapacityLimiter`); a worker runs up to `MAX_BATCH`
queued calls, one after another, per trip to the thread, so many small concurrent calls (message
saves from many chats) pay the thread hand-off once per batch instead of once per call. Each call
is still its own operation: its own lock, its own WriteBatch, its own result or exception.

Cancellation: a call that has not started when its caller is cancelled is withdrawn (never runs);
one that has started finishes first — so a cancelled write is "written, or never started", never
half-written — and the caller then sees `trio.Cancelled`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

import attrs
import outcome
import trio

from .db import Store, StoreStatistics
from .errors import StoreWriteError
from .rocks import DEFAULT_THREADS

__all__ = ["DEFAULT_THREADS", "MAX_BATCH", "AsyncStore", "AsyncStoreStatistics"]

P = ParamSpec("P")
T = TypeVar("T")
# Worker threads by default: `DEFAULT_THREADS` (2) on RocksDB, whose calls are short and hold the
# GIL; `postgres.POSTGRES_THREADS` on PostgreSQL, whose calls mostly wait on the server.
#: Most calls one worker runs per trip to its thread.
MAX_BATCH = 64


@attrs.define(eq=False)
class _Job:
    call: Callable[[], Any]
    wake: trio.Event = attrs.field(factory=trio.Event)
    taken: bool = False
    result: outcome.Outcome | None = None


def _run_jobs(jobs: list[_Job]) -> None:
    for job in jobs:
        job.result = outcome.capture(job.call)


class _Offloaded(Generic[P, T]):
    """An `AsyncStore` attribute that awaits the `Store` method of the same name through
    `AsyncStore.run`. It is typed from that method, so callers are checked against its real
    parameters and result, and no signature is written twice."""

    def __init__(self, method: Callable[Concatenate[Store, P], T]) -> None:
        self._name = method.__name__

    @overload
    def __get__(self, aio: None, owner: type[AsyncStore]) -> Self: ...

    @overload
    def __get__(self, aio: AsyncStore, owner: type[AsyncStore]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, aio: AsyncStore | None, owner: type[AsyncStore]) -> Any:
        if aio is None:
            return self
        name = self._name

        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            # by name on the store, so what runs is its method now (a subclass's, a test's patch)
            return await aio.run(getattr(aio.store, name), *args, **kwargs)

        call.__name__, call.__qualname__ = name, f"AsyncStore.{name}"  # trio task names, tracebacks
        return call


@attrs.frozen
class AsyncStoreStatistics:
    """A snapshot for `/metrics`: calls waiting for a worker, workers busy, trips and calls so far."""

    queued: int
    workers_busy: int
    threads: int
    batches: int
    calls: int


class AsyncStore:
    """Async wrapper over one `Store`; get it from `Store.aio` or build `AsyncStore(store, threads=...)`.

    Use it from one trio run at a time (it holds trio objects)."""

    def __init__(self, store: Store, *, threads: int | None = None,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self.store = store
        self._limiter = limiter
        if threads is None:
            threads = store.default_threads
        self._threads = int(limiter.total_tokens) if limiter is not None else threads
        self._queue: list[_Job] = []
        self._draining = 0
        self._batches = 0
        self._calls = 0
        #: Set when a write failed (disk full, I/O error): the store service reopens the store.
        self.write_failed = trio.Event()

    @property
    def limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:  # created lazily: needs no running trio loop until first use
            self._limiter = trio.CapacityLimiter(self._threads)
        return self._limiter

    def queue_statistics(self) -> AsyncStoreStatistics:
        return AsyncStoreStatistics(queued=len(self._queue), workers_busy=self._draining,
                                    threads=self._threads, batches=self._batches, calls=self._calls)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run any blocking store call on a worker thread (queued, batched, bounded)."""
        job = _Job(functools.partial(fn, *args, **kwargs))
        self._queue.append(job)
        try:
            while job.result is None:
                if not job.taken and self._draining < self._threads:
                    await self._drain_batch()
                else:
                    await job.wake.wait()
                    job.wake = trio.Event()
        except trio.Cancelled:
            if not job.taken:
                self._queue.remove(job)
                if self._queue and self._draining < self._threads:
                    self._queue[0].wake.set()  # it may have been handed the next batch: pass it on
                raise
            with trio.CancelScope(shield=True):
                while job.result is None:
                    await job.wake.wait()
                    job.wake = trio.Event()
            raise
        if isinstance(job.result, outcome.Error) and isinstance(job.result.error, StoreWriteError):
            self.write_failed.set()
        return job.result.unwrap()

    async def _drain_batch(self) -> None:
        jobs = self._queue[:MAX_BATCH]
        del self._queue[:MAX_BATCH]
        for job in jobs:
            job.taken = True
        self._draining += 1
        try:
            with trio.CancelScope(shield=True):  # taken jobs always run to the end
                await trio.to_thread.run_sync(_run_jobs, jobs, limiter=self.limiter)
        finally:
            self._draining -= 1
            self._batches += 1
            self._calls += len(jobs)
            for job in jobs:
                if job.result is None:  # the thread never ran them (cannot happen short of a crash)
                    job.result = outcome.Error(RuntimeError("store worker failed"))
                job.wake.set()
            if self._queue:  # hand the next batch to the first waiting caller
                self._queue[0].wake.set()

    def statistics(self) -> StoreStatistics:
        """Counters only; no I/O, safe on the trio thread."""
        return self.store.statistics()

    # --- messages ------------------------------------------------------------------------------

    save_message = _Offloaded(Store.save_message)
    delete_message = _Offloaded(Store.delete_message)
    set_message_liked = _Offloaded(Store.set_message_liked)
    update_message = _Offloaded(Store.update_message)
    remove_messages_by_role = _Offloaded(Store.remove_messages_by_role)
    replace_summary = _Offloaded(Store.replace_summary)
    list_messages_for_chat = _Offloaded(Store.list_messages_for_chat)
    find_message = _Offloaded(Store.find_message)
    chat_summary = _Offloaded(Store.chat_summary)
    list_recent_messages = _Offloaded(Store.list_recent_messages)
    list_messages_for_device = _Offloaded(Store.list_messages_for_device)

    # --- chats ---------------------------------------------------------------------------------

    save_chat = _Offloaded(Store.save_chat)
    update_chat = _Offloaded(Store.update_chat)
    ensure_chat_for_device = _Offloaded(Store.ensure_chat_for_device)
    touch_chat = _Offloaded(Store.touch_chat)
    delete_thread = _Offloaded(Store.delete_thread)
    load_chat = _Offloaded(Store.load_chat)
    list_chats = _Offloaded(Store.list_chats)
    list_chats_for_device = _Offloaded(Store.list_chats_for_device)
    list_chats_owned_by = _Offloaded(Store.list_chats_owned_by)
    list_chats_for_user = _Offloaded(Store.list_chats_for_user)
    list_recent_chats = _Offloaded(Store.list_recent_chats)

    # --- users and devices ---------------------------------------------------------------------

    save_user = _Offloaded(Store.save_user)
    update_user = _Offloaded(Store.update_user)
    increment_generation_count = _Offloaded(Store.increment_generation_count)
    load_user = _Offloaded(Store.load_user)
    list_users = _Offloaded(Store.list_users)
    find_user_by_email = _Offloaded(Store.find_user_by_email)
    find_user_by_provider = _Offloaded(Store.find_user_by_provider)
    delete_user = _Offloaded(Store.delete_user)
    add_device_for_user = _Offloaded(Store.add_device_for_user)
    list_devices_for_user = _Offloaded(Store.list_devices_for_user)
    list_all_devices = _Offloaded(Store.list_all_devices)
    find_devices_by_hash = _Offloaded(Store.find_devices_by_hash)
    user_id_for_device = _Offloaded(Store.user_id_for_device)

    # --- API keys, Stripe events, rate limits --------------------------------------------------

    save_api_key = _Offloaded(Store.save_api_key)
    load_api_key = _Offloaded(Store.load_api_key)
    list_api_keys_for_user = _Offloaded(Store.list_api_keys_for_user)
    delete_api_key = _Offloaded(Store.delete_api_key)
    record_stripe_event = _Offloaded(Store.record_stripe_event)
    take_rate_token = _Offloaded(Store.take_rate_token)
