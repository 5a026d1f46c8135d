"""Replicas service (only on a PostgreSQL store): cross-replica turn locks for `/ws` prompts and
the title relay between front-ends (`ktulhu/replicas.py`). Its readiness turns `degraded` while the
relay has lost the server (titles then reach other replicas' sidebars on their next reload)."""

from __future__ import annotations

from typing import Any

import trio

from ..replicas import TitleRelay, TurnLocks
from .runtime import Runtime

__all__ = ["run"]


async def run(runtime: Runtime, url: str, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    store = runtime.store  # the tree opens the store before its services
    locks = TurnLocks(url)

    def on_state(state: str) -> None:
        if state == "ready":
            runtime.readiness.mark("replicas", "ready", relay="listening")
        else:
            runtime.readiness.mark("replicas", "degraded", relay=state)

    relay = TitleRelay(url, runtime.summary_hub, store.aio, on_state=on_state)
    runtime.turns.shared = locks
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            task_status.started({"replica": relay.replica, "relay": "listening"})
    finally:
        runtime.turns.shared = None
        locks.close()
