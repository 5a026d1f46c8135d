"""Per-key locks that serialise read-modify-write of one record across worker threads.

A fixed array of stripes (no per-key allocation, no growth): a name hashes to a stripe, and
`hold` takes every stripe it needs in ascending order, so two holders can never deadlock.
Unrelated keys that share a stripe only wait for each other; they never corrupt each other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

__all__ = ["StripedLocks"]


@attrs.define
class StripedLocks:
    stripes: int = 256
    _locks: list[threading.Lock] = attrs.field(init=False)
    #: One lock for changes to the unique identity indexes (email, provider id); always taken
    #: after any stripe, never before.
    identity: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def __attrs_post_init__(self) -> None:
        self._locks = [threading.Lock() for _ in range(self.stripes)]

    @contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        """Hold the locks of every name for the duration of the block (blocking the thread)."""
        indexes = sorted({hash(name) % self.stripes for name in names})
        taken: list[threading.Lock] = []
        try:
            for index in indexes:
                lock = self._locks[index]
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
