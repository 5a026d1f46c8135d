"""Every operation of the original's §6.3, plus the indexed look-ups Ktulhu adds."""

from __future__ import annotations

import pytest

from ktulhu.store import ApiKey, Chat, IdentityTaken, Message, Store, StoreClosedError, User


def msg(mid: str, chat: str = "c1", role: str = "user", ts: int = 1_700_000_000_000, **kw: object) -> Message:
    return Message(id=mid, chat_id=chat, role=role, ts=ts, **kw)


def test_messages_keep_send_order_within_one_millisecond(store: Store) -> None:
    for i, role in enumerate(["user", "assistant", "user", "assistant"]):
        store.save_message(msg(f"zz{9 - i}", role=role, ts=1_700_000_000_000))
    assert [m.id for m in store.list_messages_for_chat("c1")] == ["zz9", "zz8", "zz7", "zz6"]
    assert [m.seq for m in store.list_messages_for_chat("c1")] == [1, 2, 3, 4]


def test_a_reply_with_an_earlier_clock_still_sorts_after_its_prompt(store: Store) -> None:
    store.save_message(msg("p", ts=1_700_000_002_000))
    reply = store.save_message(msg("r", role="assistant", ts=1_700_000_001_000))
    assert reply.ts == 1_700_000_002_000 and reply.seq == 2
    assert [m.id for m in store.list_recent_messages(2)] == ["p", "r"]  # ts tie: id ascending


def test_saving_an_existing_id_replaces_in_place(store: Store) -> None:
    store.save_message(msg("a"))
    store.save_message(msg("b"))
    store.save_message(msg("a", text="edited", ts=1_700_000_000_500))
    assert [(m.id, m.text) for m in store.list_messages_for_chat("c1")] == [("a", "edited"), ("b", None)]
    assert len(store.list_recent_messages(10)) == 2


def test_find_like_delete(store: Store) -> None:
    store.save_message(msg("a"))
    assert store.find_message("c1", "a").id == "a"
    assert store.find_message("c1", "nope") is None
    assert store.set_message_liked("c1", "a", True) and store.find_message("c1", "a").liked
    assert not store.set_message_liked("c1", "nope", True)
    assert store.delete_message("c1", "a")
    assert not store.delete_message("c1", "a")
    assert store.list_messages_for_chat("c1") == [] and store.list_recent_messages(5) == []


def test_list_last_n(store: Store) -> None:
    for i in range(10):
        store.save_message(msg(f"m{i}", ts=1000 + i))
    assert [m.id for m in store.list_messages_for_chat("c1", last=3)] == ["m7", "m8", "m9"]
    assert store.list_messages_for_chat("c1", last=0) == []
    assert len(store.list_messages_for_chat("c1", last=50)) == 10


def test_recent_messages_across_chats(store: Store) -> None:
    for i in range(30):
        store.save_message(msg(f"m{i:02d}", chat=f"c{i % 3}", ts=10_000_000_000_000 + i * 7 % 11))
    recent = store.list_recent_messages(25)
    expected = sorted(
        (m for c in ("c0", "c1", "c2") for m in store.list_messages_for_chat(c)), key=lambda m: (-m.ts_ms, m.id)
    )[:25]
    assert [m.id for m in recent] == [m.id for m in expected]
    assert store.list_recent_messages(0) == [] and store.list_recent_messages(-1) == []


def test_summaries(store: Store) -> None:
    store.save_message(msg("a"))
    assert store.chat_summary("c1") is None
    store.save_message(msg("s1", role="summary", text="one"))
    store.save_message(msg("b"))
    assert store.chat_summary("c1").text == "one"
    new = store.replace_summary("c1", "two", language="en")
    assert store.chat_summary("c1").id == new.id
    assert [m.role for m in store.list_messages_for_chat("c1")] == ["user", "user", "summary"]
    assert store.remove_messages_by_role("c1", "summary") == 1
    assert store.chat_summary("c1") is None
    store.save_message(msg("s2", role="summary", text="x"))
    store.save_message(msg("s3", role="summary", text="y"))
    store.delete_message("c1", "s3")
    assert store.chat_summary("c1").id == "s2"


def test_chat_device_index_follows_the_original_rules(store: Store) -> None:
    store.save_chat(Chat(id="c1", device_hash="d1", updated_ts=1))
    assert [c.id for c in store.list_chats_for_device("d1")] == ["c1"]
    store.save_chat(Chat(id="c1", device_hash="d2", updated_ts=2))
    assert store.list_chats_for_device("d1") == [] and [c.id for c in store.list_chats_for_device("d2")] == ["c1"]
    store.save_chat(Chat(id="c1", device_hash=None, updated_ts=3))
    assert store.list_chats_for_device("d2") == []
    store.save_chat(Chat(id="c2", device_hash="", updated_ts=3))
    assert store.list_chats_for_device("") == []


