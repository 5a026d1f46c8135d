"""Passwords and emails of email sign-in: argon2id hashes, the registration policy, and checks that
take the same time whether or not the account exists.

Hashing and verifying run on worker threads (argon2 is deliberately slow, ~50 ms) and at most
`VERIFY_THREADS` at a time, so a burst of sign-ins can neither stall the trio loop nor take every
CPU.
"""

from __future__ import annotations

import re

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..store.records import User
from ..store.users import normalise_email

__all__ = ["MAX_EMAIL", "MAX_PASSWORD", "PolicyError", "check_new_password", "hash_password",
           "normalise_email", "stored_hash", "valid_email", "verify_password"]

MAX_EMAIL = 254
#: Longest password accepted; longer ones are refused before any hashing work.
MAX_PASSWORD = 1024
VERIFY_THREADS = 2

_hasher = PasswordHasher()
_limit: dict[int, trio.CapacityLimiter] = {}
#: Verified when the account does not exist or has no password, so that answer takes as long as a
#: wrong password does (no account enumeration by timing).
_DUMMY_HASH = _hasher.hash("ktulhu-no-such-account")

# A practical address check: one @, a dot-separated domain of letters/digits/hyphens with a
# letter TLD (or IDN punycode), no spaces or control characters. Deliverability is not checked.
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_TLD = re.compile(r"(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})")


class PolicyError(ValueError):
    """A registration value breaks the policy; `code` is the error code, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def valid_email(email: str) -> bool:
    """True for a syntactically usable address (already normalised: trimmed, lower-case)."""
    if not email or len(email) > MAX_EMAIL or email.count("@") != 1:
        return False
    local, domain = email.split("@")
    if len(local) > 64 or not _LOCAL.fullmatch(local):
        return False
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        return False
    return bool(_TLD.fullmatch(labels[-1]))


def check_new_password(password: str, min_length: int) -> None:
    """Raise `PolicyError` unless `password` may be set at registration."""
    if len(password) < min_length:
        raise PolicyError("weak_password", f"the password must be at least {min_length} characters long")
    if len(password) > MAX_PASSWORD:
        raise PolicyError("invalid_password", f"the password must be at most {MAX_PASSWORD} characters long")
    if "\x00" in password:
        raise PolicyError("invalid_password", "the password must not contain NUL characters")


def stored_hash(user: User | None) -> str | None:
    """The user's password hash: the field, else the original's legacy `meta.password_hash`."""
    if user is None:
        return None
    if isinstance(user.password_hash, str) and user.password_hash:
        return user.password_hash
    meta = user.meta if isinstance(user.meta, dict) else {}
    legacy = meta.get("password_hash")
    return legacy if isinstance(legacy, str) and legacy else None


def _limiter() -> trio.CapacityLimiter:
    # One limiter per trio run (tests start many runs; a limiter belongs to the run that made it).
    token = id(trio.lowlevel.current_trio_token())
    limiter = _limit.get(token)
    if limiter is None:
        _limit.clear()
        limiter = _limit[token] = trio.CapacityLimiter(VERIFY_THREADS)
    return limiter


async def hash_password(password: str) -> str:
    return await trio.to_thread.run_sync(_hasher.hash, password, limiter=_limiter())


def _verify(hashed: str | None, password: str) -> bool:
    try:
        return _hasher.verify(hashed or _DUMMY_HASH, password) and hashed is not None
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(hashed: str | None, password: str) -> bool:
    """True when `password` matches `hashed`; a None hash costs a full verification and is False."""
    if len(password) > MAX_PASSWORD:
        hashed, password = None, ""
    return await trio.to_thread.run_sync(_verify, hashed, password, limiter=_limiter())
