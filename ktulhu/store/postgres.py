"""The shared engine: one PostgreSQL database, used by several server processes (replicas) at once.

Layout: one table ``kv(k bytea PRIMARY KEY, v bytea NOT NULL)`` holding exactly the keys and values
a RocksDB store holds (bytea compares bytewise, as RocksDB does, so prefixes, key order and reverse
scans are the same), and ``ktulhu_schema(version)``, the version of this table layout (`LAYOUT_VERSION`;
the records' own schema stays in ``meta:schema_version``, migrated by `migrate.py` as on RocksDB).

Concurrency across processes:

- `hold(*names)` is one transaction on a pooled connection bound to the calling thread. It first
  takes ``pg_advisory_xact_lock`` on a stable 64-bit hash (BLAKE2b) of each name, in ascending
  order; every read and write inside goes through that transaction, which commits when the block
  ends (rolls back when it raises). So a read-modify-write (quota, rate bucket, message numbering,
  Stripe event) is exact across every process on the database, and all its writes land together.
- The identity lock is an advisory lock with a fixed key, taken inside the same transaction.
- Writes outside a hold are one transaction per batch; reads outside a hold use any pooled
  connection (each statement sees the latest commits).
- Scans read in pages by key (keyset pagination, first page `page` or `FIRST_PAGE`, growing to
  `MAX_PAGE`), so a reverse scan that stops after 25 entries reads one small page.
- Opening creates or checks the layout under a session advisory lock (`MIGRATION_LOCK`), and
  `migration_lock()` takes the same lock around the record migrations: replicas starting together
  migrate one after the other. Each open store then holds `IN_USE_LOCK` shared on its own session;
  `ktulhu store copy` into a database takes it exclusively, so it never writes under a server.

Commits are durable (``synchronous_commit = on`` on every connection). Errors name the database
as ``postgresql://user@host:port/db``: never with the password.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from . import keys
from .errors import StoreClosedError, StoreError, StoreLockedError, StoreWriteError
from .kv import upper_bound
from .location import InvalidStoreUrl, PgUrl
from .records import now_ms

__all__ = ["LAYOUT_VERSION", "POSTGRES_THREADS", "PgBatch", "PostgresKV", "lock_key"]

log = logging.getLogger("ktulhu.store")
T = TypeVar("T")

#: Version of the table layout (``ktulhu_schema``); 1 = the ``kv`` table.
LAYOUT_VERSION = 1
#: Worker threads `AsyncStore` uses on PostgreSQL by default: each call mostly waits on the server
#: (network round trips, the commit's WAL flush), so more threads keep more commits in flight and
#: let the server group them into one flush.
POSTGRES_THREADS = 16
#: Pooled connections beyond the worker threads (calls made from other threads, the sweeper).
POOL_EXTRA = 4
#: Entries read by the first page of a scan, and the most any later page reads.
FIRST_PAGE = 64
MAX_PAGE = 4096
#: Seconds to connect (unless the URL says ``connect_timeout``), and to wait for a free connection.
CONNECT_TIMEOUT_S = 10
POOL_TIMEOUT_S = 30


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for `name` (the same in every process and version)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


MIGRATION_LOCK = lock_key("ktulhu:store:migration")
IN_USE_LOCK = lock_key("ktulhu:store:in-use")
IDENTITY_LOCK = lock_key("ktulhu:store:identity")

GET = "SELECT v FROM kv WHERE k = %s"
GET_MANY = "SELECT k, v FROM kv WHERE k = ANY(%s)"
UPSERT_ONE = ("INSERT INTO kv (k, v) VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v "
              "WHERE kv.v IS DISTINCT FROM EXCLUDED.v")
#: Rows whose value is already the one written are left alone (no new row version): re-running a
#: copy, or re-writing an unchanged index entry, changes nothing.
UPSERT_MANY = ("INSERT INTO kv (k, v) SELECT * FROM unnest(%s::bytea[], %s::bytea[]) ON CONFLICT (k) "
               "DO UPDATE SET v = EXCLUDED.v WHERE kv.v IS DISTINCT FROM EXCLUDED.v")
DELETE_ONE = "DELETE FROM kv WHERE k = %s"
DELETE_MANY = "DELETE FROM kv WHERE k = ANY(%s)"
DELETE_RANGE = "DELETE FROM kv WHERE k >= %s AND k < %s"

Statement = tuple[str, tuple[Any, ...]]


class PgBatch:
    """Operations recorded in order; `statements` turns them into at most three statements per run
    of puts and deletes (the last operation on a key wins, as in a RocksDB WriteBatch)."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[tuple[bytes, bytes | None, bytes | None]] = []  # (key, value, range end)

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append((bytes(key), bytes(value), None))

    def delete(self, key: bytes) -> None:
        self.ops.append((bytes(key), None, None))

    def delete_range(self, begin: bytes, end: bytes) -> None:
        self.ops.append((bytes(begin), None, bytes(end)))

    def len(self) -> int:
        return len(self.ops)

    def statements(self) -> list[Statement]:
        out: list[Statement] = []
        final: dict[bytes, bytes | None] = {}

        def flush() -> None:
            deleted = [k for k, v in final.items() if v is None]
            written = [(k, v) for k, v in final.items() if v is not None]
            if len(deleted) == 1:
                out.append((DELETE_ONE, (deleted[0],)))
            elif deleted:
                out.append((DELETE_MANY, (deleted,)))
            if len(written) == 1:
                out.append((UPSERT_ONE, written[0]))
            elif written:
                out.append((UPSERT_MANY, ([k for k, _ in written], [v for _, v in written])))
            final.clear()

        for key, value, end in self.ops:
            if end is not None:
                flush()
                out.append((DELETE_RANGE, (key, end)))
            else:
                final[key] = value
        flush()
        return out


