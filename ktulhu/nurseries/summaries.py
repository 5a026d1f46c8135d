"""Summaries service: the low-priority worker that titles chats after their first exchange."""

from __future__ import annotations

from typing import Any

import trio

from ..chat.summaries import SummaryWorker
from .runtime import Runtime

__all__ = ["run"]


async def run(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    worker = SummaryWorker(runtime.settings, runtime.store, runtime.engine, runtime.summary_hub)
    async with trio.open_nursery() as nursery:
        detail = await nursery.start(worker.run)
        with runtime.summaries.providing(worker):
            task_status.started(detail)
            await trio.sleep_forever()
