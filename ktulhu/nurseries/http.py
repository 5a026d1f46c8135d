"""HTTP service: hypercorn's trio worker serving the app on the configured address."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from ..settings import Settings

__all__ = ["hypercorn_config", "run"]


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = settings.host
    config.bind = [f"[{host}]:{settings.port}" if ":" in host and not host.startswith("[") else
                   f"{host}:{settings.port}"]
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = logging.getLogger("hypercorn.access")
    config.errorlog = logging.getLogger("hypercorn.error")
    # Long generations stream for minutes; never close an open stream for keep-alive reasons.
    config.keep_alive_timeout = 75
    # Frames over KTULHU_WS_MAX_FRAME get an `error` (and `done`) from the chat session; only far
    # larger ones are cut by hypercorn (close code 1009).
    config.websocket_max_message_size = max(4 * settings.ws_max_frame, 16 << 20)
    return config


async def run(
    app: QuartTrio,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns; then in-flight requests get `graceful_timeout`."""
    await serve(app, hypercorn_config(settings), shutdown_trigger=shutdown_trigger, task_status=task_status)
