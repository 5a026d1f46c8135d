"""The PostgreSQL engine as replicas use it: several `Store`s (and processes) on one database stay
exact (quotas, message numbering, Stripe events, migrations), plus what is PostgreSQL's own: the
layout table, durable commits, errors that never show the password, recovery after failed writes
and lost connections, and scans that read only a page."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from ktulhu.ports import free_port
from ktulhu.store import Chat, Message, Store, StoreError, User
from ktulhu.store.errors import StoreWriteError
from ktulhu.store.postgres import LAYOUT_VERSION, PostgresKV
from tests.paths import REPO

from .conftest import dump


@pytest.fixture
def engine() -> str:
    return "postgresql"  # these tests are about PostgreSQL itself


@pytest.fixture
def two(location: str) -> tuple[Store, Store]:
    """Two stores on one database, as two replicas have them."""
    a, b = Store.open(location), Store.open(location)
    yield a, b
    a.close()
    b.close()


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """`count` threads calling target(i), released together; re-raises the first failure."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            target(i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --- replicas on one database ---------------------------------------------------------------------

QUOTA_WORKER = textwrap.dedent("""
    import sys, threading
    from ktulhu.store import Store
    store = Store.open(sys.argv[1])
    allowed = []
    print("ready", flush=True)
    sys.stdin.readline()  # "go": both processes start together
    def one():
        for _ in range(5):
            allowed.append(store.increment_generation_count("u1", limit=7).allowed)
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(sum(allowed), flush=True)
    store.close()
""")


