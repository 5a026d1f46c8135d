"""Which inference worker takes a request: rendezvous hashing with bounded load, and the queue.

Every request has a key (its chat id, or a hash of its prompt's opening for requests without one).
Workers are ranked for that key by weighted rendezvous (highest-random-weight) hashing, so a chat's
turns go to the same worker, where its prompt is cached, for as long as that worker is healthy; a
worker that leaves or joins moves only the chats that rank it first. Load is bounded: when the top
worker has no free slot, the next one in the key's order takes the request.

A worker never has more requests than its slots. When every healthy worker is full, a request
waits in a FIFO of at most `queue` entries and is handed a slot by the release that frees it
(awaited, never polled); beyond the queue it gets `Busy` at once. A request waiting when the last
healthy worker goes away is told `Busy` too, so nothing waits for a fleet that is gone.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Sequence

import attrs
import trio

from .request import Busy, EngineClosed
from .worker_specs import WorkerSpec

__all__ = ["Lease", "Router", "WorkerState", "rank"]


@attrs.define(eq=False)
class WorkerState:
    """One worker as the front-end sees it. Mutated on the trio thread only."""

    spec: WorkerSpec
    slots: int
    healthy: bool = False
    busy: int = 0
    #: Requests it accepted, tokens it generated for them (its own usage figures), requests it failed.
    requests: int = 0
    generated_tokens: int = 0
    failures: int = 0
    last_error: str | None = None
    #: Unix time of `last_error`.
    last_error_at: float | None = None
    #: The `model` field sent to it: configured, or the first one it lists at /v1/models.
    model: str | None = None
    #: The path that answers its health check: /health (llama-server, vLLM, SGLang) or /v1/models.
    health_path: str = "/health"

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def has_free_slot(self) -> bool:
        return self.healthy and self.busy < self.slots


def _weight(key: str, worker: WorkerState) -> float:
    """Weighted rendezvous score: a worker with twice the slots is first for twice the keys."""
    digest = hashlib.blake2b(f"{key}\x00{worker.url}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -worker.slots / math.log(unit)


def rank(key: str, workers: Sequence[WorkerState]) -> list[WorkerState]:
    """`workers` in `key`'s rendezvous order (the first is where the key's requests go)."""
    return sorted(workers, key=lambda w: _weight(key, w), reverse=True)


@attrs.define(eq=False)
class Lease:
    """One slot of one worker, held for one request; `release` is idempotent."""

    worker: WorkerState
    router: Router
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.router._release(self.worker)


@attrs.define(eq=False)
class _Waiter:
    key: str
    exclude: frozenset[str]
    done: trio.Event = attrs.field(factory=trio.Event)
    lease: Lease | None = None
    #: Why it was woken without a lease ("closed" or "no_worker").
    refused: str | None = None


class Router:
    """Slot accounting and the waiting queue over a fixed set of workers."""

    def __init__(self, workers: Sequence[WorkerState], queue: int, *, affinity: bool = True) -> None:
        self.workers = tuple(workers)
        self.queue = queue
        #: Off: workers in turn, whatever the key (what affinity buys is measured against this).
        self.affinity = affinity
        self._turn = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._closed = False
        self._changed = trio.Event()

    # --- state ---------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def healthy(self) -> list[WorkerState]:
        return [w for w in self.workers if w.healthy]

    def set_health(self, worker: WorkerState, healthy: bool) -> bool:
        """Admit or eject `worker`; returns whether that changed anything."""
        if worker.healthy == healthy:
            return False
        worker.healthy = healthy
        self._dispatch()
        self.notify()
        return True

    def notify(self) -> None:
        """Wake `wait_for_change` (health changed)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    def close(self) -> None:
        """No more leases: waiting requests are told the engine stopped."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.refused = "closed"
            waiter.done.set()

    # --- leases --------------------------------------------------------------------------------

    def try_lease(self, key: str, exclude: frozenset[str] = frozenset()) -> Lease | None:
        if self.affinity:
            order = rank(key, self.workers)
        else:
            self._turn += 1
            start = self._turn % len(self.workers)
            order = [*self.workers[start:], *self.workers[:start]]
        for worker in order:
            if worker.url not in exclude and worker.has_free_slot:
                worker.busy += 1
                return Lease(worker, self)
        return None

    async def lease(self, key: str, exclude: frozenset[str] = frozenset()) -> Lease:
        """A slot on the best worker for `key` with a free one, waiting in the queue when all are full.

        Raises `Busy` at once when the queue is full or no healthy worker (outside `exclude`)
        exists, and later when the last one goes away while this request waits; `EngineClosed`
        when the engine stops. Cancellation while waiting leaves the queue (and gives back a slot
        handed over meanwhile)."""
        if self._closed:
            raise EngineClosed("the engine is not running")
        if not self._waiters:  # FIFO: nobody may overtake a request that waits
            lease = self.try_lease(key, exclude)
            if lease is not None:
                return lease
        if not self._candidates(exclude):
            raise Busy("no inference worker is reachable right now; try again shortly")
        if len(self._waiters) >= self.queue:
            raise Busy(f"the server is busy ({self.queue} requests waiting); try again shortly")
        waiter = _Waiter(key, exclude)
        self._waiters.append(waiter)
        try:
            await waiter.done.wait()
        except BaseException:
            if waiter.lease is not None:
                waiter.lease.release()
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        if waiter.lease is not None:
            return waiter.lease
        if waiter.refused == "closed":
            raise EngineClosed("the server is shutting down")
        raise Busy("no inference worker is reachable right now; try again shortly")

    def _candidates(self, exclude: frozenset[str]) -> list[WorkerState]:
        return [w for w in self.workers if w.healthy and w.url not in exclude]

    def _release(self, worker: WorkerState) -> None:
        worker.busy -= 1
        assert worker.busy >= 0
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiting requests, oldest first; wake those no worker can serve."""
        for waiter in list(self._waiters):
            lease = self.try_lease(waiter.key, waiter.exclude)
            if lease is None and self._candidates(waiter.exclude):
                continue  # every worker it may use is full: it keeps its place
            self._waiters.remove(waiter)
            waiter.lease = lease
            waiter.refused = None if lease is not None else "no_worker"
            waiter.done.set()
