"""Counting an engine's generations in flight (queued or running), so that a caller can await the
engine being idle instead of polling its stats: background work (chat titles) yields to users."""

from __future__ import annotations

import attrs
import trio

__all__ = ["InFlight"]


@attrs.define(eq=False)
class InFlight:
    """Generations accepted and not yet ended; trio thread only. `enter` when one is accepted,
    `leave` exactly once when it ends (finished, cancelled, failed, or dropped before it started)."""

    count: int = 0
    #: Set while `count` is 0; replaced by a fresh one when work arrives.
    _idle: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._idle.set()

    def enter(self) -> None:
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is in flight (at once if nothing is). Idleness is checked again on
        waking: work that arrived meanwhile is waited for as well."""
        while self.count:
            await self._idle.wait()
