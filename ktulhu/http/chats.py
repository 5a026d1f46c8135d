"""Chat REST routes (original §2.4.2), now authorised (`ktulhu/chat/access.py`).

A chat id in the path is checked first (400 for an unsafe id). The caller is resolved from the
`Authorization` header: HTTP Basic = the admin (every chat), Bearer = a user (their chats and
anonymous ones), none = anonymous (anonymous chats only, by id). A chat of another account is 403;
a chat that does not exist reads as empty, as in the original; one whose record cannot be read is
403 for everyone but the admin. A device listing shows a signed-in user only their own chats on it
(a device hash proves nothing); the admin or `KTULHU_OPEN_LISTINGS=1` sees every chat. Listings by
user need that user or the admin. `POST /api/chats/claim` gives a signed-in user the anonymous chats whose ids they
hold.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from ..app_state import current_runtime
from ..auth.principal import Principal
from ..chat.access import ChatForbidden, chat_for, listable_chats, lists_everything
from ..chat.hub import SummaryEvent
from ..store import Store
from ..store.codec import to_dict
from ..store.errors import CorruptRecord
from ..store.keys import is_valid_id
from ..store.records import Chat
from .errors import check_path_id, json_body, json_response, raise_error
from .identity import request_principal

__all__ = ["blueprint"]

blueprint = Blueprint("chats", __name__)

#: Longest summary a caller may set.
MAX_SUMMARY_CHARS = 500
#: Most chats one claim request may name.
MAX_CLAIM = 200


def _store() -> Store:
    store = current_runtime().store
    if store is None:
        raise_error(503, "not_ready", "the store is not open yet")
    return store


async def _chat_for(chat_id: str) -> tuple[Principal, Chat | None]:
    """The caller and the chat, or 401/403 (an unknown chat is None: anyone may see it is empty)."""
    check_path_id(chat_id, "chat id")
    principal = await request_principal()
    try:
        return principal, await chat_for(current_runtime().store, principal, chat_id)
    except ChatForbidden as forbidden:
        raise_error(403, "chat_forbidden", str(forbidden))


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    return [to_dict(m) for m in messages]


@blueprint.get("/internal/chat-thread/<chat_id>")
@blueprint.get("/chat-thread/<chat_id>")
async def get_thread(chat_id: str) -> Response:
    await _chat_for(chat_id)
    messages = await _store().aio.list_messages_for_chat(chat_id)
    return json_response({"chat_id": chat_id, "messages": _messages(messages), "source": "db"})


@blueprint.get("/api/chats/<chat_id>/messages")
async def get_chat_messages(chat_id: str) -> Response:
    await _chat_for(chat_id)
    messages = await _store().aio.list_messages_for_chat(chat_id)
    return json_response({"chat_id": chat_id, "messages": _messages(messages)})


@blueprint.delete("/internal/chat-thread/<chat_id>")
@blueprint.delete("/chat-thread/<chat_id>")
async def delete_thread(chat_id: str) -> Response:
    await _chat_for(chat_id)
    await _store().aio.delete_thread(chat_id)
    return json_response({"chat_id": chat_id, "deleted": True, "source": ["memory", "db"]})


@blueprint.put("/internal/chat-thread/<chat_id>/summary")
@blueprint.put("/chat-thread/<chat_id>/summary")
async def put_summary(chat_id: str) -> Response:
    _, chat = await _chat_for(chat_id)
    body = await json_body({"summary": ((str,), True), "language": ((str, None), False)})
    summary = body["summary"].strip()
    language = body.get("language")
    if not summary or len(summary) > MAX_SUMMARY_CHARS or (language is not None and len(language) > 32):
        error = "summary cannot be empty" if not summary else (
            f"summary longer than {MAX_SUMMARY_CHARS} characters" if len(summary) > MAX_SUMMARY_CHARS
            else "language must be a short code such as en")
        return json_response({"chat_id": chat_id, "updated": False, "error": error}, 422)
    if chat is None:
        return json_response({"chat_id": chat_id, "updated": False, "error": "chat_not_found"}, 404)
    store = _store()
    message = await store.aio.replace_summary(chat_id, summary, language=language)
    chat = await store.aio.touch_chat(chat_id)
    current_runtime().summary_hub.publish(SummaryEvent(chat, message))
    return json_response({"chat_id": chat_id, "summary_id": message.id, "updated": True})


@blueprint.delete("/internal/chat-thread/<chat_id>/message/<message_id>")
@blueprint.delete("/chat-thread/<chat_id>/message/<message_id>")
async def delete_message(chat_id: str, message_id: str) -> Response:
    await _chat_for(chat_id)
    check_path_id(message_id, "message id")
    if not await _store().aio.delete_message(chat_id, message_id):
        return json_response({"chat_id": chat_id, "message_id": message_id, "deleted": False,
                              "error": "message_not_found"}, 404)
    return json_response({"chat_id": chat_id, "message_id": message_id, "deleted": True})


@blueprint.put("/internal/chat-thread/<chat_id>/message/<message_id>/liked")
@blueprint.put("/chat-thread/<chat_id>/message/<message_id>/liked")
async def put_liked(chat_id: str, message_id: str) -> Response:
    await _chat_for(chat_id)
    check_path_id(message_id, "message id")
    liked = (await json_body({"liked": ((bool,), True)}))["liked"]
    if not await _store().aio.set_message_liked(chat_id, message_id, liked):
        return json_response({"chat_id": chat_id, "message_id": message_id, "updated": False,
                              "error": "message_not_found"}, 404)
    return json_response({"chat_id": chat_id, "message_id": message_id, "liked": liked, "updated": True})


async def _device_chats(device_hash: str) -> list[Chat]:
    """The device's chats the caller may list: all for the admin (or single-user mode), else only
    the caller's own. A device hash is self-asserted, so it never unlocks anonymous chats."""
    check_path_id(device_hash, "device hash")
    principal = await request_principal()
    runtime = current_runtime()
    if principal.user_id is None and not lists_everything(runtime.settings, principal):
        raise_error(401, "login_required", "listing a device's chats needs a signed-in user (their own chats "
                                           "on it) or admin credentials")
    return listable_chats(runtime.settings, principal, await _store().aio.list_chats_for_device(device_hash))


