"""Hostile ids are rejected before they reach a key: nothing is read or written for them."""

from __future__ import annotations

import pytest

from ktulhu.store import InvalidId, Message, Store, User, check_id
from ktulhu.store.records import Chat

from .conftest import dump

HOSTILE = ["a:msg:b", "meta", "", "x" * 10_240, "a/b", "a b", "ä", "a\x00b", "chat:meta:x", "..", "x" * 129]


@pytest.mark.parametrize("bad", HOSTILE)
def test_check_id_rejects(bad: str) -> None:
    with pytest.raises(InvalidId):
        check_id(bad)


@pytest.mark.parametrize("bad", [None, 5, b"abc"])
def test_check_id_rejects_non_strings(bad: object) -> None:
    with pytest.raises(InvalidId):
        check_id(bad)


@pytest.mark.parametrize("good", ["a", "A-z_0", "x" * 128, "0b7c1f3e-5d4a-4c7b-9a1e-2f3d4c5b6a7e"])
def test_check_id_accepts(good: str) -> None:
    assert check_id(good) == good


@pytest.mark.parametrize("bad", HOSTILE)
def test_operations_reject_hostile_ids_without_touching_the_db(store: Store, bad: str) -> None:
    before = dump(store)
    calls = [
        lambda: store.save_message(Message(id="m", chat_id=bad, role="user", ts=1)),
        lambda: store.save_message(Message(id=bad, chat_id="c", role="user", ts=1)),
        lambda: store.list_messages_for_chat(bad),
        lambda: store.delete_message("c", bad),
        lambda: store.delete_message(bad, "m"),
        lambda: store.set_message_liked(bad, "m", True),
        lambda: store.save_chat(Chat(id=bad, updated_ts=1)),
        lambda: store.save_chat(Chat(id="c", device_hash=bad or "a:b", updated_ts=1)),
        lambda: store.ensure_chat_for_device(bad or "meta", "dev"),
        lambda: store.touch_chat(bad),
        lambda: store.delete_thread(bad),
        lambda: store.load_chat(bad),
        lambda: store.list_chats_for_device(bad or "a:b"),
        lambda: store.save_user(User(id=bad, created_ts=1)),
        lambda: store.load_user(bad),
        lambda: store.delete_user(bad),
        lambda: store.increment_generation_count(bad),
        lambda: store.add_device_for_user("u", bad or "a:b"),
        lambda: store.record_stripe_event(bad, "x"),
    ]
    for call in calls:
        with pytest.raises(InvalidId):
            call()
    assert dump(store) == before


def test_a_chat_id_cannot_reach_into_another_chat(store: Store) -> None:
    store.save_message(Message(id="m1", chat_id="abc", role="user", ts=1))
    with pytest.raises(InvalidId):
        store.save_message(Message(id="x", chat_id="abc:msg:x", role="user", ts=1))
    assert [m.id for m in store.list_messages_for_chat("abc")] == ["m1"]
