"""The event-loop lag probe: a task that sleeps a fixed interval and records how late it woke.

Everything the server does shares one trio thread, so any call that holds it (a big prompt built in
place, a blocking read) delays every socket at once. The probe makes that visible as
`ktulhu_event_loop_lag_seconds` on `/metrics`; a healthy server stays within a few milliseconds.
It runs in the services nursery of `tree.run` for as long as the tree runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import trio

from .. import metrics

__all__ = ["INTERVAL_S", "watch"]

#: Time between samples: often enough to catch a 50 ms stall, cheap enough to run forever.
INTERVAL_S = 0.1


async def watch(*, interval: float = INTERVAL_S,
                observe: Callable[[float], None] = metrics.EVENT_LOOP_LAG.observe) -> NoReturn:
    """Sleep `interval` at a time, forever, passing each late wake-up (seconds) to `observe`.

    Uses trio's clock, so a test's MockClock drives it."""
    deadline = trio.current_time() + interval
    while True:
        await trio.sleep_until(deadline)
        woke = trio.current_time()
        observe(woke - deadline)
        deadline = woke + interval
