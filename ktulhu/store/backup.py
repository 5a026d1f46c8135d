"""Point-in-time copies of the store (`backup`) and putting one back in place (`restore`).

The server holds RocksDB's lock on its directory, so another process can neither open it normally
nor take a checkpoint (a checkpoint needs the primary's own handle: one taken from a read-only or
secondary handle copies only the flushed SST files and silently drops what is still in the WAL).
Instead the copy is read through a *secondary instance* (`AccessType.secondary`): it never takes
the lock and never changes the source's RocksDB files, replays the primary's MANIFEST and WAL, and
only moves forward when told to (`try_catch_up_with_primary`). One iterator over that frozen view
sees the store at one sequence number, and WAL records are whole WriteBatches, so every batch is
either fully in the copy or fully out. The keys are written, in order, into a fresh RocksDB under a
hidden temporary name next to the destination, read back and compared (count and digest), and
only then renamed into place: an interrupted backup never leaves a directory that looks complete.

One race needs care: the primary may flush a WAL into an SST and delete the WAL between the
secondary reading the MANIFEST and listing the WAL files, which would leave that WAL's batches out
while later ones are in. A catch-up during which the set of WAL files did not change cannot have
hit it (a WAL is deleted only after its flush is in the MANIFEST), so catch-ups repeat until one
runs with the set unchanged; such a catch-up also repairs an earlier one that was hit.

(rocksdict itself rewrites its ``rocksdict-config.json`` in the source, with the same bytes, on
every open; that is the only write there.)

`restore` copies a backup the same way (the backup itself is left untouched) and swaps it in; a
non-empty target is only replaced with ``force``, and is then renamed aside, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions

from .errors import StoreError

__all__ = ["BackupError", "CopyReport", "RestoreReport", "backup", "restore"]

#: Whole attempts (open a view, copy, verify) before giving up: an attempt fails when the primary
#: deletes a file the secondary still needed (a compaction or a WAL purge at the wrong moment).
ATTEMPTS = 5
#: Catch-ups tried per attempt until one runs while the primary's set of WAL files stays the same.
CATCH_UPS = 100
#: Entries (or bytes of keys and values) per WriteBatch when writing the copy.
BATCH_ENTRIES = 10_000
BATCH_BYTES = 8 << 20


class BackupError(StoreError):
    """A backup or restore was refused or failed; the one-line message says why. Nothing was
    changed at the destination (a temporary directory, if one was made, has been removed)."""


@attrs.frozen
class CopyReport:
    """What a finished backup (or the copy a restore put in place) holds."""

    source: Path
    path: Path
    keys: int
    #: Sum of key and value lengths (what the data weighs, before compression).
    data_bytes: int
    #: Size of the files of the new directory.
    disk_bytes: int
    #: ``meta:schema_version`` of the copy (0: a store the original server wrote, not yet migrated).
    schema_version: int

    def line(self, verb: str) -> str:
        return (f"{verb} {self.source} to {self.path}: {self.keys} keys, {self.disk_bytes} bytes on disk "
                f"({self.data_bytes} bytes of keys and values), schema version {self.schema_version}")


@attrs.frozen
class RestoreReport:
    copy: CopyReport
    #: Where the store that was at the target went (``None``: the target was absent or empty).
    moved_aside: Path | None

    def line(self) -> str:
        text = self.copy.line("restored")
        if self.moved_aside is not None:
            text += f"; the previous store was moved to {self.moved_aside}"
        return text


@attrs.frozen
class _Copied:
    keys: int
    data_bytes: int
    digest: bytes


# --- public operations ------------------------------------------------------------------------


def backup(source: Path, dest: Path) -> CopyReport:
    """Copy the store at `source` to the new directory `dest`, consistent at one point in time.

    Works whether or not a server has `source` open and is writing. `dest` must not exist or be
    an empty directory. Raises `BackupError` (nothing written at `dest`) on refusal or failure."""
    source, dest = Path(source).absolute(), Path(dest).absolute()
    _check_store_dir(source, "store")
    if _inside(dest, source):
        raise BackupError(f"the backup {dest} would be inside the store {source}; choose a path outside it")
    _check_free(dest, "backup destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _scratch(dest) as tmp:
        schema, copied = _copy_and_verify(source, tmp)
        _check_free(dest, "backup destination")  # nothing appeared meanwhile
        _replace_empty(tmp, dest)
    return CopyReport(source=source, path=dest, keys=copied.keys, data_bytes=copied.data_bytes,
                      disk_bytes=_disk_bytes(dest), schema_version=schema)


def restore(backup_dir: Path, target: Path, *, force: bool = False) -> RestoreReport:
    """Put a copy of the store at `backup_dir` in place at `target` (the backup is not changed).

    Refused while a server holds `target` open. A non-empty `target` needs `force`; it is then
    renamed to ``<target>.before-restore-<UTC time>`` next to it. Must not be called from a
    process that has `target` open itself (the lock probe is per process)."""
    backup_dir, target = Path(backup_dir).absolute(), Path(target).absolute()
    _check_store_dir(backup_dir, "backup")
    if backup_dir == target or _inside(target, backup_dir) or _inside(backup_dir, target):
        raise BackupError(f"the backup {backup_dir} and the store {target} overlap; restore to another path")
    _check_target(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _scratch(target) as tmp:
        schema, copied = _copy_and_verify(backup_dir, tmp)
        from .migrate import SCHEMA_VERSION

        if schema > SCHEMA_VERSION:
            raise BackupError(f"the backup {backup_dir} has schema version {schema}, newer than this Ktulhu "
                              f"understands ({SCHEMA_VERSION}); upgrade Ktulhu first")
        with _hold_lock(target):
            _check_target(target, force=force, lock=False)  # again, now that no server can start on it
            aside = None
            if _is_nonempty_dir(target):
                aside = _aside_name(target)
                os.rename(target, aside)
            try:
                _replace_empty(tmp, target)
            except BaseException:
                if aside is not None and not target.exists():
                    os.rename(aside, target)
                raise
    report = CopyReport(source=backup_dir, path=target, keys=copied.keys, data_bytes=copied.data_bytes,
                        disk_bytes=_disk_bytes(target), schema_version=schema)
    return RestoreReport(copy=report, moved_aside=aside)


# --- the copy ---------------------------------------------------------------------------------


def _copy_and_verify(source: Path, tmp: Path) -> tuple[int, _Copied]:
    """Copy a point-in-time view of `source` into the empty directory `tmp`, read it back."""
    last_error = ""
    for _ in range(ATTEMPTS):
        _empty(tmp)
        try:
            with _secondary_view(source) as view:
                copied = _copy(view, tmp)
        except _Retry as error:
            last_error = str(error)
            continue
        return _verify(tmp, copied), copied
    raise BackupError(f"cannot read the store at {source} (tried {ATTEMPTS} times): {last_error}")


class _Retry(Exception):
    """The primary changed files under the view; a fresh attempt usually succeeds."""


@contextlib.contextmanager
def _secondary_view(source: Path) -> Iterator[Rdict]:
    """A secondary instance of `source`, caught up during a catch-up that no WAL purge raced."""
    scratch = Path(tempfile.mkdtemp(prefix="ktulhu-backup-secondary-"))
    options = Options(raw_mode=True)
    options.set_max_open_files(-1)  # keep every table file open: the primary may delete them
    db: Rdict | None = None
    try:
        try:
            if set(Rdict.list_cf(str(source), Options(raw_mode=True))) != {"default"}:
                raise BackupError(f"{source} has column families other than 'default'; it is not a Ktulhu store")
            db = Rdict(str(source), options, access_type=AccessType.secondary(str(scratch)))
        except BackupError:
            raise
        except Exception as error:  # rocksdict raises bare Exceptions with RocksDB's status text
            if _is_vanishing_file(error):
                raise _Retry(_one_line(error)) from None
            raise BackupError(f"cannot read the store at {source}: {_one_line(error)}") from None
        for n in range(CATCH_UPS):
            if n:
                time.sleep(min(0.05, 0.002 * n))  # let a burst of flushes pass
            before = _wal_files(source)
            try:
                db.try_catch_up_with_primary()
            except Exception as error:
                raise _Retry(_one_line(error)) from None
            if _wal_files(source) == before:
                break
        else:
            raise _Retry(f"the write-ahead log of {source} kept changing during {CATCH_UPS} catch-ups")
        yield db
    finally:
        if db is not None:
            db.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _copy(view: Rdict, tmp: Path) -> _Copied:
    """Write every key of `view`'s current state into a new RocksDB at `tmp` (WAL off, then flushed).

    A read error means the primary removed a file under the view (`_Retry`); a write error is
    this side's problem (disk full, permissions) and is reported as it is."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_error_if_exists(True)
    no_wal = WriteOptions()
    no_wal.disable_wal = True  # the copy is flushed before it counts; a crash leaves only the scratch dir
    digest = hashlib.blake2b(digest_size=32)
    count = size = 0
    try:
        out = Rdict(str(tmp), options)
    except Exception as error:
        raise BackupError(f"cannot create the copy at {tmp}: {_one_line(error)}") from None

    def write(batch: WriteBatch) -> None:
        try:
            out.write(batch, no_wal)
        except Exception as error:
            raise BackupError(f"cannot write the copy at {tmp}: {_one_line(error)}") from None

    try:
        items = view.items()  # one iterator: one sequence number
        batch, pending = WriteBatch(raw_mode=True), 0
        while True:
            try:
                key, value = next(items)
            except StopIteration:
                break
            except Exception as error:  # a table file vanished under the iterator
                raise _Retry(_one_line(error)) from None
            batch.put(key, value)
            digest.update(struct.pack("<II", len(key), len(value)) + key + value)
            count += 1
            size += len(key) + len(value)
            pending += len(key) + len(value)
            if batch.len() >= BATCH_ENTRIES or pending >= BATCH_BYTES:
                write(batch)
                batch, pending = WriteBatch(raw_mode=True), 0
        if batch.len():
            write(batch)
        try:
            out.flush(wait=True)
        except Exception as error:
            raise BackupError(f"cannot write the copy at {tmp}: {_one_line(error)}") from None
    finally:
        out.close()
    return _Copied(keys=count, data_bytes=size, digest=digest.digest())


