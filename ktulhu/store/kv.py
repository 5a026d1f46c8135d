"""The key-value core every record operation runs on, and the two engines that provide it.

The operations (`messages`, `chats`, `users`, `accounts`, `migrate`) see ordered raw-bytes keys and
values and nothing else: point reads, atomic write batches, prefix scans in key order (or reversed),
and named locks for read-modify-write. `KV` is that contract; `rocks.RocksKV` (an embedded RocksDB
directory) and `postgres.PostgresKV` (one ``kv(k bytea PRIMARY KEY, v bytea)`` table, shared by
several server processes) implement it. bytea sorts bytewise, like RocksDB's default comparator, so
the key layout (`keys.py`), its prefixes and reverse scans mean the same on both engines.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol

__all__ = ["KV", "Batch", "KeyLocks", "Puts", "upper_bound"]


class Puts(Protocol):
    """Where index entries go: a `Batch`, or the migration's writer that commits every so many."""

    def put(self, key: bytes, value: bytes) -> None: ...


class Batch(Puts, Protocol):
    """Writes applied together by `KV.write`, all or nothing, later operations winning."""

    def delete(self, key: bytes) -> None: ...

    def delete_range(self, begin: bytes, end: bytes) -> None: ...

    def len(self) -> int: ...


class KeyLocks(Protocol):
    """Named locks serialising read-modify-write of one record (per process, or per database)."""

    def hold(self, *names: str) -> AbstractContextManager[None]:
        """Hold every named lock for the block; never deadlocks with another `hold`."""
        ...

    @property
    def identity(self) -> AbstractContextManager[object]:
        """The one lock of the unique identity indexes; taken after any `hold`, never before."""
        ...


class KV(Protocol):
    #: ``"rocksdb"`` or ``"postgresql"``.
    engine: str
    #: Where the data is, for messages and statistics: a directory, or the URL without its password.
    where: str
    #: False when the per-chat tail cache could be stale (other processes write the same chats).
    trusts_tail_cache: bool
    #: Worker threads `AsyncStore` uses by default on this engine.
    default_threads: int
    #: The error of the last failed write, until `recover` succeeds.
    write_failure: str | None
    locks: KeyLocks

    @property
    def durable(self) -> bool:
        """True when every returned write also survives an OS crash or power loss."""
        ...

    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: list[bytes]) -> list[bytes | None]: ...

    def batch(self) -> Batch: ...

    def write(self, batch: Batch) -> None:
        """Apply `batch` atomically; `StoreWriteError` when the engine refuses it."""
        ...

    def scan(self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None,
             page: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with `prefix` (b"": every key), in key order or
        reversed; with `after`, only keys strictly after it in that order. `page` hints how many
        entries the caller expects to read (engines that read in pages start with that many)."""
        ...

    def is_empty(self) -> bool: ...

    def put_durable(self, key: bytes, value: bytes) -> None:
        """One write that survives an OS crash whatever the store's sync setting (the schema version)."""
        ...

    def migration_lock(self) -> AbstractContextManager[None]:
        """Held while the schema is migrated: one migrator at a time on this data."""
        ...

    def recover(self) -> bool:
        """After a failed write: make the store writable again and prove it with a probe write."""
        ...

    def close(self) -> None: ...


def upper_bound(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
