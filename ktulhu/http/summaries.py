"""The web client's sidebar: `GET /chat-summary/last` and the push socket `/chat-summary/ws`.

Both list chats, so both need a credential (a user sees their own chats, the admin all), or the
single-user opt-in `KTULHU_OPEN_LISTINGS=1`. Anonymous clients may still follow the chats whose ids
they hold: `/chat-summary/ws?chat_id=<id>&chat_id=<id>` or a `{"subscribe": [ids]}` frame.
"""

from __future__ import annotations

import logging

import orjson
import trio
from quart import Blueprint, Response, websocket

from ..app_state import current_runtime
from ..auth.principal import AuthError
from ..chat import frames
from ..chat.access import lists_everything, may_use_chat
from ..store.keys import is_valid_id
from ..store.records import Chat
from .cors import websocket_origin_allowed
from .errors import json_error, json_response, query_limit, raise_error
from .identity import request_principal, websocket_principal
from .ws import origin_refused

__all__ = ["blueprint"]

log = logging.getLogger("ktulhu.ws")

blueprint = Blueprint("summaries", __name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: Chat ids one anonymous push socket may follow.
MAX_FOLLOWED = 256


@blueprint.get("/chat-summary/last")
async def last_summaries() -> Response:
    principal = await request_principal()
    limit = query_limit("limit", DEFAULT_LIMIT, 1, MAX_LIMIT, code="invalid_limit")
    store = current_runtime().store
    if lists_everything(current_runtime().settings, principal):
        chats = await store.aio.list_recent_chats(limit)
    elif principal.user_id is not None:
        chats = (await store.aio.list_chats_owned_by(principal.user_id))[:limit]
    else:
        raise_error(401, "login_required", "listing chats needs a signed-in user (Authorization: Bearer ...)")
    entries = []
    for chat in chats:
        summary = await store.aio.chat_summary(chat.id)
        entries.append({"chat_id": chat.id, "summary": summary.text if summary else None,
                        "ts": summary.ts if summary else chat.updated_ts})
    return json_response({"chats": entries})


@blueprint.websocket("/chat-summary/ws")
async def summary_socket() -> Response | None:
    runtime = current_runtime()
    if not websocket_origin_allowed(runtime.settings.allowed_origins_file):
        return origin_refused()
    try:
        principal = await websocket_principal()
    except AuthError as bad:
        return json_error(401, bad.code, bad.message)
    followed = {c for c in websocket.args.getlist("chat_id") if is_valid_id(c)}
    everything = lists_everything(current_runtime().settings, principal)

    def accepts(chat: Chat) -> bool:
        if everything:
            return True
        if principal.user_id is not None and chat.user_id == principal.user_id:
            return True
        return chat.id in followed and may_use_chat(principal, chat)

    await websocket.accept()
    with runtime.summary_hub.subscribe(accepts) as events:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_subscriptions, followed)
            nursery.start_soon(_close_on_shutdown, nursery.cancel_scope)
            async for event in events:
                with trio.move_on_after(runtime.settings.ws_send_timeout) as waited:
                    await websocket.send(orjson.dumps(frames.summary_push(event.message)).decode())
                if waited.cancelled_caught:  # a reader that takes nothing is let go
                    break
            nursery.cancel_scope.cancel()
    return None


async def _close_on_shutdown(scope: trio.CancelScope) -> None:
    await current_runtime().shutting_down.wait()
    with trio.move_on_after(1):
        await websocket.close(1001, "server shutting down")
    scope.cancel()


async def _read_subscriptions(followed: set[str]) -> None:
    """`{"subscribe": [chat ids]}` adds chats to follow; anything else gets an error frame."""
    while True:
        raw = await websocket.receive()
        try:
            data = orjson.loads(raw)
            ids = data["subscribe"]
            if not isinstance(ids, list) or not all(is_valid_id(i) for i in ids):
                raise ValueError
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            await websocket.send(orjson.dumps(frames.error("invalid_frame", 'send {"subscribe": [chat ids]}')).decode())
            continue
        if len(followed) + len(ids) > MAX_FOLLOWED:
            await websocket.send(orjson.dumps(frames.error("too_large", f"at most {MAX_FOLLOWED} chats per socket")
                                              ).decode())
            continue
        followed.update(ids)