@blueprint.get("/internal/chats/by-device/<device_hash>")
async def chats_by_device(device_hash: str) -> Response:
    chats = await _device_chats(device_hash)
    store = _store()
    entries = []
    for chat in chats:
        summary = await store.aio.chat_summary(chat.id)
        entries.append({"chat_id": chat.id, "title": chat.title, "summary": summary.text if summary else None,
                        "user_id": chat.user_id, "device_hash": chat.device_hash,
                        "updated_ts": chat.updated_ts, "meta": chat.meta})
    return json_response({"device_hash": device_hash, "chats": entries})


@blueprint.get("/internal/messages/by-device/<device_hash>")
@blueprint.get("/messages/by-device/<device_hash>")
async def messages_by_device(device_hash: str) -> Response:
    visible = {c.id for c in await _device_chats(device_hash)}
    messages = [m for m in await _store().aio.list_messages_for_device(device_hash) if m.chat_id in visible]
    return json_response({"device_hash": device_hash, "messages": _messages(messages)})


@blueprint.get("/internal/chats/by-user/<user_id>")
async def chats_by_user(user_id: str) -> Response:
    check_path_id(user_id, "user id")
    principal = await request_principal()
    if not principal.is_admin and principal.user_id != user_id:
        if principal.user_id is None:
            raise_error(401, "login_required", "sign in as this user, or use admin credentials")
        raise_error(403, "user_forbidden", "you may list only your own chats")
    # the original's definition (owned plus the chats of the user's devices) is the admin's view;
    # a user sees the chats they own: a device they signed in on proves nothing about its chats
    store = _store()
    if lists_everything(current_runtime().settings, principal):
        chats = await store.aio.list_chats_for_user(user_id)
    else:
        chats = await store.aio.list_chats_owned_by(user_id)
    # `id` is the original's raw Chat field (kept: clients of the original read it); `chat_id` is
    # the name every other listing uses.
    entries = [{**to_dict(c), "chat_id": c.id} for c in chats]
    return json_response({"user_id": user_id, "count": len(chats), "chats": entries})


@blueprint.post("/api/chats/claim")
async def claim_chats() -> Response:
    """A signed-in user takes over anonymous chats whose ids they hold (the chat page does this at
    sign-in with the chats this browser made). An anonymous chat's id is the capability to read,
    continue, rename and delete it, so holding it may also make it yours; after that it is yours
    alone. Chats of another account are never taken (`forbidden`), unknown ids are reported
    (`not_found`), and one request claims at most `MAX_CLAIM` chats."""
    principal = await request_principal()
    user_id = principal.user_id
    if user_id is None:
        raise_error(401, "login_required", "claiming chats needs a signed-in user (Authorization: Bearer ...)")
    body = await json_body({"chat_ids": ((list,), True)}, max_bytes=64 * 1024)
    chat_ids = body["chat_ids"]
    if not all(isinstance(c, str) and is_valid_id(c) for c in chat_ids):
        raise_error(422, "invalid_body", "`chat_ids` must be chat ids (1-128 characters from A-Z a-z 0-9 _ -)")
    chat_ids = list(dict.fromkeys(chat_ids))
    if len(chat_ids) > MAX_CLAIM:
        raise_error(422, "too_many", f"at most {MAX_CLAIM} chats per request")
    store = _store()

    def adopt(chat: Chat) -> Chat:  # under the chat's lock: only a chat that is still nobody's
        if chat.user_id is None:
            chat.user_id = user_id
        return chat

    result: dict[str, list[str]] = {"claimed": [], "already_yours": [], "forbidden": [], "not_found": []}
    for chat_id in chat_ids:
        try:
            chat = await store.aio.load_chat(chat_id, strict=True)
        except CorruptRecord:
            result["forbidden"].append(chat_id)  # fails closed, like every other access
            continue
        if chat is None:
            result["not_found"].append(chat_id)
        elif chat.user_id == user_id:
            result["already_yours"].append(chat_id)
        elif chat.user_id is not None:
            result["forbidden"].append(chat_id)
        else:
            updated = await store.aio.update_chat(chat_id, adopt)
            if updated is None:
                result["not_found"].append(chat_id)  # deleted meanwhile
            elif updated.user_id == user_id:
                result["claimed"].append(chat_id)
            else:
                result["forbidden"].append(chat_id)  # someone else claimed it first
    return json_response({"user_id": user_id, **result})
