"""Engine service: the model is proven on this machine (a child process decodes a batch), loaded
once (off the trio thread), then the batching engine runs, and the model pool (`runtime.models`)
that loads the other models of KTULHU_MODELS on first use; each is provided on the runtime
while it runs.

The engine's decode threads stop before the model is freed; the model is freed when the tree stops.

With KTULHU_ENGINE=remote no model is loaded or proven here: a `RemoteEngine` sends prompts to
KTULHU_WORKERS, and this service's readiness entry follows the workers' health (`unavailable`, so
`/readyz` 503, while none answers).
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ..engine import embeddings
from ..engine.engine import Engine
from ..engine.model import Model
from ..engine.pool import ModelPool
from ..engine.remote import RemoteEngine
from ..metrics import ENGINE_EVENTS
from ..preflight import check_model
from .runtime import Runtime

__all__ = ["run"]


async def run(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    if runtime.settings.remote:
        await _run_remote(runtime, task_status=task_status)
    else:
        await _run_local(runtime, task_status=task_status)


async def _run_remote(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    engine = RemoteEngine(runtime.settings, events=ENGINE_EVENTS)
    async with trio.open_nursery() as nursery:
        detail = await nursery.start(engine.run)
        with runtime.engine.providing(engine), runtime.embedder.providing(embeddings.RemoteEmbedder(engine)):
            task_status.started(detail)
            while True:  # the readiness entry follows the fleet (checked at least once per health interval)
                with trio.move_on_after(runtime.settings.worker_health_interval):
                    await engine.wait_for_change()
                detail = engine.describe()
                current = runtime.readiness.components.get("model")
                if current is not None and current.status in ("ready", "degraded", "unavailable"):
                    status = detail.pop("status")
                    if (current.status, current.detail) != (status, detail):
                        runtime.readiness.mark("model", status, **detail)


async def _run_local(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    settings = runtime.settings
    proof = await check_model(settings)
    # A big GGUF can take long to map; on shutdown the loading thread is abandoned, not waited for.
    model = await trio.to_thread.run_sync(Model.load, settings, abandon_on_cancel=True)
    try:
        engine = Engine(model, settings, events=ENGINE_EVENTS, arrivals=runtime.arrivals)
        # /v1/embeddings' context (created on first use) is freed after the engine stops, before the model.
        async with embeddings.serving(engine, settings) as embedder, trio.open_nursery() as nursery:
            engine_info = await nursery.start(engine.run)
            # KTULHU_MODELS: the other models load on first use in the pool's nursery; they stop
            # with this one (before the default model is freed).
            pool = await nursery.start(ModelPool.serve, settings, engine)
            with (runtime.model.providing(model), runtime.engine.providing(engine),
                  runtime.models.providing(pool), runtime.embedder.providing(embedder)):
                task_status.started({**attrs.asdict(model.info), **engine_info,
                                     "layers_on_gpu": f"{proof.detail['layers_on_gpu']}/{proof.detail['layers_total']}"})
                await trio.sleep_forever()
    finally:
        model.close()
