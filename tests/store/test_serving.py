"""A server on a PostgreSQL store (`KTULHU_STORE=postgresql://...`): it serves a chat history copied
from the original server's RocksDB `chatdb/`, its writes are seen by another replica's store, and a
malformed URL or an unreachable database stops `ktulhu serve` with one line that never shows the
password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ktulhu.ports import free_port
from ktulhu.store import Store
from ktulhu.store.copy import copy_store

from .conftest import write_legacy_db

BIN = Path(sys.executable).parent
PASSWORD = "serve-s3cret"


@pytest.fixture
def engine() -> str:
    return "postgresql"


async def test_a_server_on_postgresql_serves_a_history_copied_from_rocksdb(
        live_server, server_dir: Path, location: str, clean_env: None) -> None:
    write_legacy_db(server_dir / "old-chatdb")
    assert copy_store(server_dir / "old-chatdb", location, progress=False).verified
    url = location.replace("ktulhu@", f"ktulhu:{PASSWORD}@")  # trust auth: the password only has to stay hidden
    async with live_server(KTULHU_STORE=url) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            ready = (await client.get("/readyz")).json()
            assert ready["status"] == "ready"
            assert ready["components"]["store"]["path"] == location  # shown without the password
            assert PASSWORD not in str(ready)
            thread = (await client.get("/chat-thread/c-legacy-1")).json()
            assert [m["id"] for m in thread["messages"]] == ["zz-prompt", "aa-reply", "sum-1"]
            assert thread["messages"][0]["text"] == "Привет"
            put = await client.put("/chat-thread/c-legacy-1/summary", json={"summary": "Greeting, again"})
            assert put.status_code == 200, put.text
        assert server.runtime.store.engine == "postgresql"
        replica = Store.open(location)  # another front-end on the same database sees the write at once
        try:
            assert replica.chat_summary("c-legacy-1").text == "Greeting, again"
            assert replica.schema_version == 1  # the server migrated the copied original store
        finally:
            replica.close()


def serve(server_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
    full_env.update(env)
    return subprocess.run([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], cwd=server_dir,
                          env=full_env, capture_output=True, text=True, timeout=120)


def test_an_unreachable_database_stops_the_server_with_one_line(server_dir: Path, postgres_server) -> None:

    port = free_port()
    result = serve(server_dir, KTULHU_STORE=f"postgresql://ktulhu:{PASSWORD}@127.0.0.1:{port}/chats")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    lines = [line for line in out.splitlines() if "ktulhu stopped" in line]
    assert len(lines) == 1 and "store service failed" in lines[0]
    assert f"cannot connect to the store at postgresql://ktulhu@127.0.0.1:{port}/chats" in lines[0]
    assert PASSWORD not in out and "Traceback" not in out


def test_a_malformed_store_url_is_a_configuration_error(server_dir: Path) -> None:
    result = serve(server_dir, KTULHU_STORE=f"postgresql://ktulhu:{PASSWORD}@db.internal:54x2/chats")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "KTULHU_STORE='postgresql://ktulhu:***@db.internal:54x2/chats'" in out
    assert "not a usable PostgreSQL URL" in out and PASSWORD not in out


def test_doctor_checks_a_postgresql_store(location: str, tmp_path: Path) -> None:

    from ktulhu import doctor
    from ktulhu.settings import load_settings

    url = location.replace("ktulhu@", f"ktulhu:{PASSWORD}@")
    check = doctor.store_check(load_settings(environ={"KTULHU_STORE": url}, root=tmp_path), live=False)
    assert check.status == "ok" and "tables created at first start" in check.summary and PASSWORD not in check.summary
    Store.open(location).close()
    check = doctor.store_check(load_settings(environ={"KTULHU_STORE": url}, root=tmp_path), live=False)
    assert check.status == "ok" and check.summary == f"{location} answers"
    down = f"postgresql://ktulhu:{PASSWORD}@127.0.0.1:{free_port()}/chats"
    check = doctor.store_check(load_settings(environ={"KTULHU_STORE": down}, root=tmp_path), live=False)
    assert check.status == "fail" and "cannot be reached" in check.summary and PASSWORD not in check.summary
