"""Random operation sequences against a dict model: records match, and every index equals the one a
full rebuild produces from the records (so no operation ever leaves an index behind or stale)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import example, HealthCheck, given, settings
from hypothesis import strategies as st

from ktulhu.store import Chat, IdentityTaken, Message, Store, User
from ktulhu.store import keys
from ktulhu.store.migrate import rebuild_indexes

from .conftest import Location

CHATS = st.sampled_from(["c1", "c2", "c3"])
MIDS = st.sampled_from(["m1", "m2", "m3", "m4"])
DEVICES = st.sampled_from([None, "", "d1", "d2"])
USERS = st.sampled_from(["u1", "u2", "u3"])
EMAILS = st.sampled_from([None, "a@x.io", "B@x.io", "b@x.io "])
TS = st.integers(1_700_000_000_000, 1_700_000_000_020)

ops = st.one_of(
    st.tuples(st.just("save"), CHATS, MIDS, st.sampled_from(["user", "assistant", "summary"]), TS),
    st.tuples(st.just("delete"), CHATS, MIDS),
    st.tuples(st.just("like"), CHATS, MIDS, st.booleans()),
    st.tuples(st.just("drop_role"), CHATS, st.sampled_from(["user", "summary"])),
    st.tuples(st.just("summary"), CHATS, MIDS),
    st.tuples(st.just("chat"), CHATS, DEVICES, st.sampled_from([None, "u1", "u2"]), TS),
    st.tuples(st.just("touch"), CHATS, DEVICES),
    st.tuples(st.just("delete_thread"), CHATS),
    st.tuples(st.just("user"), USERS, EMAILS, st.sampled_from([[], ["google:1"], ["apple:2"]])),
    st.tuples(st.just("delete_user"), USERS),
    st.tuples(st.just("device"), USERS, st.sampled_from(["d1", "d2"])),
)

INDEX_PREFIXES = (keys.IX, keys.DEVICE_CHAT)


def index_dump(store: Store) -> dict[bytes, bytes]:
    return {k: v for k, v in store.scan(b"") if k.startswith(INDEX_PREFIXES)}


# `new_location` makes a fresh store per example (a new directory, or a new database)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(ops, max_size=40))
@example([("summary", "c1", "m2"), ("save", "c1", "m1", "user", 1_700_000_000_000), ("summary", "c1", "m2")])
def test_random_operations_keep_indexes_consistent(new_location: Callable[[], Location],
                                                   sequence: list[tuple]) -> None:
    store = Store.open(new_location())
    model: dict[str, list[tuple[str, str, bool]]] = {}  # chat -> [(id, role, liked)] in order
    try:
        for op in sequence:
            kind = op[0]
            if kind == "save":
                _, chat, mid, role, ts = op
                store.save_message(Message(id=mid, chat_id=chat, role=role, ts=ts))
                thread = model.setdefault(chat, [])
                for i, (old, _, _) in enumerate(thread):
                    if old == mid:
                        thread[i] = (mid, role, False)
                        break
                else:
                    thread.append((mid, role, False))
            elif kind == "delete":
                _, chat, mid = op
                present = any(m == mid for m, _, _ in model.get(chat, []))
                assert store.delete_message(chat, mid) == present
                model[chat] = [e for e in model.get(chat, []) if e[0] != mid]
            elif kind == "like":
                _, chat, mid, liked = op
                present = any(m == mid for m, _, _ in model.get(chat, []))
                assert store.set_message_liked(chat, mid, liked) == present
                model[chat] = [(m, r, liked if m == mid else lk) for m, r, lk in model.get(chat, [])]
            elif kind == "drop_role":
                _, chat, role = op
                expected = sum(1 for _, r, _ in model.get(chat, []) if r == role)
                assert store.remove_messages_by_role(chat, role) == expected
                model[chat] = [e for e in model.get(chat, []) if e[1] != role]
            elif kind == "summary":
                _, chat, mid = op
                store.replace_summary(chat, "s", message_id=mid)
                thread = [e for e in model.get(chat, []) if e[1] != "summary" and e[0] != mid]
                model[chat] = thread + [(mid, "summary", False)]
            elif kind == "chat":
                _, chat, device, owner, ts = op
                store.save_chat(Chat(id=chat, device_hash=device, user_id=owner, updated_ts=ts))
            elif kind == "touch":
                store.touch_chat(op[1], op[2])
            elif kind == "delete_thread":
                store.delete_thread(op[1])
                model.pop(op[1], None)
            elif kind == "user":
                _, uid, email, methods = op
                try:
                    store.save_user(User(id=uid, created_ts=1, email=email, meta={"auth_methods": list(methods)}))
                except IdentityTaken:
                    pass
            elif kind == "delete_user":
                store.delete_user(op[1])
            elif kind == "device":
                store.add_device_for_user(op[1], op[2])

        for chat, thread in model.items():
            stored = store.list_messages_for_chat(chat)
            assert [(m.id, m.role, m.liked) for m in stored] == thread
            assert [m.seq for m in stored] == sorted(m.seq for m in stored)
            summary = store.chat_summary(chat)
            expected_summary = [m for m, r, _ in thread if r == "summary"]
            assert (summary.id if summary else None) == (expected_summary[-1] if expected_summary else None)
        everything = sorted((m for c in model for m in store.list_messages_for_chat(c)), key=lambda m: (-m.ts_ms, m.id))
        assert [m.id for m in store.list_recent_messages(5)] == [m.id for m in everything[:5]]
        # identities stay unique: every indexed email/provider points at a user that has it
        for user in store.list_users():
            if user.email and user.email.strip():
                assert store.find_user_by_email(user.email).id == user.id

        live = index_dump(store)
        rebuild_indexes(store)
        assert index_dump(store) == live
    finally:
        store.close()
