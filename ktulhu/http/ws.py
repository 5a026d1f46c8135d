"""`/ws`: the chat WebSocket (both dialects; see `ktulhu/chat/`).

Before the upgrade is accepted: a browser `Origin` must be allowed (`config/allowed_origins.txt` or
this server's own pages), and a presented credential (`Authorization: Bearer ...` or `?token=`) must
be valid; without one the socket is anonymous (a `register` frame may still carry `token`).
"""

from __future__ import annotations

import logging

import trio
from quart import Blueprint, Response, websocket

from .. import metrics
from ..app_state import current_runtime
from ..auth.principal import ANONYMOUS, AuthError, authenticate_bearer
from ..chat.session import ChatSession, StalledReader
from .cors import websocket_origin_allowed
from .errors import json_error
from .identity import websocket_credential

__all__ = ["blueprint"]

log = logging.getLogger("ktulhu.ws")

blueprint = Blueprint("ws", __name__)


def origin_refused() -> Response:
    return json_error(403, "origin_not_allowed", "this page's origin is not in config/allowed_origins.txt")


@blueprint.websocket("/ws")
async def chat_socket() -> Response | None:
    runtime = current_runtime()
    if not websocket_origin_allowed(runtime.settings.allowed_origins_file):
        return origin_refused()
    if runtime.shutting_down.is_set():
        return json_error(503, "shutting_down", "the server is restarting")
    try:
        credential = websocket_credential()
        principal = ANONYMOUS if credential is None else await authenticate_bearer(runtime.store, runtime.settings, credential)
    except AuthError as bad:
        return json_error(401, bad.code, bad.message)
    await websocket.accept()
    session = ChatSession(runtime, websocket, principal, websocket.remote_addr or "unknown", credential)
    metrics.WS_SESSIONS.inc()
    try:
        await session.run()
    except* StalledReader as stalled:
        log.warning("closing /ws: %s", stalled.exceptions[0])
        with trio.move_on_after(1):
            await websocket.close(1008, "reader too slow")
    finally:
        metrics.WS_SESSIONS.dec()
    return None
