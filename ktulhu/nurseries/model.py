"""Model service: the GGUF is loaded once, off the trio thread, and freed when the tree stops."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from ..engine.model import Model
from .runtime import Runtime

__all__ = ["run"]

log = logging.getLogger("ktulhu.engine")


async def run(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    settings = runtime.settings
    # A big GGUF can take long to map; on shutdown the loading thread is abandoned, not waited for.
    model = await trio.to_thread.run_sync(Model.load, settings, abandon_on_cancel=True)
    try:
        runtime.model = model
        task_status.started(attrs.asdict(model.info))
        await trio.sleep_forever()
    finally:
        runtime.model = None
        model.close()
