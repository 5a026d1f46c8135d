"""User and device operations: users found by email and provider id, devices by hash, through indexes.

Emails (normalised: trimmed, lower-case) and provider ids (``google:<sub>``, ``apple:<sub>``,
``email:<addr>``) are unique: `save_user` raises `IdentityTaken` rather than give a second user one
that another user already has. Changes to these indexes are serialised by one identity lock, so two
registrations with the same email cannot both succeed.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable
from contextlib import nullcontext

import attrs

from . import keys
from .codec import encode
from .core import StoreCore
from .errors import IdentityTaken, InvalidId
from .keys import check_id, is_valid_id
from .kv import Puts
from .records import User, UserDevice, now_ms


__all__ = ["QuotaResult", "UserOps", "index_user", "normalise_email"]

log = logging.getLogger("ktulhu.store")


def normalise_email(email: str) -> str:
    """The original's normalisation: trimmed and lower-cased."""
    return email.strip().lower()


@attrs.frozen
class QuotaResult:
    """What `increment_generation_count` did: ``allowed`` False means the limit was reached and the
    count is unchanged; ``generation_count`` is the count after the call (None: no such user)."""

    allowed: bool
    generation_count: int | None


def _identities(user: User | None) -> dict[bytes, tuple[str, str]]:
    """Index key -> (kind, value) of every identity the user has that can be indexed."""
    if user is None:
        return {}
    found: dict[bytes, tuple[str, str]] = {}
    if isinstance(user.email, str) and user.email.strip():
        email = normalise_email(user.email)
        try:
            found[keys.ix_user_email(email)] = ("email", email)
        except InvalidId:
            pass
    for provider_id in user.provider_ids():
        try:
            found[keys.ix_user_provider(provider_id)] = ("provider", provider_id)
        except InvalidId:
            pass
    return found


