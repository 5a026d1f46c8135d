"""Engine service: the model is proven on this machine (a child process decodes a batch), loaded
once (off the trio thread), then the batching engine runs.

The engine's decode threads stop before the model is freed; the model is freed when the tree stops.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ..engine.engine import Engine
from ..engine.model import Model
from ..preflight import check_model
from .runtime import Runtime

__all__ = ["run"]


async def run(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    settings = runtime.settings
    proof = await check_model(settings)
    # A big GGUF can take long to map; on shutdown the loading thread is abandoned, not waited for.
    model = await trio.to_thread.run_sync(Model.load, settings, abandon_on_cancel=True)
    try:
        runtime.model = model
        engine = Engine(model, settings)
        async with trio.open_nursery() as nursery:
            engine_info = await nursery.start(engine.run)
            runtime.engine = engine
            task_status.started({**attrs.asdict(model.info), **engine_info,
                                 "layers_on_gpu": f"{proof.detail['layers_on_gpu']}/{proof.detail['layers_total']}"})
    finally:
        runtime.engine = None
        runtime.model = None
        model.close()

