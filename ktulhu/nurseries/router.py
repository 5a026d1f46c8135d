"""Router service: loads the intent router off the trio thread and runs its micro-batcher.

Before loading, a child process proves the onnxruntime session runs on this machine (`ktulhu.preflight`).
Readiness reports the router's directory, device and heads. Without a built router (a fresh clone
before `ktulhu router train`) the service reports `degraded` and `runtime.router` provides a router
without a model: every message then gets the default route, which is also what a timeout yields.
An explicitly configured directory (INTENT_ROUTER_DIR / PHATIC_MODEL_DIR) that cannot be loaded is
an error that stops the server.
"""

from __future__ import annotations

from typing import Any

import trio

from ..metrics import ROUTER_LATENCY
from ..preflight import check_router
from ..router.model import REQUIRED_FILES
from ..router.service import Router
from .runtime import Runtime

__all__ = ["run"]


async def run(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
    settings = runtime.settings
    directory = settings.router_dir
    explicit = bool(settings.intent_router_dir or settings.phatic_model_dir)
    if not explicit and not (directory / "model.onnx").is_file():
        reason = f"no router model at {directory}"
        router = Router.unavailable(reason)
        detail: dict[str, Any] = {"status": "degraded", "reason": reason, "route": "default"}
    else:
        if all((directory / name).is_file() for name in REQUIRED_FILES):  # else loading says what is missing
            await check_router(settings)
        router = await trio.to_thread.run_sync(Router.from_settings, settings, abandon_on_cancel=True)
        assert router.model is not None
        detail = {"dir": str(directory), "device": router.model.device,
                  "heads": ",".join(router.labels), "max_length": router.model.max_length}
    router.observe_latency = ROUTER_LATENCY.observe
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        with runtime.router.providing(router):
            task_status.started(detail)
            await trio.sleep_forever()
