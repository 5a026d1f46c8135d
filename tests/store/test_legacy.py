"""A `chatdb/` written by the original opens, reads in order, and gets its indexes by migration (on
PostgreSQL: the same directory copied into a database with `ktulhu store copy`, then opened)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rocksdict import Options, Rdict

from ktulhu.store import Message, Store
from ktulhu.store import keys
from ktulhu.store.migrate import SCHEMA_VERSION, rebuild_indexes

from .conftest import LEGACY_MESSAGES, Location, dump, raw_delete


def test_original_db_opens_and_reads(legacy_location: Location) -> None:
    store = Store.open(legacy_location)
    try:
        assert store.schema_version == SCHEMA_VERSION
        thread = store.list_messages_for_chat("c-legacy-1")
        # key order of the original: second, then id
        assert [m.id for m in thread] == ["zz-prompt", "aa-reply", "sum-1"]
        assert thread[0].text == "Привет" and thread[0].attachments[0].labels == ["cat"]
        assert thread[0].meta["classifier"]["speech_act"]["label"] == "question"
        assert store.load_chat("c-legacy-1").meta == {"has_summary": True}
        assert store.load_user("u-legacy-2").role == "free"
        assert store.find_user_by_email("ANN@example.com ").id == "u-legacy-1"
        assert store.find_user_by_provider("google:1234").id == "u-legacy-2"
        assert store.find_user_by_provider("email:ann@example.com").id == "u-legacy-1"
        assert [d.id for d in store.find_devices_by_hash("dev-a")] == ["d0c1"]
        assert [c.id for c in store.list_chats_for_device("dev-a")] == ["c-legacy-1"]
        assert [c.id for c in store.list_chats_for_user("u-legacy-1")] == ["c-legacy-1"]
        assert store.chat_summary("c-legacy-1").id == "sum-1"
        assert [m.id for m in store.list_recent_messages(2)] == ["sum-1", "aa-reply"]
        assert [c.id for c in store.list_recent_chats(5)] == ["c-legacy-1", "c-legacy-2"]
        assert store.find_message("c-legacy-2", "old-1").text == "hi"
        assert store.statistics().corrupt_records == 0
    finally:
        store.close()


def test_original_records_are_left_byte_for_byte(legacy_location: Location) -> None:
    store = Store.open(legacy_location)
    try:
        for chat_id, ts, message_id, raw in LEGACY_MESSAGES:
            assert store.get(keys.legacy_msg_key(chat_id, ts, message_id)) == raw
    finally:
        store.close()


def test_new_messages_follow_old_ones_with_ms_and_seq(legacy_location: Location) -> None:
    store = Store.open(legacy_location)
    try:
        reply = store.save_message(Message(id="new-1", chat_id="c-legacy-1", role="user", ts=1_800_000_000_000))
        assert reply.seq == 1
        assert [m.id for m in store.list_messages_for_chat("c-legacy-1")][-2:] == ["sum-1", "new-1"]
        assert [m.id for m in store.list_messages_for_chat("c-legacy-1", last=2)] == ["sum-1", "new-1"]
        assert store.list_recent_messages(1)[0].id == "new-1"
        # a stale ms clock still cannot put a new message before an old second-resolution one
        early = store.save_message(Message(id="new-2", chat_id="c-legacy-2", role="user", ts=5))
        assert early.ts_ms >= 1_690_000_000_000
        assert store.set_message_liked("c-legacy-2", "old-1", True)
        assert store.find_message("c-legacy-2", "old-1").liked
    finally:
        store.close()


def test_migration_is_idempotent(legacy_location: Location) -> None:
    store = Store.open(legacy_location)
    first = dump(store)
    rebuild_indexes(store)
    assert dump(store) == first
    store.close()
    store = Store.open(legacy_location)  # at the current version: nothing to do
    assert dump(store) == first
    # an interrupted migration (version never written) simply runs again
    raw_delete(store, keys.SCHEMA_VERSION)
    store.close()
    store = Store.open(legacy_location)
    assert dump(store) == first
    store.close()


def test_migration_skips_injected_and_corrupt_records(tmp_path: Path, on_engine: Callable[[Path], Location]) -> None:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    db = Rdict(str(tmp_path / "db"), options)
    # the original's defect: chat id "abc:msg:x" puts its messages under chat "abc"'s prefix
    db[b"chat:abc:msg:x:msg:00000000001700000000:m1"] = (
        b'{"id":"m1","chat_id":"abc:msg:x","role":"user","ts":1700000000}')
    db[b"chat:abc:msg:00000000001700000000:m2"] = b'{"id":"m2","chat_id":"abc","role":"user","ts":1700000000}'
    db[b"chat:abc:msg:00000000001700000001:m3"] = b"{garbage"
    db[b"chat:meta:meta"] = b'{"id":"m9","chat_id":"meta","role":"user","ts":1}'  # Message under chat:meta:
    db.close()
    store = Store.open(on_engine(tmp_path / "db"))
    try:
        assert [m.id for m in store.list_messages_for_chat("abc")] == ["m2"]
        stats = store.statistics()
        assert stats.foreign_records >= 1 and stats.corrupt_records >= 1
        assert [m.id for m in store.list_recent_messages(10)] == ["m2"]
        assert store.list_chats() == []
    finally:
        store.close()
