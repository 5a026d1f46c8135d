"""One PostgreSQL connection driven from trio: libpq's non-blocking API (through `psycopg.pq`) with
trio's own socket waits, for the few things that must wait on the server rather than run a query:
LISTEN/NOTIFY and session advisory locks held for a whole chat turn (`ktulhu/replicas.py`).

psycopg's async layer speaks asyncio only, and a blocking wait on a worker thread cannot be
cancelled; here every wait is a trio wait. A cancelled wait closes the connection, which is also
how the server learns to drop a pending lock request: closing is the cancel. The store's own
queries stay on psycopg's pool in worker threads (`ktulhu/store/`).
"""

from __future__ import annotations

import psycopg
import trio
from psycopg import pq

__all__ = ["PgSession", "PgWireError"]

#: Seconds a connection attempt may take before it is given up.
CONNECT_TIMEOUT_S = 10.0


class PgWireError(Exception):
    """The server refused, failed a statement or went away; the session is closed."""


class PgSession:
    """A connected session; use `async with await PgSession.connect(url)` or close it yourself.

    One task at a time uses a session (a query, or waiting for notifications)."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self._pgconn = pgconn
        self._closed = False

    @classmethod
    async def connect(cls, conninfo: str, *, timeout: float = CONNECT_TIMEOUT_S) -> "PgSession":
        pgconn = pq.PGconn.connect_start(conninfo.encode())
        session = cls(pgconn)
        try:
            with trio.fail_after(timeout):
                while True:
                    state = pgconn.connect_poll()
                    if state == pq.PollingStatus.OK:
                        break
                    if state == pq.PollingStatus.FAILED:
                        raise PgWireError(_error_text(pgconn, "connection failed"))
                    if state == pq.PollingStatus.READING:
                        await trio.lowlevel.wait_readable(pgconn.socket)
                    else:
                        await trio.lowlevel.wait_writable(pgconn.socket)
        except trio.TooSlowError:
            session.close()
            raise PgWireError(f"no answer from PostgreSQL within {timeout:g} s") from None
        except BaseException:
            session.close()
            raise
        pgconn.nonblocking = 1
        return session

    @property
    def backend_pid(self) -> int:
        return self._pgconn.backend_pid

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the socket (idempotent): the server ends the session and releases its locks."""
        if self._closed:
            return
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._pgconn.socket)
        except Exception:  # no socket (the connection never started)
            pass
        self._pgconn.finish()

    async def __aenter__(self) -> "PgSession":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def execute(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run `sql` (no parameters: callers pass only integers and quoted literals) and return the
        rows of its last statement as text. A cancelled call closes the session."""
        pgconn = self._check()
        try:
            pgconn.send_query(sql.encode())
            while pgconn.flush():
                await trio.lowlevel.wait_writable(pgconn.socket)
            rows: list[tuple[str | None, ...]] = []
            failure = None
            while True:
                while pgconn.is_busy():
                    await trio.lowlevel.wait_readable(pgconn.socket)
                    self._consume()
                result = pgconn.get_result()
                if result is None:
                    break
                if result.status == pq.ExecStatus.TUPLES_OK:
                    rows = [tuple(_text(result.get_value(r, c)) for c in range(result.nfields))
                            for r in range(result.ntuples)]
                elif result.status != pq.ExecStatus.COMMAND_OK:
                    failure = (result.error_message or b"").decode(errors="replace").strip() or "statement failed"
        except psycopg.OperationalError as error:
            self.close()
            raise PgWireError(str(error)) from None
        except BaseException:
            self.close()
            raise
        if failure is not None:
            raise PgWireError(failure)
        return rows

    async def notifications(self) -> tuple[str, str, int]:
        """The next notification on a channel this session LISTENs to: (channel, payload, sender pid)."""
        pgconn = self._check()
        while True:
            notify = pgconn.notifies()
            if notify is not None:
                return notify.relname.decode(), notify.extra.decode(errors="replace"), notify.be_pid
            try:
                await trio.lowlevel.wait_readable(pgconn.socket)
                self._consume()
            except BaseException:
                self.close()
                raise

    def _consume(self) -> None:
        try:
            self._pgconn.consume_input()
        except psycopg.OperationalError as error:
            raise PgWireError(f"the connection to PostgreSQL was lost: {error}") from None

    def _check(self) -> pq.abc.PGconn:
        if self._closed:
            raise PgWireError("the PostgreSQL session is closed")
        return self._pgconn


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _error_text(pgconn: pq.abc.PGconn, fallback: str) -> str:
    text = (pgconn.error_message or b"").decode(errors="replace").strip()
    return text or fallback
