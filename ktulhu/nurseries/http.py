"""HTTP service: hypercorn's trio worker serving the app on the configured address."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from ..settings import Settings

__all__ = ["hypercorn_config", "limit_inherited_listeners", "limit_unacknowledged", "run"]


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
    config = hypercorn_config(settings)
    sockets = config.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        limit_unacknowledged(sock, settings.ws_send_timeout)
        sock.listen(config.backlog)
    await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config, sockets=sockets,
                       shutdown_trigger=shutdown_trigger, task_status=task_status)


def limit_unacknowledged(sock: socket.socket, seconds: float) -> None:
    """A client that stops reading is dropped by the kernel after `seconds` (TCP_USER_TIMEOUT, which
    accepted connections inherit and which also bounds a zero receive window).

    Needed because hypercorn shields its socket writes from cancellation: a `/ws` or SSE reader that
    accepts nothing would otherwise hold its write, its prompt, its chat and the shutdown forever.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))


def limit_inherited_listeners(seconds: float) -> None:
    """`limit_unacknowledged` for the listening sockets this process was handed (under
    `hypercorn ktulhu.asgi:app` the master creates them); Linux only, a no-op elsewhere."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return
    for entry in fds.iterdir():
        try:
            sock = socket.socket(fileno=int(entry.name))
        except (OSError, ValueError):  # not a socket (or already closed)
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                limit_unacknowledged(sock, seconds)
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays open: it is hypercorn's
