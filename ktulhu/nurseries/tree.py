"""The service tree: the store is opened first and closed last; services run inside it.

    tree.run
    └── store (open ... close)
        └── services nursery
            ├── model      (GGUF loaded once; the batching engine and its decode threads)
            ├── router     (intent router)
            ├── summaries  (chat titles, low priority)
            ├── replicas   (PostgreSQL store only: cross-replica turn locks, title relay)
            └── loop lag   (probe: how late the event loop wakes -> /metrics)

`run` reports started as soon as the store is open, so HTTP can answer `/healthz` and a 503
`/readyz` while the model loads; each service reports its own readiness through `nursery.start`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import engine as engine_service
from . import loop_lag
from . import replicas as replicas_service
from . import router as router_service
from . import summaries as summaries_service
from . import store as store_service
from .runtime import Runtime, ServiceFailed

__all__ = ["SERVICES", "find_failure", "run"]

log = logging.getLogger("ktulhu.tree")

Service = Callable[..., Awaitable[Any]]
#: (name, run) of every service under the store, brought up concurrently.
SERVICES: tuple[tuple[str, Service], ...] = (
    ("model", engine_service.run),
    ("router", router_service.run),
    ("summaries", summaries_service.run),
)


async def run(
    runtime: Runtime,
    *,
    services: tuple[tuple[str, Service], ...] = SERVICES,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the tree until cancelled; any service failure raises `ServiceFailed` out of it."""
    async with store_service.opened(runtime) as store:
        shared = store.shared_url
        if shared is not None:  # other front-ends may share this store
            services = (*services, ("replicas", functools.partial(replicas_service.run, url=shared)))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(loop_lag.watch, name="loop-lag")  # no readiness: it cannot fail to start
                for name, service in services:
                    runtime.readiness.mark(name, "starting")
                    nursery.start_soon(_bring_up, nursery, name, service, runtime)
                task_status.started(runtime)
        finally:
            runtime.readiness.stop()


async def _bring_up(nursery: trio.Nursery, name: str, service: Service, runtime: Runtime) -> None:
    """Start one service in the services nursery and record what it reported as its readiness."""
    detail = await nursery.start(_supervised, name, service, runtime)
    status = detail.pop("status", "ready")
    runtime.readiness.mark(name, status, **detail)
    log.info("%s %s: %s", name, status, ", ".join(f"{k}={v}" for k, v in detail.items()))


async def _supervised(
    name: str, service: Service, runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]
) -> None:
    """Run a service, turning its errors into `ServiceFailed` (cancellation passes through)."""
    try:
        await service(runtime, task_status=task_status)
    except BaseException as error:
        cause = _real_error(error)
        if cause is None:  # cancellation (possibly grouped): the tree is stopping, not failing
            raise
        runtime.readiness.mark(name, "failed", error=str(cause))
        raise ServiceFailed(name, cause) from error
    finally:
        state = runtime.readiness.components.get(name)
        if state is not None and state.usable:
            runtime.readiness.mark(name, "stopped")


def _real_error(error: BaseException) -> BaseException | None:
    """The first error in `error` that is not cancellation or Ctrl-C, or None."""
    passthrough = (trio.Cancelled, KeyboardInterrupt)
    if isinstance(error, BaseExceptionGroup):
        _, rest = error.split(passthrough)
        return None if rest is None else _first_leaf(rest)
    return None if isinstance(error, passthrough) else error


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def find_failure(error: BaseException) -> ServiceFailed | None:
    """The `ServiceFailed` inside an exception (group) escaping the tree, if any."""
    if isinstance(error, ServiceFailed):
        return error
    if isinstance(error, BaseExceptionGroup):
        match, _ = error.split(ServiceFailed)
        if match is not None:
            return _first_leaf(match)  # type: ignore[return-value]
    return None
