"""A real PostgreSQL server for the tests, from the Debian binaries: one per test session, in a temp
dir, on a free loopback port (its unix socket in the temp dir too), and a fresh database per test.

Used from `tests/conftest.py` (fixtures `postgres_server`, `postgres_url`); other test packages can
import `PostgresServer`, `start_server` and `fresh_database` for their own set-ups. PostgreSQL refuses
to run as root, so under root (as here and in CI) initdb and the server run as `nobody`.

`fsync=off` keeps the tests fast; durability of commits is the server's business (the store turns
`synchronous_commit` on, and the benchmark runs its own server with fsync on).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import psycopg
import pytest

from ktulhu import local_cluster
from ktulhu.ports import free_port

__all__ = ["PostgresServer", "fresh_database", "postgres_bin", "postgres_server", "postgres_url", "start_server",
           "stop_server"]

SUPERUSER = local_cluster.SUPERUSER
START_TIMEOUT_S = 60.0
_databases = itertools.count(1)


def postgres_bin() -> Path | None:
    """The newest installed Debian PostgreSQL's bin directory, or None."""
    try:
        return local_cluster.postgres_bin()
    except local_cluster.ClusterError:
        return None


@attrs.frozen
class PostgresServer:
    bin: Path
    directory: Path
    port: int
    process: subprocess.Popen[bytes] = attrs.field(eq=False, repr=False)

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        auth = SUPERUSER if password is None else f"{SUPERUSER}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"


def start_server(*, fsync: bool = False, extra: dict[str, str] | None = None) -> PostgresServer:
    """initdb in a new temp dir and start `postgres` there; returns once it accepts connections."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    directory = Path(tempfile.mkdtemp(prefix="ktulhu-pg-"))
    demote = local_cluster.unprivileged()
    data = directory / "data"
    local_cluster.initdb(bin_dir, data, sync=fsync)
    settings = {"fsync": "on" if fsync else "off", "full_page_writes": "on" if fsync else "off",
                "max_connections": "200", "shared_buffers": "128MB", **(extra or {})}
    port = free_port()
    with open(directory / "postgres.log", "ab") as log:
        if demote:
            os.chown(directory / "postgres.log", demote["user"], demote["group"])
        process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(directory),
             *itertools.chain.from_iterable(("-c", f"{k}={v}") for k, v in settings.items())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **demote,
        )
    server = PostgresServer(bin=bin_dir, directory=directory, port=port, process=process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            psycopg.connect(server.url(), connect_timeout=2).close()
            return server
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(server)
                raise RuntimeError(f"PostgreSQL did not start: {server.log.read_text()[-2000:]}") from None
            time.sleep(0.05)


def stop_server(server: PostgresServer) -> None:
    """`pg_ctl stop -m fast`, then remove its directory."""
    if server.process.poll() is None:
        subprocess.run([str(server.bin / "pg_ctl"), "stop", "-D", str(server.directory / "data"), "-m", "fast",
                        "-w", "-t", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **local_cluster.unprivileged())
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    shutil.rmtree(server.directory, ignore_errors=True)


def fresh_database(server: PostgresServer, *, password: str | None = None) -> str:
    """Create a new, empty database and return its URL (`password` only decorates the URL: the test
    cluster trusts loopback connections)."""
    name = f"t{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url(name, password=password)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole session; skipped only where no PostgreSQL is installed."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin): apt-get install postgresql")
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's server (one per test)."""
    return fresh_database(postgres_server)
