"""Admin pages and their JSON routes (original §2.4.3-2.4.4), behind HTTP Basic (`ktulhu/auth/admin.py`).

Every route here checks the admin first; failures answer 401 (with the Basic challenge), 429 when a
client failed too often, or 503 naming the fix when no credentials file exists. Pages are rendered
from autoescaping templates and carry a strict Content-Security-Policy; their script inserts data
with `textContent` only. Roles are spelled lower-case everywhere (the original's `Free|Paid|Admin`
in the device list is gone).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from quart import Blueprint, Response, request

from ..app_state import current_runtime
from ..auth.admin import check_admin
from ..auth.quota import generation_limit
from ..metrics import engine_panel, remote_workers
from ..nurseries.runtime import Runtime
from ..store.codec import to_dict
from ..store.records import Message, User
from .cors import refuse_cross_site_admin
from .errors import check_path_id, json_body, json_response, query_limit, raise_error
from .identity import client_address
from ..templates import render_page

__all__ = ["ROLES", "blueprint", "require_admin", "user_json"]

blueprint = Blueprint("admin", __name__)

ROLES = ("free", "paid", "admin")
RECENT_CHATS = 25
LAST_DEFAULT, LAST_MIN, LAST_MAX = 25, 1, 200

Handler = Callable[..., Awaitable[Any]]


def require_admin(handler: Handler) -> Handler:
    """Answer 401/429/503 unless the request carries the admin's HTTP Basic credentials."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        refuse_cross_site_admin()
        runtime = current_runtime()
        check = await check_admin(runtime.store, runtime.settings, request.headers.get("Authorization"),
                                  client_address())
        if check.status == 401:
            raise_error(401, "unauthorized", check.message or "unauthorized",
                        {"WWW-Authenticate": 'Basic realm="Internal"'})
        if check.status == 429:
            raise_error(429, "rate_limited", check.message, {"Retry-After": "60"})
        if check.status == 503:
            raise_error(503, "admin_not_configured", check.message)
        if not check.ok:
            raise_error(check.status, "unauthorized", check.message)
        return await handler(*args, **kwargs)

    return wrapper


def _runtime_store(runtime: Runtime) -> Any:
    if runtime.store is None:
        raise_error(503, "store_unavailable", "the store is not open yet")
    return runtime.store


def _email(user: User) -> str | None:
    if user.email:
        return user.email
    meta = user.meta if isinstance(user.meta, dict) else {}
    email = meta.get("email")
    return email if isinstance(email, str) else None


def _role(user: User) -> str:
    role = (user.role or "free").lower()
    return role if role in ROLES else "free"


def _quota(runtime: Runtime, user: User) -> dict[str, Any]:
    limit = generation_limit(runtime.settings, user)  # what `reserve` enforces, an operator key's cap included
    remaining = None if limit is None else max(0, limit - user.generation_count)
    return {
        "can_generate": limit is None or user.generation_count < limit,
        "generation_count": user.generation_count,
        "generation_limit": limit,
        "generations_remaining": remaining,
    }


def user_json(runtime: Runtime, user: User) -> dict[str, Any]:
    quota = _quota(runtime, user)
    return {
        "id": user.id, "name": user.name, "email": _email(user), "role": _role(user),
        "generation_count": quota["generation_count"], "generation_limit": quota["generation_limit"],
        "generations_remaining": quota["generations_remaining"], "created_ts": user.created_ts,
        "can_generate": quota["can_generate"], "stripe_customer_id": user.stripe_customer_id,
        "stripe_subscription_id": user.stripe_subscription_id,
    }


def _message_json(message: Message) -> dict[str, Any]:
    return to_dict(message)


# --- pages --------------------------------------------------------------------------------------


@blueprint.get("/internal/admin")
@require_admin
async def overview_page() -> Response:
    runtime = current_runtime()
    engine = runtime.engine.current
    workers = remote_workers(engine.stats()) if engine is not None else []
    return render_page("admin/overview.html", page="overview", title="Overview", workers=workers)


@blueprint.get("/internal/admin/devices")
@require_admin
async def devices_page() -> Response:
    return render_page("admin/devices.html", page="devices", title="Devices")


@blueprint.get("/internal/admin/messages")
@require_admin
async def messages_page() -> Response:
    return render_page("admin/messages.html", page="messages", title="Latest messages")


@blueprint.get("/internal/admin/chat/<chat_id>")
@require_admin
async def chat_page(chat_id: str) -> Response:
    check_path_id(chat_id, "chat id")
    return render_page("admin/chat.html", page="chat", title="Chat", chat_id=chat_id)


