"""The store's exceptions: each says what went wrong and what the caller can do about it."""

from __future__ import annotations

__all__ = [
    "CorruptRecord",
    "IdentityTaken",
    "InvalidId",
    "StoreClosedError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
]


class StoreError(Exception):
    """The store cannot be used; the message says why and what to do."""


class StoreLockedError(StoreError):
    """Another process holds the RocksDB lock on this directory."""


class StoreWriteError(StoreError):
    """RocksDB refused a write (disk full, I/O error). It then refuses every write until the store is
    reopened (`Store.recover`); reads keep working."""


class StoreClosedError(StoreError):
    """An operation was called after `Store.close()`."""


class InvalidId(StoreError, ValueError):
    """An id would not make a safe key: it must match `[A-Za-z0-9_-]{1,128}` and not be reserved.

    Raised before anything is read or written, so a hostile id never reaches a key.
    """


class IdentityTaken(StoreError):
    """`save_user` would give a user an email or provider id that another user already has.

    ``kind`` is ``"email"`` or ``"provider"``; ``owner_id`` is the user who has it.
    """

    def __init__(self, kind: str, value: str, owner_id: str) -> None:
        super().__init__(f"{kind} {value!r} already belongs to user {owner_id}")
        self.kind = kind
        self.value = value
        self.owner_id = owner_id


class CorruptRecord(StoreError, ValueError):
    """A stored value does not decode into its record; reads log, count and skip it."""
