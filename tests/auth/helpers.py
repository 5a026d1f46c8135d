"""Small helpers for the HTTP tests of sign-in and the integrator APIs."""

from __future__ import annotations

import uuid

import httpx

from ktulhu.auth.tokens import issue_token
from ktulhu.store.records import User, now_ms


def make_user(runtime, role: str = "free", **fields) -> tuple[User, str]:
    """A user saved straight into the store, and an app JWT for it."""
    user = User(id=str(uuid.uuid4()), created_ts=now_ms(), role=role, **fields)
    runtime.store.save_user(user)
    return user, issue_token(runtime.settings, user.id)


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def client(server, *, source: str | None = None, timeout: float = 60) -> httpx.AsyncClient:
    """A client of `server`; `source` picks the loopback address requests come from (127.0.0.x)."""
    transport = httpx.AsyncHTTPTransport(local_address=source) if source else None
    return httpx.AsyncClient(base_url=server.url, timeout=timeout, transport=transport)


def snapshot(runtime) -> list[tuple]:
    """Every user's observable state, to show that a refused request changed nothing."""
    store = runtime.store
    out = []
    for user in sorted(store.list_users(), key=lambda u: u.id):
        keys = sorted((k.id, k.revoked) for k in store.list_api_keys_for_user(user.id))
        devices = sorted(d.device_hash for d in store.list_devices_for_user(user.id))
        out.append((user.id, user.email, user.password_hash, user.api_key, user.api_secret, user.generation_count,
                    user.role, repr(user.meta), tuple(keys), tuple(devices)))
    return out
