"""Access to the process `Runtime` from request handlers."""

from __future__ import annotations

from quart import current_app

from .nurseries.runtime import Runtime

__all__ = ["RUNTIME_KEY", "current_runtime"]

RUNTIME_KEY = "ktulhu.runtime"


def current_runtime() -> Runtime:
    runtime = current_app.extensions.get(RUNTIME_KEY)
    if runtime is None:
        raise RuntimeError("the service tree is not running (the app was served without its lifespan)")
    return runtime