class AdvisoryLocks:
    """`KeyLocks` as transaction-level advisory locks (see the module docstring)."""

    def __init__(self, kv: "PostgresKV") -> None:
        self._kv = kv

    def hold(self, *names: str) -> AbstractContextManager[None]:
        return self._kv.transaction([lock_key(name) for name in names])

    @property
    def identity(self) -> AbstractContextManager[None]:
        return self._kv.transaction([IDENTITY_LOCK])


class PostgresKV:
    engine = "postgresql"
    #: Other processes number messages of the same chats: the tail is read under the chat's lock.
    trusts_tail_cache = False

    def __init__(self, url: PgUrl, pool: ConnectionPool, holder: psycopg.Connection) -> None:
        #: `POSTGRES_THREADS`, or fewer when the pool leaves room for fewer.
        self.default_threads = max(1, min(POSTGRES_THREADS, pool.max_size - POOL_EXTRA))
        self.url = url
        self.where = url.display
        self.pool = pool
        self.write_failure: str | None = None
        self.locks = AdvisoryLocks(self)
        self._holder = holder
        self._holder_lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        #: Rows fetched by scans so far (how much a scan read, for tests and diagnosis).
        self.rows_scanned = 0

    # --- opening and closing ----------------------------------------------------------------------

    @classmethod
    def open(cls, location: str | PgUrl, *, create: bool = True, exclusive: bool = False,
             connections: int | None = None) -> "PostgresKV":
        """Connect, create the layout if missing (`create`) or check it, and mark the database in use
        (shared; `exclusive` for a copy writing into it). Raises `StoreError` (unreachable, refused,
        newer layout, no store and not `create`) or `StoreLockedError` (in use)."""
        try:
            url = location if isinstance(location, PgUrl) else PgUrl.parse(location)
        except InvalidStoreUrl as error:
            raise StoreError(f"invalid PostgreSQL store URL: {error}") from None
        kwargs = _connection_kwargs(url)
        holder = _connect(url, kwargs)
        try:
            with _session_lock(holder, MIGRATION_LOCK, url):
                _ensure_layout(holder, url, create=create)
            if exclusive:
                taken = holder.execute("SELECT pg_try_advisory_lock(%s)", (IN_USE_LOCK,)).fetchone()
                if not (taken and taken[0]):
                    raise StoreLockedError(f"the store at {url} is in use (a server or another copy has it "
                                           "open); stop it first")
            else:
                taken = holder.execute("SELECT pg_try_advisory_lock_shared(%s)", (IN_USE_LOCK,)).fetchone()
                if not (taken and taken[0]):
                    raise StoreLockedError(f"the store at {url} is being written by `ktulhu store copy`; "
                                           "start the server once the copy has finished")
            size = max(2, connections or POSTGRES_THREADS + POOL_EXTRA)
            pool = ConnectionPool(url.url, min_size=min(2, size), max_size=size, kwargs=kwargs,
                                  configure=_configure, open=False, timeout=POOL_TIMEOUT_S,
                                  name="ktulhu-store")
            try:
                pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            except PoolTimeout:
                pool.close()
                raise StoreError(f"cannot connect to the store at {url}: the connection pool did not "
                                 f"start within {CONNECT_TIMEOUT_S} s") from None
        except BaseException:
            holder.close()
            raise
        return cls(url, pool, holder)

    def close(self) -> None:
        """Close every connection; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.pool.close(timeout=5)
        finally:
            with self._holder_lock:
                self._holder.close()

    @property
    def durable(self) -> bool:
        return True  # synchronous_commit = on

    # --- the thread's transaction -------------------------------------------------------------------

    @contextmanager
    def transaction(self, lock_keys: list[int]) -> Iterator[None]:
        """One transaction for the block, holding the advisory locks `lock_keys` (ascending); nested
        in a transaction of this thread, the locks join it and it commits at the outermost end."""
        ordered = sorted(set(lock_keys))
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            if ordered:
                self._read(lambda c: c.execute(_lock_sql(ordered)))
            yield
            return
        conn = self._begin("BEGIN" + ("; " + _lock_sql(ordered) if ordered else ""))
        self._local.conn = conn
        committed = False
        try:
            yield
            committed = True
        finally:
            self._local.conn = None
            self._end(conn, commit=committed)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every read of this thread in the block sees one snapshot (read-only transaction)."""
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("snapshot() inside a transaction")
        conn = self._begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._local.conn = conn
        try:
            yield
        finally:
            self._local.conn = None
            self._end(conn, commit=False)

    def _begin(self, statement: str) -> psycopg.Connection:
        for attempt in (1, 2):
            conn = self._getconn()
            try:
                conn.execute(statement)
                return conn
            except psycopg.Error as error:
                broken = conn.broken
                self.pool.putconn(conn)
                if broken and attempt == 1:  # an idle connection the server dropped: try a fresh one
                    self.pool.check()
                    continue
                raise StoreError(f"the store at {self.where} cannot be used: {self._text(error)}") from None
        raise AssertionError("unreachable")

    def _end(self, conn: psycopg.Connection, *, commit: bool) -> None:
        try:
            if commit:
                if conn.info.transaction_status == pq.TransactionStatus.INERROR:
                    raise self._write_error("a statement of the transaction failed")
                try:
                    conn.execute("COMMIT")
                except psycopg.Error as error:
                    raise self._write_error(self._text(error)) from None
            elif not conn.broken:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    pass  # the pool discards a connection it cannot reset
        finally:
            self.pool.putconn(conn)

    def _getconn(self) -> psycopg.Connection:
        if self._closed:
            raise StoreClosedError(f"the store at {self.where} is closed")
        try:
            return self.pool.getconn(timeout=POOL_TIMEOUT_S)
        except PoolClosed:
            raise StoreClosedError(f"the store at {self.where} is closed") from None
        except PoolTimeout:
            raise StoreError(f"the store at {self.where} gave no connection within {POOL_TIMEOUT_S} s "
                             "(server unreachable, or every connection busy)") from None

    def _read(self, run: Callable[[psycopg.Connection], T]) -> T:
        """`run` on this thread's transaction, or on a pooled connection (retried once on a fresh one
        when the first turns out to be dead: a read changes nothing)."""
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                return run(conn)
            except psycopg.Error as error:
                raise StoreError(f"the store at {self.where} cannot be read: {self._text(error)}") from None
        for attempt in (1, 2):
            conn = self._getconn()
            try:
                return run(conn)
            except psycopg.Error as error:
                broken = conn.broken
                if broken and attempt == 1:
                    self.pool.putconn(conn)
                    conn = None
                    self.pool.check()
                    continue
                raise StoreError(f"the store at {self.where} cannot be read: {self._text(error)}") from None
            finally:
                if conn is not None:
                    self.pool.putconn(conn)
        raise AssertionError("unreachable")

    # --- KV -----------------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        row = self._read(lambda c: c.execute(GET, (key,), binary=True).fetchone())
        return None if row is None else row[0]

    def get_many(self, keys_: list[bytes]) -> list[bytes | None]:
        if not keys_:
            return []
        rows = self._read(lambda c: c.execute(GET_MANY, (list(keys_),), binary=True).fetchall())
        found = dict(rows)
        return [found.get(bytes(k)) for k in keys_]

    def batch(self) -> PgBatch:
        return PgBatch()

    def write(self, batch: Any) -> None:
        assert isinstance(batch, PgBatch)
        statements = batch.statements()
        if not statements:
            return
        conn: psycopg.Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is not None:
                _execute(conn, statements)  # committed with the hold's transaction
                return
            for attempt in (1, 2):
                conn = self._getconn()
                try:
                    if len(statements) == 1:
                        conn.execute(*statements[0])  # one statement: its own transaction
                    else:
                        with conn.transaction():
                            _execute(conn, statements)
                    return
                except psycopg.OperationalError:
                    # a dead idle connection fails before the server sees anything; the batch's
                    # operations are idempotent, so one retry on a fresh connection is safe
                    if conn.broken and attempt == 1:
                        self.pool.putconn(conn)
                        conn = None
                        self.pool.check()
                        continue
                    raise
                finally:
                    if conn is not None:
                        self.pool.putconn(conn)
        except psycopg.Error as error:
            raise self._write_error(self._text(error)) from None

    def scan(self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None,
             page: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        end = upper_bound(prefix)
        size = max(1, page or FIRST_PAGE)
        cursor = after
        while True:
            conditions: list[str] = []
            params: list[Any] = []
            if prefix:
                conditions.append("k >= %s")
                params.append(prefix)
            if end is not None:
                conditions.append("k < %s")
                params.append(end)
            if cursor is not None:
                conditions.append("k < %s" if reverse else "k > %s")
                params.append(cursor)
            where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
            query = f"SELECT k, v FROM kv{where} ORDER BY k {'DESC' if reverse else 'ASC'} LIMIT {size}"
            rows = self._read(lambda c: c.execute(query, params, binary=True).fetchall())
            self.rows_scanned += len(rows)  # approximate under threads; exact for one caller
            yield from rows
            if len(rows) < size:
                return
            cursor = rows[-1][0]
            size = min(size * 4, MAX_PAGE)

    def is_empty(self) -> bool:
        return self._read(lambda c: c.execute("SELECT 1 FROM kv LIMIT 1").fetchone()) is None

    def count(self) -> int:
        row = self._read(lambda c: c.execute("SELECT count(*) FROM kv").fetchone())
        return int(row[0]) if row else 0

    def estimate(self) -> int:
        """The planner's estimate of the number of keys (instant; for progress bars)."""
        row = self._read(lambda c: c.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass('kv')").fetchone())
        if not row or row[0] is None or row[0] < 0:  # never analysed: count (seconds at most)
            return self.count()
        return int(row[0])

    def put_durable(self, key: bytes, value: bytes) -> None:
        batch = PgBatch()
        batch.put(key, value)
        self.write(batch)

    @contextmanager
    def migration_lock(self) -> Iterator[None]:
        with self._holder_lock, _session_lock(self._holder, MIGRATION_LOCK, self.url):
            yield

    def recover(self) -> bool:
        """After a failed write: drop dead connections and prove the database takes writes."""
        try:
            self.pool.check()
            batch = PgBatch()
            batch.put(keys.WRITE_PROBE, str(now_ms()).encode())
            self.write(batch)
        except StoreError as error:
            self.write_failure = str(error)
            return False
        self.write_failure = None
        return True

    # --- errors -------------------------------------------------------------------------------------

    def _text(self, error: BaseException) -> str:
        return self.url.redact(" ".join(str(error).split()))[:500]

    def _write_error(self, text: str) -> StoreWriteError:
        self.write_failure = text
        return StoreWriteError(f"the store at {self.where} cannot be written: {text}")


# --- helpers ----------------------------------------------------------------------------------------


def _lock_sql(ordered: list[int]) -> str:
    """One statement taking the locks left to right (the keys are integers we computed)."""
    return "SELECT " + ", ".join(f"pg_advisory_xact_lock({int(k)})" for k in ordered)


def _execute(conn: psycopg.Connection, statements: list[Statement]) -> None:
    if len(statements) == 1:
        conn.execute(*statements[0])
        return
    with conn.pipeline():  # one round trip for the whole batch
        for query, params in statements:
            conn.execute(query, params)


def _connection_kwargs(url: PgUrl) -> dict[str, Any]:
    params = conninfo_to_dict(url.url)
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    if "application_name" not in params:
        kwargs["application_name"] = "ktulhu"
    return kwargs


def _configure(conn: psycopg.Connection) -> None:
    conn.execute("SET synchronous_commit = on")  # a commit that returned is on the server's disk


def _connect(url: PgUrl, kwargs: dict[str, Any]) -> psycopg.Connection:
    try:
        conn = psycopg.connect(url.url, **kwargs)
        _configure(conn)
        return conn
    except psycopg.Error as error:
        text = url.redact(" ".join(str(error).split()))[:500]
        raise StoreError(f"cannot connect to the store at {url}: {text}") from None


@contextmanager
def _session_lock(conn: psycopg.Connection, key: int, url: PgUrl) -> Iterator[None]:
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.Error as error:
        raise StoreError(f"the store at {url} cannot be used: {url.redact(str(error))}") from None
    try:
        yield
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error:
            pass  # a session that died has released it


def _ensure_layout(conn: psycopg.Connection, url: PgUrl, *, create: bool) -> None:
    """Create the tables of a new store, or check the layout version of an existing one."""
    try:
        with conn.transaction():
            row = conn.execute("SELECT to_regclass('ktulhu_schema') IS NOT NULL").fetchone()
            if not (row and row[0]):
                if not create:
                    raise StoreError(f"there is no Ktulhu store at {url} (no ktulhu_schema table)")
                conn.execute("CREATE TABLE ktulhu_schema (version integer NOT NULL)")
                conn.execute("CREATE TABLE IF NOT EXISTS kv (k bytea PRIMARY KEY, v bytea NOT NULL)")
                conn.execute("INSERT INTO ktulhu_schema (version) VALUES (%s)", (LAYOUT_VERSION,))
                log.info("new store layout %d in %s", LAYOUT_VERSION, url)
                return
            row = conn.execute("SELECT max(version) FROM ktulhu_schema").fetchone()
            version = row[0] if row else None
            if version is None or version < 1:
                raise StoreError(f"the store at {url} has an empty ktulhu_schema table; it was not made by Ktulhu")
            if version > LAYOUT_VERSION:
                raise StoreError(f"the store at {url} has table layout {version}, newer than this Ktulhu "
                                 f"understands ({LAYOUT_VERSION}); upgrade Ktulhu or use another database")
    except psycopg.Error as error:
        raise StoreError(f"the store at {url} cannot be set up: {url.redact(' '.join(str(error).split()))}") from None
