"""Rate limits on the store's token buckets, and the sweep that deletes their expired records.

Buckets live in the store so they survive restarts. A full bucket is deleted when it is touched
(`Store.take_rate_token`), and every written bucket records when it will be full again, so
`Sweeper` can delete the ones nobody touches any more (a flood of one-off addresses or emails
would otherwise leave one record each, forever). The sweeper also drops signed-out token entries
whose token has expired.

The sweeper is a task for the store's lifetime: start it in the nursery that holds the open store
(`nursery.start_soon(Sweeper(store).run)`) and cancel it before the store closes.
"""

from __future__ import annotations

import hashlib
import logging
import math

import attrs
import trio

from ..store import Store
from ..store.accounts import RateDecision
from ..store.errors import StoreClosedError

__all__ = ["SWEEP_BATCH", "SWEEP_INTERVAL_S", "Sweeper", "hashed_subject", "retry_after_s", "spend", "sweep_all"]

log = logging.getLogger("ktulhu.auth.ratelimit")

#: Seconds between two sweeps of the whole key space.
SWEEP_INTERVAL_S = 300.0
#: Records examined per store call (the work one worker thread does at a time).
SWEEP_BATCH = 1000


def hashed_subject(*parts: str) -> str:
    """A fixed-size bucket subject for free text (emails, addresses): the raw text never becomes a key
    component, and a pair cannot be forged by putting the separator inside one part."""
    digest = hashlib.sha256()
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        digest.update(b"%d:" % len(raw) + raw)
    return digest.hexdigest()[:40]


async def spend(store: Store, scope: str, subject: str, rate: int, cost: float = 1.0) -> RateDecision | None:
    """Take `cost` tokens from bucket `scope`/`subject` (`rate` per minute, burst `rate`); None when
    `rate` is 0 (limit off). A `cost` of 0 peeks, a negative one gives back."""
    if not rate:
        return None
    return await store.aio.take_rate_token(scope, subject or "unknown", capacity=rate, refill_per_s=rate / 60,
                                           cost=cost)


def retry_after_s(decision: RateDecision) -> int:
    """Whole seconds for `Retry-After` (at least 1)."""
    return max(1, math.ceil(decision.retry_after_ms / 1000))


async def sweep_all(store: Store, *, batch: int = SWEEP_BATCH, now: int | None = None) -> int:
    """One pass over every rate-limit and signed-out-token record, `batch` records per store call;
    returns how many expired records were deleted."""
    deleted = 0
    after: bytes | None = None
    while True:
        result = await store.aio.run(store.sweep_expired, now=now, after=after, limit=batch)
        deleted += result.deleted
        if result.next_after is None:
            return deleted
        after = result.next_after
        await trio.sleep(0)  # let other store calls in between passes


@attrs.define(eq=False)
class Sweeper:
    """Deletes expired records every `interval` seconds for as long as it runs."""

    store: Store
    interval: float = SWEEP_INTERVAL_S
    batch: int = SWEEP_BATCH
    passes: int = 0
    deleted: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                self.deleted += await sweep_all(self.store, batch=self.batch)
            except StoreClosedError:
                return
            except Exception:  # a sweep is housekeeping: never let it take the tree down
                log.exception("sweeping expired rate-limit records failed; will retry")
            self.passes += 1
            self._changed.set()
            self._changed = trio.Event()
            await trio.sleep(self.interval)

    async def wait_passes(self, count: int) -> None:
        """Return once at least `count` passes have finished (for tests and shutdown checks)."""
        while self.passes < count:
            await self._changed.wait()
