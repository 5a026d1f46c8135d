"""Requests on their way to the engine: counted from their arrival until their generation reaches a
decode worker.

Before a request reaches the engine it is authenticated, its quota reserved, its prompt routed and
built: a few milliseconds each, one request after another on the trio thread, so a burst of requests
that arrived together reaches the engine spread over tens of milliseconds. An idle decode worker that
started a step with the first prompt alone would hold all the others back for that whole step; with
this count it waits briefly for them instead (`DecodeWorker._gather`), and the burst is prefilled in
one step. A request counted here and then refused (bad input, quota, a full queue) only ends the wait;
one that waits meanwhile (for its model to load, for the store) costs an idle worker at most the
wait's bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import attrs

__all__ = ["Arrivals"]


@attrs.define(eq=False)
class Arrivals:
    """How many requests are on their way. Changed on the trio thread only; decode threads read
    `count` (one attribute read) and are woken through `waking` when it falls to zero."""

    count: int = 0
    _wakers: list[Callable[[], None]] = attrs.field(factory=list)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Count one request for the block: from its arrival to its submission (or its refusal)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            for wake in self._wakers:
                wake()

    @contextlib.contextmanager
    def waking(self, wake: Callable[[], None]) -> Iterator[None]:
        """Call `wake` (thread-safe, non-blocking) whenever the count falls to zero, for the block."""
        self._wakers.append(wake)
        try:
            yield
        finally:
            self._wakers.remove(wake)