@blueprint.get("/internal/users")
@require_admin
async def users_page() -> Response:
    return render_page("admin/users.html", page="users", title="Users",
                       free_generations=current_runtime().settings.free_generations)


# --- JSON ---------------------------------------------------------------------------------------


def _overview(store: Any) -> dict[str, Any]:
    """One pass on a store thread: counts over users, devices, chats (with meta) and their messages
    (titles, stored as `summary` messages, are not counted as messages)."""
    users = store.list_users()
    devices = store.list_all_devices()
    chats = store.list_chats()
    total_messages = liked = 0
    rows = []
    for chat in chats:
        messages = store.list_messages_for_chat(chat.id)
        # a chat's title is stored as a `summary` message: it is not a message of the conversation
        summaries = [m for m in messages if m.role == "summary"]
        messages = [m for m in messages if m.role != "summary"]
        count = len(messages)
        liked_count = sum(1 for m in messages if m.liked)
        total_messages += count
        liked += liked_count
        rows.append({
            "chat_id": chat.id, "summary": summaries[-1].text if summaries else None,
            "title": chat.title, "device_hash": chat.device_hash, "user_id": chat.user_id,
            "message_count": count, "liked_count": liked_count, "updated_ts": chat.updated_ts,
        })
    rows.sort(key=lambda r: r["updated_ts"], reverse=True)
    return {
        "total_users": len(users), "total_devices": len(devices), "total_chats": len(chats),
        "total_messages": total_messages, "liked_messages": liked, "recent_chats": rows[:RECENT_CHATS],
    }


@blueprint.get("/internal/admin/overview")
@require_admin
async def overview() -> Response:
    runtime = current_runtime()
    store = _runtime_store(runtime)
    return json_response(await store.aio.run(_overview, store))


@blueprint.get("/internal/admin/engine")
@require_admin
async def engine() -> Response:
    return json_response(engine_panel(current_runtime()))


@blueprint.get("/internal/admin/doctor")
@require_admin
async def doctor() -> Response:
    """`ktulhu doctor --json` as this server sees itself (store lock and port are its own)."""
    return json_response((await current_runtime().doctor.report()).to_json())


@blueprint.get("/internal/admin/last")
@require_admin
async def last_messages() -> Response:
    limit = query_limit("limit", LAST_DEFAULT, LAST_MIN, LAST_MAX)
    store = _runtime_store(current_runtime())
    messages = await store.aio.list_recent_messages(limit)
    return json_response({"limit": limit, "count": len(messages), "messages": [_message_json(m) for m in messages]})


@blueprint.get("/internal/admin/devices/list")
@require_admin
async def devices_list() -> Response:
    runtime = current_runtime()
    store = _runtime_store(runtime)
    devices = await store.aio.list_all_devices()
    users = {u.id: u for u in await store.aio.list_users()}
    rows = []
    for device in sorted(devices, key=lambda d: d.last_seen_ts, reverse=True):
        user = users.get(device.user_id)
        rows.append({
            "id": device.id, "user_id": device.user_id,
            "user_name": user.name if user else None, "user_email": _email(user) if user else None,
            "user_role": _role(user) if user else None, "device_hash": device.device_hash,
            "created_ts": device.created_ts, "last_seen_ts": device.last_seen_ts, "meta": device.meta,
        })
    return json_response({"count": len(rows), "devices": rows})


@blueprint.get("/internal/users/list")
@require_admin
async def users_list() -> Response:
    runtime = current_runtime()
    store = _runtime_store(runtime)
    users = sorted(await store.aio.list_users(), key=lambda u: u.created_ts, reverse=True)
    return json_response({"count": len(users), "users": [user_json(runtime, u) for u in users]})


@blueprint.put("/internal/users/<user_id>/role")
@require_admin
async def set_role(user_id: str) -> Response:
    check_path_id(user_id, "user id")
    body = await json_body({"role": ((str,), True)})
    role = body["role"]
    if role not in ROLES:
        raise_error(422, "invalid_role", "`role` must be one of free, paid, admin")
    runtime = current_runtime()
    store = _runtime_store(runtime)
    user = await store.aio.update_user(user_id, lambda u: attrs.evolve(u, role=role))
    if user is None:
        raise_error(404, "user_not_found", f"no user {user_id}")
    return json_response({"user_id": user.id, "role": _role(user), **_quota(runtime, user)})


@blueprint.delete("/internal/users/<user_id>")
@require_admin
async def delete_user(user_id: str) -> Response:
    check_path_id(user_id, "user id")
    store = _runtime_store(current_runtime())
    await store.aio.delete_user(user_id)
    return json_response({"user_id": user_id, "deleted": True})
