"""Opening and closing a store, whichever engine holds it, and its statistics.

`Store` is the synchronous store: each method runs its engine calls on the calling thread (RocksDB
calls take microseconds to a few milliseconds; PostgreSQL calls wait for a round trip or a commit).
Trio code uses `Store.aio` (`AsyncStore`), which runs them on worker threads. The record operations
come from the mixins in `messages`, `chats`, `users` and `accounts`, written against `StoreCore`;
the engine is a `kv.KV`: `rocks.RocksKV` for a directory, `postgres.PostgresKV` for a
``postgresql://`` URL (`Store.open` picks it from the location).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .accounts import AccountOps
from .chats import ChatOps
from .core import TAIL_CACHE_SIZE, Counters
from .errors import StoreError, StoreLockedError
from .kv import KV
from .location import is_postgres_url
from .messages import MessageOps
from .rocks import RocksKV
from .users import UserOps

if TYPE_CHECKING:
    from rocksdict import Rdict

    from .aio import AsyncStore

__all__ = ["TAIL_CACHE_SIZE", "Store", "StoreError", "StoreLockedError", "StoreStatistics", "open_kv"]

log = logging.getLogger("ktulhu.store")


def open_kv(location: Path | str, *, sync: bool = False, create: bool = True, exclusive: bool = False,
            connections: int | None = None) -> KV:
    """The engine for `location`: a ``postgresql://`` (or ``postgres://``) URL, else a directory."""
    if isinstance(location, str) and is_postgres_url(location):
        from .postgres import PostgresKV

        return PostgresKV.open(location, create=create, exclusive=exclusive, connections=connections)
    return RocksKV.open(Path(location), sync=sync, create=create)


@attrs.frozen
class StoreStatistics:
    """A snapshot of the store's counters, for `/metrics` and the admin pages."""

    path: str
    schema_version: int
    sync: bool
    #: Values that did not decode into their record; each was logged and skipped.
    corrupt_records: int
    #: Messages found under one chat's prefix whose `chat_id` names another chat (the original's
    #: key-injection defect); skipped.
    foreign_records: int
    #: Index entries whose record was gone; skipped.
    stale_index_entries: int
    #: Write batches committed (one per write operation).
    writes: int


@attrs.define(slots=False)
class Store(MessageOps, ChatOps, UserOps, AccountOps):
    """One open store. Keys and values are raw bytes (JSON values) in the original's layout.

    Thread-safe: any method may be called from several threads at once. Each write operation commits
    atomically (one WriteBatch on RocksDB, one transaction on PostgreSQL); a method that returned has
    its write in the WAL (survives the process being killed; on PostgreSQL, and on RocksDB with
    ``sync=True``, also an OS crash or power loss). Read-modify-write operations hold the record's
    lock, so concurrent updates are never lost (on PostgreSQL also across processes).
    """

    _kv: KV = attrs.field(alias="_kv")
    schema_version: int = 0
    _counters: Counters = attrs.field(factory=Counters, alias="_counters")
    _tails: OrderedDict[str, tuple[int, int]] = attrs.field(factory=OrderedDict, alias="_tails")
    _tails_lock: threading.Lock = attrs.field(factory=threading.Lock, alias="_tails_lock")
    _aio: AsyncStore | None = attrs.field(default=None, alias="_aio")

    @classmethod
    def open(cls, location: Path | str, *, sync: bool = False, migrate: bool = True,
             connections: int | None = None) -> "Store":
        """Open (creating if missing) and bring the schema up to date.

        `location` is a RocksDB directory or a ``postgresql://`` URL. `sync`: fsync every RocksDB
        write (PostgreSQL commits are always durable). `connections`: PostgreSQL pool size (default:
        the default worker threads plus a few). Raises `StoreLockedError` when another process has
        the directory open, `StoreError` when it cannot be opened or reached, or was written by a
        newer Ktulhu. Blocking; call it from a worker thread.
        """
        store = cls(_kv=open_kv(location, sync=sync, connections=connections))
        if migrate:
            from .migrate import migrate as run_migrations

            try:
                with store._kv.migration_lock():
                    run_migrations(store)
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        """Flush and release the directory (or the connections); safe to call twice."""
        self._kv.close()

    @property
    def engine(self) -> str:
        """``"rocksdb"`` or ``"postgresql"``."""
        return self._kv.engine

    @property
    def where(self) -> str:
        """The directory, or the URL without its password: safe to log and show."""
        return self._kv.where

    @property
    def default_threads(self) -> int:
        """Worker threads `AsyncStore` uses by default on this engine."""
        return self._kv.default_threads

    @property
    def path(self) -> str:
        """Same as `where` (the older name)."""
        return self._kv.where

    @property
    def shared_url(self) -> str | None:
        """The PostgreSQL URL (with its credentials: for connecting, never for logs) when other
        processes may share this store; None for an embedded RocksDB directory."""
        if self._kv.engine != "postgresql":
            return None
        from .postgres import PostgresKV

        assert isinstance(self._kv, PostgresKV)
        return self._kv.url.url

    @property
    def write_failure(self) -> str | None:
        """The engine's error after a failed write, until `recover` succeeds."""
        return self._kv.write_failure

    @property
    def aio(self) -> "AsyncStore":
        """The trio-facing API over this store (created on first use, with the engine's default
        number of worker threads)."""
        if self._aio is None:
            from .aio import AsyncStore

            self._aio = AsyncStore(self)
        return self._aio

    def statistics(self) -> StoreStatistics:
        c = self._counters
        return StoreStatistics(
            path=self._kv.where,
            schema_version=self.schema_version,
            sync=self._kv.durable,
            corrupt_records=c.corrupt,
            foreign_records=c.foreign,
            stale_index_entries=c.stale,
            writes=c.writes,
        )

    def recover(self) -> bool:
        """After a failed write: make the store take writes again (RocksDB: reopen it, as it refuses
        every write until then; PostgreSQL: drop dead connections) and prove it with a probe write.
        False while it still cannot be written (the disk is still full, the server still down)."""
        if not self._kv.recover():
            return False
        with self._tails_lock:
            self._tails.clear()  # sequences taken by writes that failed are read afresh
        return True

    def _rdict(self) -> "Rdict":
        """The RocksDB handle (RocksDB stores only; tests and tools that need RocksDB itself)."""
        if not isinstance(self._kv, RocksKV):
            raise TypeError(f"the store at {self.where} is not a RocksDB directory")
        return self._kv.rdict()