class UserOps(StoreCore):
    """Mixin of `Store`: every method is synchronous, thread-safe and validates its ids first."""

    # --- users ---------------------------------------------------------------------------------

    def save_user(self, user: User) -> User:
        """Store the user and its email/provider index entries atomically.

        Raises `IdentityTaken` when a newly given email or provider id belongs to another user."""
        check_id(user.id, "user id")
        with self._locks.hold("user:" + user.id):
            old = self._load(User, keys.user_key(user.id))
            self._put_user(user, old)
        return user

    def update_user(self, user_id: str, change: Callable[[User], User]) -> User | None:
        """Read-modify-write the user under its lock (role, credentials, OAuth merge...); None when
        the user does not exist. `IdentityTaken` as for `save_user` (nothing written then)."""
        check_id(user_id, "user id")
        with self._locks.hold("user:" + user_id):
            old = self._load(User, keys.user_key(user_id))
            if old is None:
                return None
            new = change(_copy(old))
            new.id = user_id
            self._put_user(new, old)
            return new

    def increment_generation_count(self, user_id: str, *, limit: int | None = None, by: int = 1) -> QuotaResult:
        """Atomically check the quota and add `by` to ``generation_count``.

        With a `limit`, an increment that would pass it is refused (``allowed=False``, count
        unchanged). A negative `by` refunds (never below 0). Concurrent calls never lose an update."""
        check_id(user_id, "user id")
        with self._locks.hold("user:" + user_id):
            user = self._load(User, keys.user_key(user_id))
            if user is None:
                return QuotaResult(allowed=False, generation_count=None)
            new_count = max(0, user.generation_count + by)
            if by > 0 and limit is not None and new_count > limit:
                return QuotaResult(allowed=False, generation_count=user.generation_count)
            user.generation_count = new_count
            batch = self.batch()
            batch.put(keys.user_key(user_id), encode(user))
            self.write(batch)
            return QuotaResult(allowed=True, generation_count=new_count)

    def load_user(self, user_id: str) -> User | None:
        """The user, or None when missing (or corrupt: logged and counted)."""
        check_id(user_id, "user id")
        return self._load(User, keys.user_key(user_id))

    def list_users(self) -> list[User]:
        """Every user (admin use)."""
        return [u for k, v in self.scan(keys.USER) if (u := self.decode_or_skip(User, k, v)) is not None]

    def find_user_by_email(self, email: str) -> User | None:
        """The user with this email (normalised), through the index."""
        if not isinstance(email, str) or not email.strip():
            return None
        return self._user_by_index(keys.ix_user_email(normalise_email(email)))

    def find_user_by_provider(self, provider_id: str) -> User | None:
        """The user who signs in with `provider_id` (``google:<sub>``...), through the index."""
        return self._user_by_index(keys.ix_user_provider(provider_id))

    def delete_user(self, user_id: str) -> bool:
        """Delete the user, its devices (and their lookups), its API keys and its index entries.

        Chats and messages are kept (as the original did). False when the user did not exist."""
        check_id(user_id, "user id")
        with self._locks.hold("user:" + user_id), self._locks.identity:
            old = self._load(User, keys.user_key(user_id))
            existed = self.get(keys.user_key(user_id)) is not None
            batch = self.batch()
            batch.delete(keys.user_key(user_id))
            for key, _ in _identities(old).items():
                if self.get(key) == user_id.encode():
                    batch.delete(key)
            for key, raw in self.scan(keys.user_device_prefix(user_id)):
                batch.delete(key)
                device = self.decode_or_skip(UserDevice, key, raw)
                if device is not None and is_valid_id(device.device_hash):
                    batch.delete(keys.ix_device(device.device_hash, user_id, device.id))
                    if self.get(keys.device_lookup_key(device.device_hash)) == user_id.encode():
                        batch.delete(keys.device_lookup_key(device.device_hash))
            for key, raw in self.scan(keys.ix_user_apikey_prefix(user_id)):
                batch.delete(key)
                batch.delete(keys.apikey_key(raw.decode(errors="replace")))
            self.write(batch)
            return existed

    # --- devices -------------------------------------------------------------------------------

    def add_device_for_user(self, user_id: str, device_hash: str, *, now: int | None = None) -> UserDevice:
        """Register a sign-in from `device_hash`: the user's existing record for that hash gets
        ``last_seen_ts`` updated, else a new one is created; ``device_lookup`` points at the user."""
        check_id(user_id, "user id")
        check_id(device_hash, "device hash")
        now = now_ms() if now is None else now
        with self._locks.hold("user:" + user_id):
            device = None
            for _, target in self.scan(keys.ix_device_prefix(device_hash, user_id)):
                device = self._load(UserDevice, target)
                if device is not None:
                    break
            if device is None:
                device = UserDevice(id=str(uuid.uuid4()), user_id=user_id, device_hash=device_hash,
                                    created_ts=now, last_seen_ts=now)
            else:
                device.last_seen_ts = now
            record_key = keys.user_device_key(user_id, device.id)
            batch = self.batch()
            batch.put(record_key, encode(device))
            batch.put(keys.ix_device(device_hash, user_id, device.id), record_key)
            batch.put(keys.device_lookup_key(device_hash), user_id.encode())
            self.write(batch)
            return device

    def list_devices_for_user(self, user_id: str) -> list[UserDevice]:
        check_id(user_id, "user id")
        return [d for k, v in self.scan(keys.user_device_prefix(user_id))
                if (d := self.decode_or_skip(UserDevice, k, v)) is not None]

    def list_all_devices(self) -> list[UserDevice]:
        """Every registered device (admin use)."""
        return [d for k, v in self.scan(keys.USER_DEVICE) if (d := self.decode_or_skip(UserDevice, k, v)) is not None]

    def find_devices_by_hash(self, device_hash: str) -> list[UserDevice]:
        """Every user's device record for this hash, through the index."""
        check_id(device_hash, "device hash")
        targets = [t for _, t in self.scan(keys.ix_device_prefix(device_hash))]
        found = []
        for target, raw in zip(targets, self.get_many(targets)):
            device = self.decode_or_skip(UserDevice, target, raw)
            if device is None:
                self._count("stale")
            else:
                found.append(device)
        return found

    def user_id_for_device(self, device_hash: str) -> str | None:
        """The last user who signed in from this device (``device_lookup``), or None."""
        check_id(device_hash, "device hash")
        raw = self.get(keys.device_lookup_key(device_hash))
        return None if raw is None else raw.decode(errors="replace")

    # --- internals -----------------------------------------------------------------------------

    def _user_by_index(self, index_key: bytes) -> User | None:
        raw = self.get(index_key)
        if raw is None:
            return None
        user_id = raw.decode(errors="replace")
        if not is_valid_id(user_id):
            return None
        user = self._load(User, keys.user_key(user_id))
        if user is None:
            self._count("stale")
        return user

    def _put_user(self, user: User, old: User | None, *, also: list[tuple[bytes, bytes]] = ()) -> None:
        """Write the user and its identity index changes (caller holds the user's lock), plus the
        records in `also`, all in one batch."""
        old_ids, new_ids = _identities(old), _identities(user)
        changed = old_ids.keys() != new_ids.keys()
        with self._locks.identity if changed else nullcontext():
            batch = self.batch()
            me = user.id.encode()
            for key, (kind, value) in new_ids.items():
                if key in old_ids:
                    continue
                owner = self.get(key)
                if owner is not None and owner != me:
                    owner_id = owner.decode(errors="replace")
                    if self.get(keys.user_key(owner_id)) is not None:
                        raise IdentityTaken(kind, value, owner_id)
                batch.put(key, me)
            for key in old_ids.keys() - new_ids.keys():
                if self.get(key) == me:
                    batch.delete(key)
            batch.put(keys.user_key(user.id), encode(user))
            for key, value in also:
                batch.put(key, value)
            self.write(batch)


def index_user(out: Puts, user: User, taken: dict[bytes, bytes]) -> int:
    """Migration: index a user's identities unless an earlier user already has them (`taken`: index
    key -> user id so far); returns how many were already taken (logged)."""
    conflicts = 0
    for key, (kind, value) in _identities(user).items():
        if key in taken:
            conflicts += 1
            log.warning("user %s shares %s with user %s; only the earlier one is indexed",
                        user.id, kind, taken[key].decode(errors="replace"))
            continue
        taken[key] = user.id.encode()
        out.put(key, taken[key])
    return conflicts


def _copy(user: User) -> User:
    return attrs.evolve(user, meta=copy.deepcopy(user.meta), extra=dict(user.extra))
