"""The trio-facing store: every operation runs on a worker thread, so the engine never stalls the loop.

`AsyncStore` mirrors `Store`'s operations as coroutines. Calls are queued and run on at most
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import outcome
import trio

from .accounts import RateDecision
from .errors import StoreWriteError
from .records import ApiKey, Chat, Message, User, UserDevice
from .rocks import DEFAULT_THREADS
from .users import QuotaResult

if TYPE_CHECKING:
    from .db import Store, StoreStatistics

__all__ = ["DEFAULT_THREADS", "MAX_BATCH", "AsyncStore", "AsyncStoreStatistics"]

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

    def __init__(self, store: "Store", *, threads: int | None = None,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self.store = store
        self._limiter = limiter
        if threads is None:
            threads = store._kv.default_threads
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

    def statistics(self) -> "StoreStatistics":
        """Counters only; no I/O, safe on the trio thread."""
        return self.store.statistics()

    # --- messages ------------------------------------------------------------------------------

    async def save_message(self, message: Message, *, existing_chat_only: bool = False) -> Message | None:
        return await self.run(self.store.save_message, message, existing_chat_only=existing_chat_only)

    async def delete_message(self, chat_id: str, message_id: str) -> bool:
        return await self.run(self.store.delete_message, chat_id, message_id)

    async def set_message_liked(self, chat_id: str, message_id: str, liked: bool) -> bool:
        return await self.run(self.store.set_message_liked, chat_id, message_id, liked)

    async def update_message(
        self, chat_id: str, message_id: str, change: Callable[[Message], Message]
    ) -> Message | None:
        return await self.run(self.store.update_message, chat_id, message_id, change)

    async def remove_messages_by_role(self, chat_id: str, role: str) -> int:
        return await self.run(self.store.remove_messages_by_role, chat_id, role)

    async def replace_summary(self, chat_id: str, text: str, *, language: str | None = None,
                              message_id: str | None = None, ts: int | None = None,
                              existing_chat_only: bool = False) -> Message | None:
        return await self.run(self.store.replace_summary, chat_id, text, language=language,
                              message_id=message_id, ts=ts, existing_chat_only=existing_chat_only)

    async def list_messages_for_chat(self, chat_id: str, *, last: int | None = None) -> list[Message]:
        return await self.run(self.store.list_messages_for_chat, chat_id, last=last)

    async def find_message(self, chat_id: str, message_id: str) -> Message | None:
        return await self.run(self.store.find_message, chat_id, message_id)

    async def chat_summary(self, chat_id: str) -> Message | None:
        return await self.run(self.store.chat_summary, chat_id)

    async def list_recent_messages(self, limit: int) -> list[Message]:
        return await self.run(self.store.list_recent_messages, limit)

    async def list_messages_for_device(self, device_hash: str) -> list[Message]:
        return await self.run(self.store.list_messages_for_device, device_hash)

    # --- chats ---------------------------------------------------------------------------------

    async def save_chat(self, chat: Chat) -> Chat:
        return await self.run(self.store.save_chat, chat)

    async def update_chat(self, chat_id: str, change: Callable[[Chat], Chat]) -> Chat | None:
        return await self.run(self.store.update_chat, chat_id, change)

    async def ensure_chat_for_device(self, chat_id: str, device_hash: str | None, *,
                                     user_id: str | None = None) -> tuple[Chat, bool]:
        return await self.run(self.store.ensure_chat_for_device, chat_id, device_hash, user_id=user_id)

    async def touch_chat(self, chat_id: str, device_hash: str | None = None, *, user_id: str | None = None,
                         now: int | None = None, existing_chat_only: bool = False) -> Chat | None:
        return await self.run(self.store.touch_chat, chat_id, device_hash, user_id=user_id, now=now,
                              existing_chat_only=existing_chat_only)

    async def delete_thread(self, chat_id: str) -> int:
        return await self.run(self.store.delete_thread, chat_id)

    async def load_chat(self, chat_id: str, *, strict: bool = False) -> Chat | None:
        return await self.run(self.store.load_chat, chat_id, strict=strict)

    async def list_chats(self) -> list[Chat]:
        return await self.run(self.store.list_chats)

    async def list_chats_for_device(self, device_hash: str) -> list[Chat]:
        return await self.run(self.store.list_chats_for_device, device_hash)

    async def list_chats_owned_by(self, user_id: str) -> list[Chat]:
        return await self.run(self.store.list_chats_owned_by, user_id)

    async def list_chats_for_user(self, user_id: str) -> list[Chat]:
        return await self.run(self.store.list_chats_for_user, user_id)

    async def list_recent_chats(self, limit: int) -> list[Chat]:
        return await self.run(self.store.list_recent_chats, limit)

    # --- users and devices ---------------------------------------------------------------------

    async def save_user(self, user: User) -> User:
        return await self.run(self.store.save_user, user)

    async def update_user(self, user_id: str, change: Callable[[User], User]) -> User | None:
        return await self.run(self.store.update_user, user_id, change)

    async def increment_generation_count(self, user_id: str, *, limit: int | None = None, by: int = 1) -> QuotaResult:
        return await self.run(self.store.increment_generation_count, user_id, limit=limit, by=by)

    async def load_user(self, user_id: str) -> User | None:
        return await self.run(self.store.load_user, user_id)

    async def list_users(self) -> list[User]:
        return await self.run(self.store.list_users)

    async def find_user_by_email(self, email: str) -> User | None:
        return await self.run(self.store.find_user_by_email, email)

    async def find_user_by_provider(self, provider_id: str) -> User | None:
        return await self.run(self.store.find_user_by_provider, provider_id)

    async def delete_user(self, user_id: str) -> bool:
        return await self.run(self.store.delete_user, user_id)

    async def add_device_for_user(self, user_id: str, device_hash: str, *, now: int | None = None) -> UserDevice:
        return await self.run(self.store.add_device_for_user, user_id, device_hash, now=now)

    async def list_devices_for_user(self, user_id: str) -> list[UserDevice]:
        return await self.run(self.store.list_devices_for_user, user_id)

    async def list_all_devices(self) -> list[UserDevice]:
        return await self.run(self.store.list_all_devices)

    async def find_devices_by_hash(self, device_hash: str) -> list[UserDevice]:
        return await self.run(self.store.find_devices_by_hash, device_hash)

    async def user_id_for_device(self, device_hash: str) -> str | None:
        return await self.run(self.store.user_id_for_device, device_hash)

    # --- API keys, Stripe events, rate limits --------------------------------------------------

    async def save_api_key(self, api_key: ApiKey) -> ApiKey:
        return await self.run(self.store.save_api_key, api_key)

    async def load_api_key(self, key_id: str) -> ApiKey | None:
        return await self.run(self.store.load_api_key, key_id)

    async def list_api_keys_for_user(self, user_id: str) -> list[ApiKey]:
        return await self.run(self.store.list_api_keys_for_user, user_id)

    async def delete_api_key(self, key_id: str) -> bool:
        return await self.run(self.store.delete_api_key, key_id)

    async def record_stripe_event(self, event_id: str, event_type: str, *, now: int | None = None) -> bool:
        return await self.run(self.store.record_stripe_event, event_id, event_type, now=now)

    async def take_rate_token(self, scope: str, subject: str, *, capacity: float, refill_per_s: float,
                              cost: float = 1.0, now: int | None = None) -> RateDecision:
        return await self.run(self.store.take_rate_token, scope, subject, capacity=capacity,
                              refill_per_s=refill_per_s, cost=cost, now=now)
