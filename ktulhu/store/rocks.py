"""The embedded engine: one RocksDB directory (rocksdict, raw mode), owned by one process.

Writes are WriteBatches through the write-ahead log (synced with ``sync=True``); the key locks are
in-process stripes (`locks.StripedLocks`), which is enough because RocksDB's directory lock keeps
every other process out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import attrs
from rocksdict import AccessType, Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from . import keys
from .errors import StoreClosedError, StoreError, StoreLockedError, StoreWriteError
from .kv import Batch, upper_bound
from .locks import StripedLocks
from .records import now_ms

__all__ = ["DEFAULT_THREADS", "RocksKV"]

#: Worker threads for store calls. RocksDB calls are short and their Python part holds the GIL, so
#: two threads saturate a small machine (measured: 2 beat 4 in throughput and in trio-loop stalls)
#: while one long read (a big history) still leaves a thread for writes.
DEFAULT_THREADS = 2


@attrs.define(eq=False)
class RocksKV:
    path: Path
    db: Rdict | None
    write_options: WriteOptions
    locks: StripedLocks = attrs.field(factory=StripedLocks)
    write_failure: str | None = None
    read_only: bool = False

    engine = "rocksdb"
    trusts_tail_cache = True
    default_threads = DEFAULT_THREADS

    @classmethod
    def open(cls, path: Path, *, sync: bool = False, create: bool = True, read_only: bool = False) -> "RocksKV":
        """Open (with `create`, creating if missing). `StoreLockedError` when another process has it.

        `read_only`: for reading a store that no server has open (refused otherwise) without
        changing its files; its state as of the open is read (writes are refused)."""
        path = Path(path)
        if (not create or read_only) and not (path / "CURRENT").is_file():
            raise StoreError(f"there is no store at {path} (no RocksDB CURRENT file)")
        try:
            if read_only:
                from .backup import _is_locked

                if _is_locked(path):
                    raise Exception("lock held by another process")  # reported as locked below
                options = cls._options(False)
                options.set_max_open_files(-1)  # keep the files it reads open whatever happens to them
                db = Rdict(str(path), options, access_type=AccessType.read_only())
            else:
                db = Rdict(str(path), cls._options(create))
        except Exception as error:  # rocksdict raises a bare Exception with RocksDB's status text
            text = str(error)
            if "lock" in text.lower():
                raise StoreLockedError(
                    f"the store at {path} is locked by another process; run one server per store "
                    "(or set KTULHU_STORE to another directory)"
                ) from None
            raise StoreError(f"cannot open the store at {path}: {text}") from None
        write_options = WriteOptions()
        write_options.sync = sync  # the WAL stays on either way
        db.set_write_options(write_options)
        return cls(path=path, db=db, write_options=write_options, read_only=read_only)

    @staticmethod
    def _options(create: bool = True) -> Options:
        options = Options(raw_mode=True)
        options.create_if_missing(create)
        return options

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def durable(self) -> bool:
        return bool(self.write_options.sync)

    def rdict(self) -> Rdict:
        db = self.db
        if db is None:
            if self.write_failure is not None:  # `recover` is reopening it
                raise StoreWriteError(f"the store at {self.path} is being reopened after: {self.write_failure}")
            raise StoreClosedError(f"the store at {self.path} is closed")
        return db

    def close(self) -> None:
        """Flush and release the lock; safe to call twice."""
        if self.db is not None:
            db, self.db = self.db, None
            if not self.read_only:
                db.flush()
            db.close()

    def get(self, key: bytes) -> bytes | None:
        return self.rdict().get(key)

    def get_many(self, keys_: list[bytes]) -> list[bytes | None]:
        if not keys_:
            return []
        return self.rdict().get(keys_)

    def batch(self) -> WriteBatch:
        return WriteBatch(raw_mode=True)

    def write(self, batch: Batch) -> None:
        assert isinstance(batch, WriteBatch)
        try:
            self.rdict().write(batch)
        except StoreError:
            raise
        except Exception as error:  # rocksdict raises a bare Exception with RocksDB's status text
            self.write_failure = str(error)
            raise StoreWriteError(f"the store at {self.path} cannot be written: {error}") from None

    def scan(self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None,
             page: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        db = self.rdict()
        end = upper_bound(prefix)
        if reverse:
            start = end if after is None or (end is not None and after > end) else after
            items = db.items(backwards=True) if start is None else db.items(from_key=start, backwards=True)
        else:
            read_options = ReadOptions()
            if end is not None:
                read_options.set_iterate_upper_bound(end)
            start = after if after is not None and after > prefix else prefix
            items = db.items(from_key=start, read_opt=read_options)
        for key, value in items:
            if after is not None and key == after:
                continue
            if not key.startswith(prefix):
                if reverse and end is not None and key >= end:
                    continue  # seeking backwards from the bound lands on it when it exists
                break
            yield key, value

    def is_empty(self) -> bool:
        for _ in self.rdict().keys():
            return False
        return True

    def put_durable(self, key: bytes, value: bytes) -> None:
        synced = WriteOptions()
        synced.sync = True
        self.rdict().put(key, value, synced)

    def migration_lock(self) -> AbstractContextManager[None]:
        return nullcontext()  # the directory lock already keeps every other process out

    def recover(self) -> bool:
        """Reopen the database (RocksDB refuses every write after a failed one) and prove it writable.
        False while it still cannot be written (the disk is still full)."""
        old, self.db = self.db, None
        if old is not None:
            try:
                old.close()
            except Exception:  # the failed write's error again; the handle is released anyway
                pass
            del old
        db: Rdict | None = None
        try:
            db = Rdict(str(self.path), self._options())
            db.set_write_options(self.write_options)
            db.put(keys.WRITE_PROBE, str(now_ms()).encode())
        except Exception as error:
            self.write_failure = str(error)
            if db is not None:
                try:
                    db.close()
                except Exception:
                    pass
            return False
        self.db = db
        self.write_failure = None
        return True