def _verify(tmp: Path, expected: _Copied) -> int:
    """Open the copy as a store (as the server would), compare count and digest; its schema version."""
    from .db import Store
    from .migrate import read_version

    try:
        store = Store.open(tmp, migrate=False)  # a faithful copy: a schema-0 store stays schema 0
    except StoreError as error:
        raise BackupError(f"the copy at {tmp} does not open: {error}") from None
    try:
        schema = read_version(store)
        digest = hashlib.blake2b(digest_size=32)
        count = 0
        for key, value in store.scan(b""):
            digest.update(struct.pack("<II", len(key), len(value)) + key + value)
            count += 1
    finally:
        store.close()
    if count != expected.keys or digest.digest() != expected.digest:
        raise BackupError(f"the copy at {tmp} does not match what was read ({count} keys, expected "
                          f"{expected.keys}); the disk may be failing")
    _fsync_tree(tmp)
    return schema


# --- checks and file-system helpers -----------------------------------------------------------


def _check_store_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise BackupError(f"the {what} {path} does not exist")
    if not path.is_dir():
        raise BackupError(f"the {what} {path} is not a directory")
    if not (path / "CURRENT").is_file():
        raise BackupError(f"the {what} {path} is not a store (no RocksDB CURRENT file)")


def _check_free(path: Path, what: str) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BackupError(f"the {what} {path} exists and is not a directory; choose a new path")
    if _is_nonempty_dir(path):
        raise BackupError(f"the {what} {path} exists and is not empty; choose a new path")


