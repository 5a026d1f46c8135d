"""The process under `ktulhu serve`.

    root nursery
    ├── signals          SIGINT/SIGTERM -> graceful stop under a deadline
    ├── tree.run         store -> services (model, router)
    └── http.run         hypercorn (trio worker): accepts, then serves the app

Start order is store, services (loading in the background), HTTP; stop order is the reverse:
HTTP stops accepting and gives in-flight work `KTULHU_GRACEFUL_TIMEOUT`, then the services are
cancelled and the store is closed last.
"""

from __future__ import annotations

import trio
from quart_trio import QuartTrio

from ..app import create_app
from ..settings import Settings
from ..startup import log_listening
from . import http, signals, tree
from .runtime import Runtime

__all__ = ["serve"]


async def serve(
    settings: Settings,
    *,
    task_status: trio.TaskStatus[tuple[Runtime, list[str]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until a signal (or `runtime.shutting_down`) stops it.

    Stops when `runtime.request_shutdown()` is called (signals call it). Raises an exception
    (group) holding `ServiceFailed` when a service crashes.
    """
    runtime = Runtime(settings)
    async with trio.open_nursery() as root:
        root.start_soon(signals.watch, runtime, root.cancel_scope)
        await root.start(tree.run, runtime)
        binds = await root.start(_serve_http, create_app(runtime), runtime, root.cancel_scope)
        log_listening(settings, binds)
        task_status.started((runtime, binds))


async def _serve_http(
    app: QuartTrio, runtime: Runtime, root: trio.CancelScope, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    """Serve until a stop is requested; when hypercorn has drained, cancel the rest of the tree."""
    await http.run(app, runtime.settings, runtime.shutting_down.wait, task_status=task_status)
    root.cancel()
