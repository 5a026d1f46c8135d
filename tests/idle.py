"""Observing `wait_idle()` from a test: did a waiter started at a given moment return?"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing


@asynccontextmanager
async def idle_waiter(engine: Any) -> AsyncIterator[trio.Event]:
    """An event set when a `engine.wait_idle()` started now has returned."""
    returned = trio.Event()

    async def wait() -> None:
        await engine.wait_idle()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        yield returned
        nursery.cancel_scope.cancel()
