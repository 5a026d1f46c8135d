"""Admin credentials: HTTP Basic checked against an argon2 hash kept in `KTULHU_ADMIN_AUTH_FILE`.

The file is `{"username": ..., "password_hash": "$argon2id$..."}`, written by
`ktulhu admin set-password`. A plaintext `password` (the original's format) is refused with a message
saying how to replace it. Wrong credentials are rate-limited per client address (see `check_admin`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..settings import Settings
from .ratelimit import retry_after_s, spend

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["AdminCheck", "AdminCredentials", "AdminConfigError", "check_admin", "load_admin_credentials",
           "write_admin_credentials"]

_hasher = PasswordHasher()
#: argon2 is deliberately slow; these bound how many verifications run at once.
_VERIFY_LIMIT = trio.CapacityLimiter(2)


class AdminConfigError(Exception):
    """The admin credentials file is missing or unusable; the message says how to fix it."""


@attrs.frozen
class AdminCredentials:
    username: str
    password_hash: str


@attrs.frozen
class AdminCheck:
    """The outcome of an admin check: `status` 200 on success, else the HTTP status to answer."""

    status: int
    message: str = ""
    #: Seconds until a 429 may be retried (0 otherwise).
    retry_after: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


def load_admin_credentials(path: Path) -> AdminCredentials:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdminConfigError(
            f"admin credentials not configured: no file at {path}; run `ktulhu admin set-password`"
        ) from None
    except (OSError, ValueError) as exc:
        raise AdminConfigError(f"admin credentials file {path} is unreadable ({exc}); "
                               "run `ktulhu admin set-password` to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("username"), str) or not data["username"]:
        raise AdminConfigError(f"{path} has no `username`; run `ktulhu admin set-password`")
    hashed = data.get("password_hash")
    if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
        raise AdminConfigError(
            f"{path} holds no argon2 `password_hash` (plaintext passwords are not accepted); "
            "run `ktulhu admin set-password`"
        )
    return AdminCredentials(data["username"], hashed)


def write_admin_credentials(path: Path, username: str, password: str) -> AdminCredentials:
    """Hash `password` and write the file atomically, readable by its owner only."""
    creds = AdminCredentials(username, _hasher.hash(password))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    # Created 0600 from the start: the hash is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(attrs.asdict(creds)) + "\n")
    tmp.replace(path)
    return creds


def _basic(authorization: str | None) -> tuple[str, str] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or len(encoded) > 4096:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _verify(creds: AdminCredentials, user: str, password: str) -> bool:
    # Both comparisons always run, so timing does not tell which part was wrong.
    name_ok = hmac.compare_digest(user.encode(), creds.username.encode())
    try:
        password_ok = _hasher.verify(creds.password_hash, password)
    except (VerificationError, InvalidHashError):
        password_ok = False
    return name_ok and password_ok


async def check_admin(store: Store, settings: Settings, authorization: str | None, client: str) -> AdminCheck:
    """Check HTTP Basic credentials.

    Lockout rules (why: a lock that anyone can trigger is a way to lock the admin out):
    - a missing or malformed header is a 401 challenge that spends nothing (it guesses nothing);
    - only a well-formed user:password pair that is wrong spends one token of `client`'s budget
      (`KTULHU_ADMIN_RATE` per minute); a right one gives its token back;
    - an address whose budget is empty gets 429, even with the right password (otherwise the lock
      would still let it guess); every other address is unaffected.
    The token is taken before the password is verified, so concurrent guesses cannot exceed the budget.
    """
    try:
        creds = load_admin_credentials(settings.path(settings.admin_auth_file))
    except AdminConfigError as exc:
        return AdminCheck(503, str(exc))
    pair = _basic(authorization)
    if pair is None:
        return AdminCheck(401, "unauthorized")
    decision = await spend(store, "admin", client, settings.admin_rate)
    if decision is not None and not decision.allowed:
        return AdminCheck(429, "too many failed admin sign-ins; try again later", retry_after=retry_after_s(decision))
    async with _VERIFY_LIMIT:
        ok = await trio.to_thread.run_sync(_verify, creds, *pair)
    if not ok:
        return AdminCheck(401, "unauthorized")
    await spend(store, "admin", client, settings.admin_rate, cost=-1)  # a right password spends nothing
    return AdminCheck(200)
