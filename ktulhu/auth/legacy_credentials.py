"""The original's credential pair (`/external/api/credentials*`), without plaintext secrets.

The pair lives on the user record as it did (`api_key`, `api_secret`), but hashed: `api_key` as
``sha256:<hex>``, `api_secret` as an argon2id hash (a caller may choose a weak secret, so it gets a
password hash). Records written by the original still hold plaintext; they are compared in
constant time and rewritten hashed on the first successful validation.
"""

from __future__ import annotations

import hashlib
import hmac

from ..store.records import User
from .passwords import hash_password, verify_password

__all__ = ["KEY_HASH_PREFIX", "is_hashed", "hash_pair", "matches"]

KEY_HASH_PREFIX = "sha256:"


def _key_digest(api_key: str) -> str:
    return KEY_HASH_PREFIX + hashlib.sha256(api_key.encode()).hexdigest()


def is_hashed(user: User) -> bool:
    return (isinstance(user.api_key, str) and user.api_key.startswith(KEY_HASH_PREFIX)
            and isinstance(user.api_secret, str) and user.api_secret.startswith("$argon2"))


async def hash_pair(api_key: str, api_secret: str) -> tuple[str, str]:
    """The values stored on the user for this pair."""
    return _key_digest(api_key), await hash_password(api_secret)


async def matches(user: User, api_key: str, api_secret: str) -> bool:
    """True when the pair equals the one stored on `user` (hashed, or the original's plaintext)."""
    if is_hashed(user):
        key_ok = hmac.compare_digest(user.api_key.encode(), _key_digest(api_key).encode())  # type: ignore[union-attr]
        secret_ok = await verify_password(user.api_secret, api_secret)
        return key_ok and secret_ok
    stored_key, stored_secret = user.api_key or "", user.api_secret or ""
    key_ok = hmac.compare_digest(stored_key.encode(), api_key.encode())
    secret_ok = hmac.compare_digest(stored_secret.encode(), api_secret.encode())
    return bool(stored_key and stored_secret) and key_ok and secret_ok
