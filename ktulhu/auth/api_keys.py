"""API keys: `ktk_<key id>_<secret>`, shown once at creation, stored as a SHA-256 of the secret.

The secret is 256 random bits, so a fast hash is enough (no dictionary to attack) and lets every
request verify a key without the cost of a password hash. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid

from ..store import Store
from ..store.records import ApiKey, User, now_ms

__all__ = ["KEY_PREFIX", "MAX_LIVE_KEYS", "TooManyKeys", "authenticate_key", "create_key", "key_id_of",
           "list_keys", "looks_like_key", "revoke_all_keys", "revoke_key", "split_key"]

#: Live (unrevoked) keys one user may hold.
MAX_LIVE_KEYS = 50


class TooManyKeys(Exception):
    """The user already holds `MAX_LIVE_KEYS` live keys."""

KEY_PREFIX = "ktk_"
_KEY = re.compile(r"ktk_([0-9a-f]{32})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"ktk_([0-9a-f]{32})")
_ID = re.compile(r"[0-9a-f]{32}")


def looks_like_key(credential: str) -> bool:
    return credential.startswith(KEY_PREFIX)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(store: Store, user_id: str, name: str | None = None, *, legacy: bool = False,
               limit: int | None = None) -> tuple[ApiKey, str]:
    """Store a new key for `user_id`; returns the record and the full key (the only time it exists).

    `legacy` marks a key made by `/external/api/credentials/generate` (the previous one is revoked
    by that route). With `limit`, raises `TooManyKeys` when the user already holds that many live keys."""
    if limit is not None and sum(not k.revoked for k in store.list_api_keys_for_user(user_id)) >= limit:
        raise TooManyKeys(f"a user may hold at most {limit} live API keys; revoke one first")
    key_id = uuid.uuid4().hex
    secret = secrets.token_urlsafe(32)
    record = ApiKey(id=key_id, user_id=user_id, secret_hash=_digest(secret), created_ts=now_ms(), name=name,
                    extra={"legacy": True} if legacy else {})
    store.save_api_key(record)
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


def split_key(full_key: str) -> tuple[str, str]:
    """`ktk_<id>_<secret>` -> (`ktk_<id>`, `<secret>`): the legacy routes' `api_key`/`api_secret` halves."""
    match = _KEY.fullmatch(full_key)
    if match is None:
        raise ValueError("not an API key")
    return f"{KEY_PREFIX}{match.group(1)}", match.group(2)


def key_id_of(value: str) -> str | None:
    """The key id of a full key or of its `ktk_<id>` half; None when it is neither."""
    match = _KEY.fullmatch(value) or _KEY_ID.fullmatch(value)
    return match.group(1) if match else None


def list_keys(store: Store, user_id: str) -> list[ApiKey]:
    """The user's keys (revoked ones included), oldest first."""
    return sorted(store.list_api_keys_for_user(user_id), key=lambda k: (k.created_ts, k.id))


def revoke_key(store: Store, user_id: str, key_id: str) -> ApiKey | None:
    """Revoke the user's key `key_id` (idempotent); None when the user has no such key."""
    if not _ID.fullmatch(key_id):
        return None
    record = store.load_api_key(key_id)
    if record is None or record.user_id != user_id:
        return None
    if not record.revoked:
        record.revoked = True
        store.save_api_key(record)
    return record


def revoke_all_keys(store: Store, user_id: str, *, legacy_only: bool = False) -> int:
    """Revoke every live key of the user (or only those of the legacy credential routes)."""
    count = 0
    for record in store.list_api_keys_for_user(user_id):
        if record.revoked or (legacy_only and record.extra.get("legacy") is not True):
            continue
        record.revoked = True
        store.save_api_key(record)
        count += 1
    return count


def authenticate_key(store: Store, credential: str) -> User | None:
    """The user a live key belongs to, or None (unknown, revoked, malformed, owner deleted)."""
    match = _KEY.fullmatch(credential)
    if match is None:
        return None
    key_id, secret = match.groups()
    record = store.load_api_key(key_id)
    if record is None or record.revoked:
        return None
    if not hmac.compare_digest(record.secret_hash, _digest(secret)):
        return None
    return store.load_user(record.user_id)