def test_quota_from_two_processes_gives_exactly_the_limit(location: str) -> None:
    store = Store.open(location)
    try:
        store.save_user(User(id="u1", created_ts=1))
        procs = [subprocess.Popen([sys.executable, "-c", QUOTA_WORKER, location], cwd=REPO, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        successes = [int(proc.communicate(timeout=120)[0].strip()) for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0]
        assert sum(successes) == 7  # 60 attempts over 2 processes x 6 threads, limit 7
        assert store.load_user("u1").generation_count == 7
    finally:
        store.close()


def test_quota_from_two_stores_in_threads(two: tuple[Store, Store]) -> None:
    a, b = two
    a.save_user(User(id="u1", created_ts=1))
    allowed: list[bool] = []
    run_threads(12, lambda i: allowed.extend(
        (a if i % 2 else b).increment_generation_count("u1", limit=7).allowed for _ in range(4)))
    assert allowed.count(True) == 7 and b.load_user("u1").generation_count == 7


def test_saves_into_one_chat_from_two_stores_get_unique_consecutive_seqs(two: tuple[Store, Store]) -> None:
    a, b = two
    per_thread = 20

    def save(i: int) -> None:
        store = a if i % 2 else b
        for n in range(per_thread):
            store.save_message(Message(id=f"t{i}-{n}", chat_id="c", role="user", ts=1_700_000_000_000 + n))

    run_threads(8, save)
    thread = a.list_messages_for_chat("c")
    assert [m.seq for m in thread] == list(range(1, 8 * per_thread + 1))
    assert len({m.id for m in thread}) == 8 * per_thread
    assert [m.ts for m in thread] == sorted(m.ts for m in thread)  # ts never goes back along seq
    for i in range(8):  # each writer's own messages are in the order it saved them
        assert [m.id for m in thread if m.id.startswith(f"t{i}-")] == [f"t{i}-{n}" for n in range(per_thread)]
    assert len(b.list_recent_messages(1000)) == 8 * per_thread


def test_a_replica_never_numbers_from_a_stale_cache(two: tuple[Store, Store]) -> None:
    a, b = two
    assert a.save_message(Message(id="m1", chat_id="c", role="user", ts=1)).seq == 1
    assert b.save_message(Message(id="m2", chat_id="c", role="user", ts=2)).seq == 2
    assert a.save_message(Message(id="m3", chat_id="c", role="user", ts=3)).seq == 3
    assert [m.id for m in b.list_messages_for_chat("c")] == ["m1", "m2", "m3"]


def test_a_stripe_event_delivered_to_both_replicas_is_applied_once(two: tuple[Store, Store]) -> None:
    a, b = two
    a.save_user(User(id="u1", created_ts=1, meta={"paid": 0}))
    outcomes: list[str] = []
    recorded: list[bool] = []

    def pay(user: User) -> User:
        user.role = "paid"
        user.meta["paid"] += 1
        return user

    def deliver(i: int) -> None:
        store = a if i % 2 else b
        outcomes.append(store.update_user_for_stripe_event("u1", pay, "evt_1", "checkout.session.completed").status)
        recorded.append(store.record_stripe_event("evt_2", "invoice.paid"))

    run_threads(10, deliver)
    assert sorted(outcomes) == ["applied"] + ["duplicate"] * 9
    assert recorded.count(True) == 1
    user = b.load_user("u1")
    assert user.role == "paid" and user.meta == {"paid": 1}


def test_identities_stay_unique_across_replicas(two: tuple[Store, Store]) -> None:
    a, b = two
    from ktulhu.store import IdentityTaken

    won: list[str] = []

    def register(i: int) -> None:
        try:
            (a if i % 2 else b).save_user(User(id=f"u{i}", created_ts=i, email="same@example.com"))
            won.append(f"u{i}")
        except IdentityTaken:
            pass

    run_threads(8, register)
    assert len(won) == 1 and a.find_user_by_email("same@example.com").id == won[0]


def test_replicas_opening_an_original_store_together_migrate_it_once(
        legacy_path: Path, legacy_location: str) -> None:
    reference = Store.open(legacy_path)  # the same data migrated by RocksDB
    expected = dump(reference)
    reference.close()
    opened: list[Store] = []
    run_threads(4, lambda i: opened.append(Store.open(legacy_location)))
    try:
        assert [s.schema_version for s in opened] == [1] * 4
        assert dump(opened[0]) == expected  # indexes built once, byte for byte as RocksDB builds them
        assert [m.id for m in opened[1].list_messages_for_chat("c-legacy-1")] == ["zz-prompt", "aa-reply", "sum-1"]
    finally:
        for store in opened:
            store.close()


def test_replicas_creating_a_new_store_together(location: str) -> None:
    opened: list[Store] = []
    run_threads(4, lambda i: opened.append(Store.open(location)))
    try:
        with psycopg.connect(location) as conn:
            assert conn.execute("SELECT version FROM ktulhu_schema").fetchall() == [(LAYOUT_VERSION,)]
        opened[0].save_chat(Chat(id="c", updated_ts=1))
        assert opened[3].load_chat("c") is not None
    finally:
        for store in opened:
            store.close()


# --- PostgreSQL's own -------------------------------------------------------------------------------


def test_layout_durability_and_statistics(store: Store, location: str) -> None:
    kv = store._kv
    assert isinstance(kv, PostgresKV)
    assert kv._read(lambda c: c.execute("SHOW synchronous_commit").fetchone()) == ("on",)
    stats = store.statistics()
    assert stats.sync is True and stats.path == store.where and stats.schema_version == 1
    assert store.engine == "postgresql" and store.shared_url == location
    assert store.aio.queue_statistics().threads == kv.default_threads > 2


def test_a_newer_layout_is_refused(location: str) -> None:
    Store.open(location).close()
    with psycopg.connect(location, autocommit=True) as conn:
        conn.execute("UPDATE ktulhu_schema SET version = 99")
    with pytest.raises(StoreError, match="table layout 99, newer than this Ktulhu"):
        Store.open(location)


def test_errors_name_the_database_but_never_the_password(postgres_server) -> None:

    url = f"postgresql://ktulhu:pa55-s3cret@127.0.0.1:{free_port()}/chats"
    with pytest.raises(StoreError) as refused:
        Store.open(url)
    text = str(refused.value)
    assert "pa55-s3cret" not in text and "\n" not in text
    assert f"postgresql://ktulhu@127.0.0.1:{url.split(':')[3].split('/')[0]}/chats" in text
    for bad in ("postgresql://ktulhu:pa55-s3cret@[::1/chats", "postgresql://ktulhu:pa55-s3cret@h:port/chats",
                "postgresql://ktulhu:pa55%s3cret@h/chats", "postgresql://ktulhu:pa55-s3cret@h/chats?bogus=1"):
        with pytest.raises(StoreError) as malformed:
            Store.open(bad)
        assert "pa55" not in str(malformed.value) and "invalid PostgreSQL store URL" in str(malformed.value)
    missing = postgres_server.url("no_such_database", password="pa55-s3cret")
    with pytest.raises(StoreError) as absent:
        Store.open(missing)
    assert "pa55-s3cret" not in str(absent.value) and "no_such_database" in str(absent.value)


def test_failed_writes_then_recovery(store: Store, location: str) -> None:
    store.save_message(Message(id="m1", chat_id="c", role="user", ts=1))
    with psycopg.connect(location, autocommit=True) as admin:
        admin.execute("""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$""")
        admin.execute("CREATE TRIGGER refuse BEFORE INSERT OR UPDATE OR DELETE ON kv "
                      "FOR EACH ROW EXECUTE FUNCTION refuse()")
        with pytest.raises(StoreWriteError, match="No space left on device") as failed:
            store.save_message(Message(id="m2", chat_id="c", role="user", ts=2))
        assert store.where in str(failed.value)
        assert store.write_failure is not None and "No space left" in store.write_failure
        assert [m.id for m in store.list_messages_for_chat("c")] == ["m1"]  # nothing half-written
        assert store.find_message("c", "m2") is None and len(store.list_recent_messages(5)) == 1
        assert store.recover() is False  # the probe write is refused too
        admin.execute("DROP TRIGGER refuse ON kv")
    assert store.recover() is True and store.write_failure is None
    assert store.save_message(Message(id="m2", chat_id="c", role="user", ts=2)).seq == 2


def test_connections_dropped_by_the_server_are_replaced(store: Store, location: str) -> None:
    store.save_message(Message(id="m1", chat_id="c", role="user", ts=1))
    with psycopg.connect(location, autocommit=True) as admin:
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE application_name = 'ktulhu' AND pid <> pg_backend_pid()").fetchone()
    assert killed and killed[0] >= 1
    assert store.load_chat("nope") is None  # a read retries on a fresh connection
    assert store.save_message(Message(id="m2", chat_id="c", role="user", ts=2)).seq == 2  # so does a hold
    assert store.recover() is True
    assert [m.id for m in store.list_messages_for_chat("c")] == ["m1", "m2"]


def test_recent_messages_read_one_page_of_the_index(store: Store) -> None:
    kv = store._kv
    assert isinstance(kv, PostgresKV)
    batch = store.batch()
    for i in range(3000):  # messages written straight into the index range (fast)
        message = Message(id=f"m{i:05d}", chat_id=f"c{i % 30}", role="user", ts=1_700_000_000_000 + i, seq=i + 1)
        from ktulhu.store import keys
        from ktulhu.store.codec import encode

        key = keys.msg_key(message.chat_id, i + 1)
        batch.put(key, encode(message))
        batch.put(keys.ix_recent(message.ts_ms, message.chat_id, message.id), key)
    store.write(batch)
    before = kv.rows_scanned
    recent = store.list_recent_messages(25)
    assert [m.id for m in recent] == [f"m{i:05d}" for i in range(2999, 2974, -1)]
    assert kv.rows_scanned - before <= 26  # one page of the reverse scan, not the 3,000 entries
    before = kv.rows_scanned
    assert len(store.list_messages_for_chat("c7", last=24)) == 24
    assert kv.rows_scanned - before <= 48
