"""`ktulhu store copy --from SRC --to DST`: every key and value, byte for byte, from one store to
another, whichever engines they are on (a RocksDB directory or a ``postgresql://`` URL, both ways).

The copy is raw: original-layout records, Ktulhu's records and its indexes alike, in key order, in
batches (each batch one WriteBatch or one transaction). Nothing is decoded or migrated: a store the
original server wrote stays at schema version 0 and is migrated when a server first opens the copy.

- **Resumable.** Each batch also writes a progress marker (``meta:copy_progress``: the source and
  the last key copied) into the destination, atomically with the batch. A copy that stopped (Ctrl-C,
  kill, a lost connection) is run again with the same command and continues after that key; the
  marker is deleted once everything is copied, so a finished copy holds exactly the source's keys.
- **Idempotent.** Re-running a finished copy finds the destination identical and writes nothing; a
  destination that lacks keys or holds older values of the source's keys gets them upserted.
- **Verified.** At the end both stores are read side by side in key order: the key counts are
  printed, and any key missing, extra or different fails the copy (exit 1).
- **Refused** (nothing changed): a source or destination RocksDB directory held by a running server;
  a PostgreSQL destination open in a server; the same store as source and destination; a missing or
  non-store source; a destination with another schema version, with keys the source does not have,
  or with the unfinished copy of another source; a source that is itself an unfinished copy.

A PostgreSQL source may be in use: the copy reads one snapshot of it (a repeatable-read
transaction), so it is the store as of the moment the copy (or this resumed run) started.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import IO, Any

import attrs

from . import keys
from .errors import StoreError, StoreLockedError
from .kv import KV
from .location import InvalidStoreUrl, PgUrl, is_postgres_url, looks_like_url

__all__ = ["PROGRESS_KEY", "CopyError", "CopyReport", "copy_store"]

#: The destination's progress marker while a copy is unfinished (JSON: source, last key, keys copied).
PROGRESS_KEY = keys.COPY_PROGRESS
#: Keys (or bytes of keys and values) per batch.
BATCH_KEYS = 5_000
BATCH_BYTES = 8 << 20


class CopyError(StoreError):
    """The copy was refused or failed; the one-line message says why."""


@attrs.frozen
class CopyReport:
    source: str
    dest: str
    #: Keys written by this run, and keys the destination already had from an interrupted run.
    copied: int
    resumed_after: int
    batches: int
    #: False when the run stopped early (`stop_after_batches`); run it again to finish.
    complete: bool
    source_keys: int = 0
    dest_keys: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    first_difference: bytes | None = None
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return self.complete and not (self.missing or self.extra or self.different) \
            and self.source_keys == self.dest_keys

    def lines(self) -> list[str]:
        resumed = f", resuming after {self.resumed_after} keys copied before" if self.resumed_after else ""
        if self.complete and not (self.copied or self.batches or self.resumed_after):
            out = [f"{self.dest} already holds every key of {self.source}: nothing written"]
        else:
            out = [f"copied {self.copied} keys in {self.batches} batches from {self.source} to {self.dest}"
                   f"{resumed} ({self.seconds:.1f} s)"]
        if not self.complete:
            out.append("stopped before the end: run the same command again to continue")
            return out
        out.append(f"keys in source: {self.source_keys}; keys in destination: {self.dest_keys}")
        if self.verified:
            out.append("verified: every key and value is identical")
        else:
            out.append(f"MISMATCH: {self.missing} missing, {self.extra} extra, {self.different} different "
                       f"(first at key {self.first_difference!r})")
        return out


@attrs.frozen
class _Place:
    """One side of the copy: its location and the identity that decides "same store"."""

    location: Path | PgUrl

    @property
    def shown(self) -> str:
        return str(self.location)

    @property
    def identity(self) -> str:
        if isinstance(self.location, PgUrl):
            return f"postgresql://{self.location.host.lower()}:{self.location.port}/{self.location.dbname}"
        return str(self.location.resolve())


def copy_store(source: str | Path, dest: str | Path, *, batch_keys: int = BATCH_KEYS,
               stop_after_batches: int | None = None, progress: bool | None = None,
               out: IO[str] | None = None) -> CopyReport:
    """Copy every key of `source` to `dest` (see the module docstring). `stop_after_batches` stops
    early (tests: an interrupted copy); `progress`: a tqdm bar (default: when stderr is a terminal;
    otherwise start and end lines go to `out`). Raises `CopyError` when refused or failed."""
    started = time.monotonic()
    src, dst = _place(source, "source"), _place(dest, "destination")
    if src.identity == dst.identity or (isinstance(src.location, Path) and isinstance(dst.location, Path)
                                        and _overlap(src.location, dst.location)):
        raise CopyError(f"the source and the destination are the same store ({src.shown}); copy to another one")
    _check_source_dir(src)
    _check_dest_dir(dst)
    out = sys.stdout if out is None else out
    bar_wanted = sys.stderr.isatty() if progress is None else progress
    with ExitStack() as stack:
        reader = stack.enter_context(_opened(src, source=True))
        if reader.get(PROGRESS_KEY) is not None:
            raise CopyError(f"the source {src.shown} is itself an unfinished copy (it has {PROGRESS_KEY.decode()}); "
                            "finish that copy first")
        writer = stack.enter_context(_opened(dst, source=False))
        resume = _resume_point(reader, writer, src, dst)
        if resume is _IDENTICAL:
            counts, _ = _compare(reader, writer)
            return CopyReport(src.shown, dst.shown, copied=0, resumed_after=0, batches=0, complete=True,
                              seconds=time.monotonic() - started, **counts)
        after, already = resume if isinstance(resume, tuple) else (None, 0)
        total = max(0, _estimate(reader) - already)
        if not bar_wanted:
            print(f"copying {src.shown} to {dst.shown} (about {total} keys to copy) ...", file=out, flush=True)
        bar = _bar(total, bar_wanted)
        copied = batches = 0
        complete = True
        try:
            batch, size, count, last = writer.batch(), 0, 0, None
            for key, value in reader.scan(b"", after=after, page=batch_keys):
                batch.put(key, value)
                size += len(key) + len(value)
                count += 1
                last = key
                if count >= batch_keys or size >= BATCH_BYTES:
                    _commit(writer, batch, src, last, already + copied + count)
                    copied, batches = copied + count, batches + 1
                    bar.update(count)
                    batch, size, count = writer.batch(), 0, 0
                    if stop_after_batches is not None and batches >= stop_after_batches:
                        complete = False
                        break
            if complete and count:
                _commit(writer, batch, src, last, already + copied + count)
                copied, batches = copied + count, batches + 1
                bar.update(count)
        except StoreError as error:
            raise CopyError(f"the copy stopped after {already + copied} keys: {error}; run the same command "
                            "again to continue") from None
        finally:
            bar.close()
        if not complete:
            return CopyReport(src.shown, dst.shown, copied=copied, resumed_after=already, batches=batches,
                              complete=False, seconds=time.monotonic() - started)
        done = writer.batch()
        done.delete(PROGRESS_KEY)
        writer.write(done)
        counts, _ = _compare(reader, writer)
    report = CopyReport(src.shown, dst.shown, copied=copied, resumed_after=already, batches=batches, complete=True,
                        seconds=time.monotonic() - started, **counts)
    if not bar_wanted:
        print(f"copy finished in {report.seconds:.1f} s", file=out, flush=True)
    return report


# --- steps ------------------------------------------------------------------------------------------


_IDENTICAL = object()


def _place(location: str | Path, what: str) -> _Place:
    text = str(location)
    if isinstance(location, str) and is_postgres_url(text):
        try:
            return _Place(PgUrl.parse(text))
        except InvalidStoreUrl as error:
            raise CopyError(f"the {what} is not a usable PostgreSQL URL: {error}") from None
    if isinstance(location, str) and looks_like_url(text):
        raise CopyError(f"the {what} is neither a directory nor a postgresql:// URL")
    return _Place(Path(location).absolute())


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_source_dir(place: _Place) -> None:
    path = place.location
    if not isinstance(path, Path):
        return
    if not path.exists():
        raise CopyError(f"the source {path} does not exist")
    if not path.is_dir():
        raise CopyError(f"the source {path} is not a directory")
    if not (path / "CURRENT").is_file():
        raise CopyError(f"the source {path} is not a store (no RocksDB CURRENT file)")


def _check_dest_dir(place: _Place) -> None:
    path = place.location
    if not isinstance(path, Path):
        return
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CopyError(f"the destination {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "CURRENT").is_file():
        raise CopyError(f"the destination {path} is a non-empty directory that is not a store; choose another")


def _opened(place: _Place, *, source: bool) -> Any:
    """Open one side as a raw engine (no migration), holding it for the copy."""
    from contextlib import contextmanager

    @contextmanager
    def cm() -> Iterator[KV]:
        try:
            if isinstance(place.location, PgUrl):
                from .postgres import PostgresKV

                kv: KV = PostgresKV.open(place.location, create=not source, exclusive=not source, connections=4)
            else:
                from .rocks import RocksKV

                kv = RocksKV.open(place.location, create=True, read_only=source)
        except StoreLockedError as error:
            raise CopyError(f"the {'source' if source else 'destination'} is in use: {error}") from None
        except StoreError as error:
            raise CopyError(f"cannot open the {'source' if source else 'destination'}: {error}") from None
        try:
            snapshot = kv.snapshot() if source and hasattr(kv, "snapshot") else nullcontext()
            with snapshot:
                yield kv
        finally:
            kv.close()

    return cm()


def _resume_point(reader: KV, writer: KV, src: _Place, dst: _Place) -> object:
    """Where to start: (after key, keys already copied), (None, 0) from the beginning, or _IDENTICAL."""
    raw = writer.get(PROGRESS_KEY)
    if raw is not None:
        try:
            marker = json.loads(raw)
            origin, after, copied = marker["source"], bytes.fromhex(marker["after"]), int(marker["copied"])
        except (ValueError, KeyError, TypeError):
            raise CopyError(f"the destination {dst.shown} has an unreadable {PROGRESS_KEY.decode()}; "
                            "it is not a copy this command can continue") from None
        if origin != src.identity:
            raise CopyError(f"the destination {dst.shown} holds an unfinished copy of {origin}, not of "
                            f"{src.shown}; finish that copy or choose an empty destination")
        return after, copied
    if writer.is_empty():
        return None, 0
    theirs, ours = writer.get(keys.SCHEMA_VERSION), reader.get(keys.SCHEMA_VERSION)
    if theirs != ours:
        raise CopyError(f"the destination {dst.shown} holds a store of schema version {_version(theirs)}, "
                        f"the source {_version(ours)}; copy into an empty destination")
    counts, first_extra = _compare(reader, writer)
    if counts["extra"]:
        raise CopyError(f"the destination {dst.shown} is not empty and holds {counts['extra']} keys the source "
                        f"does not have (first: {first_extra!r}); copy into an empty destination")
    if not (counts["missing"] or counts["different"]):
        return _IDENTICAL
    return None, 0


def _version(raw: bytes | None) -> str:
    return "0 (none)" if raw is None else raw.decode(errors="replace")[:20]


def _commit(writer: KV, batch: Any, src: _Place, last: bytes | None, copied: int) -> None:
    assert last is not None
    marker = {"source": src.identity, "after": last.hex(), "copied": copied}
    batch.put(PROGRESS_KEY, json.dumps(marker).encode())
    writer.write(batch)


def _compare(reader: KV, writer: KV) -> tuple[dict[str, Any], bytes | None]:
    """Both stores side by side in key order: counts and differences."""
    counts: dict[str, Any] = {"source_keys": 0, "dest_keys": 0, "missing": 0, "extra": 0, "different": 0,
                              "first_difference": None}
    first_extra: bytes | None = None
    a, b = reader.scan(b"", page=BATCH_KEYS), writer.scan(b"", page=BATCH_KEYS)
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            counts["source_keys"] += 1
            counts["missing"] += 1
            counts["first_difference"] = counts["first_difference"] or x[0]  # type: ignore[index]
            x = next(a, None)
        elif x is None or y[0] < x[0]:
            counts["dest_keys"] += 1
            counts["extra"] += 1
            counts["first_difference"] = counts["first_difference"] or y[0]
            first_extra = first_extra or y[0]
            y = next(b, None)
        else:
            counts["source_keys"] += 1
            counts["dest_keys"] += 1
            if x[1] != y[1]:
                counts["different"] += 1
                counts["first_difference"] = counts["first_difference"] or x[0]
            x, y = next(a, None), next(b, None)
    return counts, first_extra


def _estimate(kv: KV) -> int:
    try:
        if kv.engine == "rocksdb":
            from .rocks import RocksKV

            assert isinstance(kv, RocksKV)
            return int(kv.rdict().property_int_value("rocksdb.estimate-num-keys") or 0)
        from .postgres import PostgresKV

        assert isinstance(kv, PostgresKV)
        return kv.estimate()
    except Exception:  # an estimate only feeds the progress bar
        return 0


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, wanted: bool) -> Any:
    if not wanted:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total or None, unit="keys", unit_scale=True, desc="copy", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, disable=os.environ.get("TERM") == "dumb")
