"""Crash safety (kill -9 after acknowledged writes), the one-process lock, and corrupt values."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ktulhu.store import Message, Store, StoreLockedError
from ktulhu.store import keys
from tests.paths import REPO

from .conftest import raw_put


WRITER = textwrap.dedent("""
    import sys
    from ktulhu.store import Store, Message, User
    store = Store.open(sys.argv[1])
    store.save_user(User(id="u", created_ts=1))
    print("ready", flush=True)
    i = 0
    while True:
        store.save_message(Message(id=f"m{i}", chat_id=f"c{i % 7}", role="user", text="x" * 200, ts=1_700_000_000_000 + i))
        store.increment_generation_count("u")
        print(i, flush=True)  # acknowledged: the call returned
        i += 1
""")


def test_acknowledged_writes_survive_kill_9(location: Path | str) -> None:
    path = location
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    acknowledged = -1
    deadline = time.monotonic() + 30
    while acknowledged < 2000 and time.monotonic() < deadline:
        acknowledged = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # lines already written to the pipe before the kill are acknowledged too
    for line in proc.stdout.read().split():
        acknowledged = max(acknowledged, int(line))
    assert acknowledged >= 1000

    store = Store.open(path)
    try:
        for i in range(acknowledged + 1):
            assert store.find_message(f"c{i % 7}", f"m{i}") is not None, i
        assert store.load_user("u").generation_count >= acknowledged + 1
        total = sum(len(store.list_messages_for_chat(f"c{c}")) for c in range(7))
        assert total >= acknowledged + 1
        assert store.statistics().corrupt_records == 0
    finally:
        store.close()


def test_a_second_process_gets_the_lock_error(tmp_path: Path) -> None:
    # RocksDB only: a directory belongs to one process; PostgreSQL is opened by several on purpose
    # (tests/store/test_postgres.py runs two stores on one database).
    path = tmp_path / "db"
    store = Store.open(path)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from ktulhu.store import Store;"
             "Store.open(Path(sys.argv[1]))", str(path)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert probe.returncode != 0
        assert "StoreLockedError" in probe.stderr
        assert "locked by another process; run one server per store" in probe.stderr
        with pytest.raises(StoreLockedError, match="run one server per store"):
            Store.open(path)  # a second opener in this process is refused the same way
    finally:
        store.close()
    Store.open(path).close()  # released on close


def test_corrupt_values_are_logged_counted_and_skipped(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.save_message(Message(id="good", chat_id="c", role="user", ts=1_700_000_000_000))
    store.save_message(Message(id="bad", chat_id="c", role="user", ts=1_700_000_000_001))
    store.ensure_chat_for_device("c", "dev")
    bad_key = store.get(keys.ix_msg_id("c", "bad"))
    raw_put(store, bad_key, b'{"id": "bad", "chat_id": "c", "ts": "not a number"')
    raw_put(store, keys.chat_meta_key("broken"), b"\x00\xff")
    raw_put(store, keys.user_key("u9"), b"[]")
    with caplog.at_level(logging.WARNING, logger="ktulhu.store"):
        assert [m.id for m in store.list_messages_for_chat("c")] == ["good"]
        assert [m.id for m in store.list_recent_messages(10)] == ["good"]
        assert store.find_message("c", "bad") is None
        assert store.load_chat("broken") is None
        assert [c.id for c in store.list_chats()] == ["c"]
        assert store.load_user("u9") is None and store.list_users() == []
        assert not store.set_message_liked("c", "bad", True)
    assert store.statistics().corrupt_records >= 7
    assert "corrupt Message record" in caplog.text and "corrupt Chat record" in caplog.text
    assert store.delete_message("c", "bad")  # a corrupt record can still be deleted
    assert store.delete_thread("c") == 1


def test_a_store_from_a_newer_ktulhu_is_refused(location: Path | str) -> None:
    from ktulhu.store import StoreError

    store = Store.open(location)
    raw_put(store, keys.SCHEMA_VERSION, b"99")
    store.close()
    with pytest.raises(StoreError, match="newer than this Ktulhu"):
        Store.open(location)
    Store.open(location, migrate=False).close()  # and the lock was released


def test_sync_mode_fsyncs_every_write_and_reads_back(tmp_path: Path) -> None:
    # RocksDB only: KTULHU_DB_SYNC is RocksDB's fsync per write (PostgreSQL commits always are durable)
    store = Store.open(tmp_path / "db", sync=True)
    try:
        assert store.statistics().sync is True and store._kv.write_options.sync is True
        store.save_message(Message(id="m", chat_id="c", role="user", ts=1_700_000_000_000))
    finally:
        store.close()
    store = Store.open(tmp_path / "db")
    try:
        assert store.find_message("c", "m") is not None
    finally:
        store.close()