def test_ensure_touch_and_delete_thread(store: Store) -> None:
    chat, created = store.ensure_chat_for_device("c1", "d1")
    assert created and chat.device_hash == "d1"
    assert store.ensure_chat_for_device("c1", "other") == (chat, False)
    fresh, created = store.ensure_chat_for_device("", "d1")
    assert created and len(fresh.id) == 36
    store.save_message(msg("s", role="summary"))
    touched = store.touch_chat("c1", "d9", user_id="u1", now=5_000)
    assert touched.device_hash == "d1" and touched.user_id == "u1" and touched.meta == {"has_summary": True}
    assert touched.updated_ts == 5_000
    assert [c.id for c in store.list_chats_owned_by("u1")] == ["c1"]
    assert store.touch_chat("new", "d3").meta == {}
    assert store.delete_thread("c1") == 1
    assert store.load_chat("c1") is None and store.list_messages_for_chat("c1") == []
    assert store.list_chats_for_device("d1") == [fresh] and store.list_chats_owned_by("u1") == []
    assert store.delete_thread("c1") == 0


def test_update_chat_and_recent_chats(store: Store) -> None:
    for i in range(5):
        store.save_chat(Chat(id=f"c{i}", updated_ts=1000 + i))
    assert [c.id for c in store.list_recent_chats(2)] == ["c4", "c3"]
    store.update_chat("c0", lambda c: Chat(id=c.id, title="hello", updated_ts=9999))
    assert [c.id for c in store.list_recent_chats(2)] == ["c0", "c4"]
    assert store.update_chat("missing", lambda c: c) is None
    assert len(store.list_chats()) == 5


def test_users_by_email_and_provider(store: Store) -> None:
    ann = User(id="u1", created_ts=1, email="Ann@Example.com", external_id="email:ann@example.com",
               meta={"email": "ann@example.com", "auth_methods": ["email"]})
    store.save_user(ann)
    assert store.find_user_by_email(" ann@example.COM").id == "u1"
    with pytest.raises(IdentityTaken) as taken:
        store.save_user(User(id="u2", created_ts=2, email="ann@example.com"))
    assert taken.value.owner_id == "u1" and store.load_user("u2") is None
    merged = store.update_user("u1", lambda u: _add_method(u, "google:42"))
    assert merged and store.find_user_by_provider("google:42").id == "u1"
    store.update_user("u1", lambda u: _set_email(u, "new@example.com"))
    assert store.find_user_by_email("ann@example.com") is None
    assert store.find_user_by_email("new@example.com").id == "u1"
    store.save_user(User(id="u2", created_ts=2, email="ann@example.com"))  # freed: allowed now
    assert [u.id for u in store.list_users()] == ["u1", "u2"]
    assert store.update_user("nobody", lambda u: u) is None


def _add_method(user: User, method: str) -> User:
    user.meta["auth_methods"].append(method)
    return user


def _set_email(user: User, email: str) -> User:
    user.email = email
    return user


def test_devices_dedup_and_delete_user(store: Store) -> None:
    store.save_user(User(id="u1", created_ts=1, email="a@b.c"))
    first = store.add_device_for_user("u1", "dev", now=10)
    again = store.add_device_for_user("u1", "dev", now=20)
    assert again.id == first.id and again.last_seen_ts == 20 and again.created_ts == 10
    store.add_device_for_user("u2", "dev", now=30)
    assert len(store.list_devices_for_user("u1")) == 1 and len(store.list_all_devices()) == 2
    assert {d.user_id for d in store.find_devices_by_hash("dev")} == {"u1", "u2"}
    assert store.user_id_for_device("dev") == "u2"
    store.save_chat(Chat(id="c1", device_hash="dev", updated_ts=1))
    assert [c.id for c in store.list_chats_for_user("u1")] == ["c1"]
    store.save_api_key(ApiKey(id="k1", user_id="u1", secret_hash="h", created_ts=1))
    assert store.delete_user("u1")
    assert store.load_user("u1") is None and store.find_user_by_email("a@b.c") is None
    assert [d.user_id for d in store.find_devices_by_hash("dev")] == ["u2"]
    assert store.load_api_key("k1") is None and store.load_chat("c1") is not None
    assert not store.delete_user("u1")


def test_quota(store: Store) -> None:
    store.save_user(User(id="u1", created_ts=1))
    results = [store.increment_generation_count("u1", limit=3) for _ in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert store.load_user("u1").generation_count == 3
    assert store.increment_generation_count("u1", by=-1).generation_count == 2
    assert store.increment_generation_count("ghost").generation_count is None


def test_api_keys_stripe_events_rate_limits(store: Store) -> None:
    store.save_api_key(ApiKey(id="k1", user_id="u1", secret_hash="h1", created_ts=1))
    store.save_api_key(ApiKey(id="k2", user_id="u1", secret_hash="h2", created_ts=2))
    assert [k.id for k in store.list_api_keys_for_user("u1")] == ["k1", "k2"]
    assert store.delete_api_key("k1") and not store.delete_api_key("k1")
    assert [k.id for k in store.list_api_keys_for_user("u1")] == ["k2"]
    assert store.record_stripe_event("evt_1", "checkout.session.completed")
    assert not store.record_stripe_event("evt_1", "checkout.session.completed")
    decisions = [store.take_rate_token("login", "1.2.3.4", capacity=2, refill_per_s=1, now=0) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False] and decisions[2].retry_after_ms == 1001
    assert store.take_rate_token("login", "1.2.3.4", capacity=2, refill_per_s=1, now=1000).allowed
    assert store.take_rate_token("login", "ann@example.com", capacity=1, refill_per_s=0).allowed


def test_closed_store_raises_a_clear_error(store: Store) -> None:
    store.close()
    with pytest.raises(StoreClosedError):
        store.load_chat("c1")
    store.close()