def _check_target(target: Path, *, force: bool, lock: bool = True) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise BackupError(f"the store path {target} exists and is not a directory")
    if lock and _is_locked(target):  # never while holding the lock: closing a probe would drop it
        raise BackupError(f"the store at {target} is in use (a server holds its lock); stop the server first")
    if _is_nonempty_dir(target) and not force:
        raise BackupError(f"the store path {target} is not empty; pass --force to move it aside "
                          "(it is renamed, not deleted) and restore in its place")


def _is_nonempty_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    with os.scandir(path) as entries:
        return any(True for _ in entries)


def _is_locked(store_dir: Path) -> bool:
    try:
        with _hold_lock(store_dir):
            return False
    except BackupError:
        return True


@contextlib.contextmanager
def _hold_lock(store_dir: Path) -> Iterator[None]:
    """Hold the lock RocksDB takes (fcntl write lock on ``LOCK``), so no server opens the store
    while it is being swapped. POSIX locks are per process: never use this where the store is open."""
    lock = store_dir / "LOCK"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield  # never opened by RocksDB (or absent): nothing can hold it
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise BackupError(f"the store at {store_dir} is in use (a server holds its lock); "
                                  "stop the server first") from None
            raise
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _scratch(final: Path) -> Iterator[Path]:
    """A hidden, clearly partial directory next to `final` (same file system: the rename is atomic),
    removed unless it was renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _replace_empty(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` (absent or an empty directory) and make the rename durable."""
    try:
        os.rename(tmp, final)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise BackupError(f"{final} appeared or changed while copying; nothing was written there") from None
        raise
    _fsync_dir(final.parent)


def _aside_name(target: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = target.with_name(f"{target.name}.before-restore-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.name}.before-restore-{stamp}-{n}")
    return candidate


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _wal_files(source: Path) -> frozenset[str]:
    return frozenset(name for name in os.listdir(source) if name.endswith(".log") and name[:-4].isdigit())


def _is_vanishing_file(error: Exception) -> bool:
    text = str(error).lower()
    return "no such file" in text or ("not found" in text and ".sst" in text)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:500]


def _disk_bytes(directory: Path) -> int:
    return sum(entry.stat().st_size for entry in directory.rglob("*") if entry.is_file())


def _fsync_tree(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_file():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

