"""Running the service tree from the ASGI lifespan (`hypercorn --worker-class trio ktulhu.asgi:app`).

hypercorn owns the process and its signals there; the tree lives in quart-trio's lifespan nursery.
hypercorn only logs a lifespan task that fails after start-up and keeps serving, and prints a
traceback for one that fails during start-up, so a service failure is handled here: one log line,
then the worker exits non-zero and hypercorn's master stops every worker. A second worker on the
same embedded store (`--workers 2`) is refused that way, with a line that says to run one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

import attrs
import trio
from quart_trio import QuartTrio

from ..app import attach_runtime
from ..app_state import RUNTIME_KEY
from ..logs import configure_logging
from ..settings import load_settings
from ..store.errors import StoreLockedError
from ..startup import prepare
from . import tree
from .http import limit_inherited_listeners
from .runtime import Runtime, ServiceFailed

__all__ = ["EXIT_SERVICE_FAILED", "attach"]

log = logging.getLogger("ktulhu")
EXIT_SERVICE_FAILED = 3


@attrs.define
class _TreeHandle:
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    started: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)


def _workers_hint(failure: ServiceFailed) -> str:
    """`hypercorn --workers N` starts N processes; the embedded store admits one."""
    if isinstance(failure.error, StoreLockedError) and multiprocessing.parent_process() is not None:
        return ("; hypercorn --workers N starts N processes and the embedded store admits one: run one worker "
                "(`hypercorn --workers 1` or `ktulhu serve`)")
    return ""


def attach(app: QuartTrio) -> None:
    """Start the tree when the app starts serving and stop it (store closed) when it stops."""
    handle = _TreeHandle()

    @app.before_serving
    async def _start_tree() -> None:
        settings = load_settings()
        configure_logging(settings.log, settings.log_format)
        runtime = Runtime(prepare(settings))
        attach_runtime(app, runtime)
        limit_inherited_listeners(runtime.settings.ws_send_timeout)
        await app.nursery.start(_supervise, runtime, handle)

    @app.after_serving
    async def _stop_tree() -> None:
        runtime: Runtime | None = app.extensions.get(RUNTIME_KEY)
        if runtime is not None:
            runtime.request_shutdown()
        handle.scope.cancel()
        with trio.move_on_after(5):
            await handle.done.wait()


async def _supervise(runtime: Runtime, handle: _TreeHandle, *, task_status: trio.TaskStatus[None]) -> None:
    try:
        with handle.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(tree.run, runtime)  # a failure here fails the ASGI start-up
                handle.started = True
                task_status.started()
    except BaseException as error:
        failure = tree.find_failure(error)
        if failure is not None:
            log.critical("ktulhu stopped: %s%s", failure, _workers_hint(failure))
            logging.shutdown()
            os._exit(EXIT_SERVICE_FAILED)
        raise
    finally:
        handle.done.set()
