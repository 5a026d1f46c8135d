"""Opening and closing the RocksDB directory, and the low-level access every operation uses.

`Store` is the synchronous store: each method runs RocksDB calls on the calling thread (they take
microseconds to a few milliseconds). Trio code uses `Store.aio` (`AsyncStore`), which runs them on
worker threads. The record operations come from the mixins in `messages`, `chats`, `users` and
`accounts`; this module holds what they share: the handle, the write options, the key locks, the
statistics and the decode-or-skip rule for corrupt values.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from rocksdict import Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from . import keys
from .accounts import AccountOps
from .chats import ChatOps
from .errors import CorruptRecord, StoreClosedError, StoreError, StoreLockedError, StoreWriteError
from .locks import StripedLocks
from .messages import MessageOps
from .records import decode, now_ms
from .users import UserOps

if TYPE_CHECKING:
    from .aio import AsyncStore

__all__ = ["Store", "StoreError", "StoreLockedError", "StoreStatistics"]

log = logging.getLogger("ktulhu.store")
R = TypeVar("R")

#: How many chats' (last seq, last ts) the store keeps in memory to number new messages.
TAIL_CACHE_SIZE = 4096


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


@attrs.define
class _Counters:
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    corrupt: int = 0
    foreign: int = 0
    stale: int = 0
    writes: int = 0

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


@attrs.define(slots=False)
class Store(MessageOps, ChatOps, UserOps, AccountOps):
    """One open `chatdb/`. Keys and values are raw bytes (JSON values), as the original wrote them.

    Thread-safe: any method may be called from several threads at once. Each write operation commits
    one WriteBatch (all or nothing) through the WAL; a method that returned has its write in the WAL
    (survives the process being killed; with ``sync=True`` also an OS crash or power loss).
    Read-modify-write operations hold the record's lock, so concurrent updates are never lost.
    """

    path: Path
    db: Rdict | None
    write_options: WriteOptions
    schema_version: int = 0
    _locks: StripedLocks = attrs.field(factory=StripedLocks, alias="_locks")
    _counters: _Counters = attrs.field(factory=_Counters, alias="_counters")
    _tails: OrderedDict[str, tuple[int, int]] = attrs.field(factory=OrderedDict, alias="_tails")
    _tails_lock: threading.Lock = attrs.field(factory=threading.Lock, alias="_tails_lock")
    _aio: Any = attrs.field(default=None, alias="_aio")
    #: RocksDB's error after a failed write, until `recover` succeeds.
    write_failure: str | None = None

    @classmethod
    def open(cls, path: Path, *, sync: bool = False, migrate: bool = True) -> "Store":
        """Open (creating if missing) and bring the schema up to date.

        Raises `StoreLockedError` when another process has the directory open, `StoreError` when it
        cannot be opened or was written by a newer Ktulhu. Blocking; call it from a worker thread.
        """
        try:
            db = Rdict(str(path), cls._options())
        except Exception as error:  # rocksdict raises a bare Exception with RocksDB's status text
            text = str(error)
            if "lock" in text.lower():
                raise StoreLockedError(
                    f"the store at {path} is locked by another process; run one server per store "
                    "(or set KTULHU_DB_PATH to another directory)"
                ) from None
            raise StoreError(f"cannot open the store at {path}: {text}") from None
        write_options = WriteOptions()
        write_options.sync = sync  # the WAL stays on either way
        db.set_write_options(write_options)
        store = cls(path=Path(path), db=db, write_options=write_options)
        if migrate:
            from .migrate import migrate as run_migrations

            try:
                run_migrations(store)
            except BaseException:
                store.close()
                raise
        return store

    @staticmethod
    def _options() -> Options:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        return options

    def close(self) -> None:
        """Flush and release the lock; safe to call twice."""
        if self.db is not None:
            db, self.db = self.db, None
            db.flush()
            db.close()

    @property
    def aio(self) -> "AsyncStore":
        """The trio-facing API over this store (created on first use, with the default limiter)."""
        if self._aio is None:
            from .aio import AsyncStore

            self._aio = AsyncStore(self)
        return self._aio

    def statistics(self) -> StoreStatistics:
        c = self._counters
        return StoreStatistics(
            path=str(self.path),
            schema_version=self.schema_version,
            sync=bool(self.write_options.sync),
            corrupt_records=c.corrupt,
            foreign_records=c.foreign,
            stale_index_entries=c.stale,
            writes=c.writes,
        )

    # --- low-level access shared by the operation mixins -------------------------------------

    def _rdict(self) -> Rdict:
        db = self.db
        if db is None:
            if self.write_failure is not None:  # `recover` is reopening it
                raise StoreWriteError(f"the store at {self.path} is being reopened after: {self.write_failure}")
            raise StoreClosedError(f"the store at {self.path} is closed")
        return db

    def _get(self, key: bytes) -> bytes | None:
        return self._rdict().get(key)

    def _get_many(self, keys_: list[bytes]) -> list[bytes | None]:
        if not keys_:
            return []
        return self._rdict().get(keys_)

    @staticmethod
    def _batch() -> WriteBatch:
        return WriteBatch(raw_mode=True)

    def _write(self, batch: WriteBatch) -> None:
        if batch.len():
            try:
                self._rdict().write(batch)
            except Exception as error:  # rocksdict raises a bare Exception with RocksDB's status text
                self.write_failure = str(error)
                raise StoreWriteError(f"the store at {self.path} cannot be written: {error}") from None
            self._counters.add("writes")

    def recover(self) -> bool:
        """After a failed write: reopen the database (RocksDB refuses every write until then) and
        prove it writable. False while it still cannot be written (the disk is still full)."""
        old, self.db = self.db, None
        if old is not None:
            try:
                old.close()
            except Exception:  # the failed write's error again; the handle is released anyway
                pass
            del old
        try:
            db = Rdict(str(self.path), self._options())
            db.set_write_options(self.write_options)
            db.put(keys.WRITE_PROBE, str(now_ms()).encode())
        except Exception as error:
            self.write_failure = str(error)
            try:
                db.close()  # type: ignore[possibly-undefined]
            except Exception:
                pass
            return False
        with self._tails_lock:
            self._tails.clear()  # sequences taken by writes that failed are read afresh
        self.db = db
        self.write_failure = None
        return True

    def _scan(self, prefix: bytes, *, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with `prefix`, in key order (or reversed)."""
        db = self._rdict()
        if reverse:
            items = db.items(from_key=keys.next_prefix(prefix), backwards=True)
        else:
            read_options = ReadOptions()
            read_options.set_iterate_upper_bound(keys.next_prefix(prefix))
            items = db.items(from_key=prefix, read_opt=read_options)
        for key, value in items:
            if not key.startswith(prefix):
                if reverse and key >= prefix:
                    continue  # cannot happen for ':'-ended prefixes; be safe
                break
            yield key, value

    def _decode(self, cls: type[R], key: bytes, raw: bytes | None) -> R | None:
        """Decode a stored value, or log + count + return None when it is corrupt or missing."""
        if raw is None:
            return None
        try:
            return decode(cls, raw)
        except CorruptRecord as error:
            self._counters.add("corrupt")
            log.warning("corrupt %s record at %r skipped: %s", cls.__name__, key[:200], error)
            return None

    def _load(self, cls: type[R], key: bytes) -> R | None:
        return self._decode(cls, key, self._get(key))

    def _count(self, name: str, n: int = 1) -> None:
        self._counters.add(name, n)

    # --- per-chat tail (last seq, last ts in ms), cached ------------------------------------------

    def _tail_get(self, chat_id: str) -> tuple[int, int] | None:
        with self._tails_lock:
            tail = self._tails.get(chat_id)
            if tail is not None:
                self._tails.move_to_end(chat_id)
            return tail

    def _tail_set(self, chat_id: str, tail: tuple[int, int] | None) -> None:
        with self._tails_lock:
            if tail is None:
                self._tails.pop(chat_id, None)
                return
            self._tails[chat_id] = tail
            self._tails.move_to_end(chat_id)
            while len(self._tails) > TAIL_CACHE_SIZE:
                self._tails.popitem(last=False)
