"""Cross-replica turn locks and the title relay on a real PostgreSQL (two "replicas" = two
independent lock sets / relays / stores in one test process, each with its own sessions)."""

from __future__ import annotations

import psycopg
import pytest
import trio
import trio.testing

from ktulhu.chat.hub import SummaryEvent, SummaryHub
from ktulhu.chat.turns import TurnQueue
from ktulhu.pg_wire import PgSession, PgWireError
from ktulhu.replicas import TITLES_CHANNEL, TitleRelay, TurnLocks, turn_lock_key
from ktulhu.store import Message, Store, now_ms

WAIT_S = 30.0


def _waiting_locks(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0]


async def _until_waiting(url: str, n: int) -> None:
    """Until the server shows `n` lock requests waiting (bounded)."""
    with trio.fail_after(WAIT_S):
        while await trio.to_thread.run_sync(_waiting_locks, url) != n:
            await trio.sleep(0.01)


async def test_a_chat_turn_waits_for_the_other_replica_and_other_chats_do_not(postgres_url: str) -> None:
    a, b = TurnLocks(postgres_url), TurnLocks(postgres_url)
    held = await a.acquire("chat-1")
    other = await b.acquire("chat-2")  # another chat: no wait
    await b.release(other)
    got = trio.Event()

    async def second() -> None:
        lease = await b.acquire("chat-1")
        got.set()
        await b.release(lease)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await _until_waiting(postgres_url, 1)
        assert not got.is_set()
        await a.release(held)
        with trio.fail_after(WAIT_S):
            await got.wait()
    assert await trio.to_thread.run_sync(_waiting_locks, postgres_url) == 0
    a.close()
    b.close()


async def test_a_cancelled_wait_withdraws_its_request(postgres_url: str) -> None:
    a, b = TurnLocks(postgres_url), TurnLocks(postgres_url)
    held = await a.acquire("chat-1")
    with trio.move_on_after(WAIT_S) as waited:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.acquire, "chat-1")
            await _until_waiting(postgres_url, 1)
            nursery.cancel_scope.cancel()
    assert not waited.cancelled_caught
    await _until_waiting(postgres_url, 0)  # the closed session took its request with it
    await a.release(held)
    again = await b.acquire("chat-1")
    await b.release(again)
    a.close()
    b.close()


async def test_a_dead_holder_releases_the_chat(postgres_url: str) -> None:
    a, b = TurnLocks(postgres_url), TurnLocks(postgres_url)
    held = await a.acquire("chat-1")
    held.abandon()  # what a killed front-end's sessions do: the socket closes
    with trio.fail_after(WAIT_S):
        lease = await b.acquire("chat-1")
    await b.release(lease)
    a.close()
    b.close()


async def test_the_turn_queue_holds_the_shared_lock_from_wait_to_finish(postgres_url: str) -> None:
    turns = TurnQueue()
    turns.shared = TurnLocks(postgres_url)
    ticket = turns.ticket("chat-9")
    await turns.wait(ticket)
    assert ticket.lease is not None and ticket.lease.key == turn_lock_key("chat-9")
    other = TurnLocks(postgres_url)
    with trio.move_on_after(0.2) as blocked:  # bounded probe: it must still be waiting
        await other.acquire("chat-9")
    assert blocked.cancelled_caught
    await turns.finish(ticket)
    assert ticket.lease is None and turns.waiting("chat-9") == 0
    lease = await other.acquire("chat-9")
    await other.release(lease)
    turns.shared.close()
    other.close()


async def test_an_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(PgWireError):
        await PgSession.connect("postgresql://nobody@127.0.0.1:1/none", timeout=WAIT_S)


def _open(url: str) -> Store:
    return Store.open(url)


async def test_a_title_published_on_one_replica_reaches_the_other_once(postgres_url: str) -> None:
    store_a = await trio.to_thread.run_sync(_open, postgres_url)
    store_b = await trio.to_thread.run_sync(_open, postgres_url)
    chat, _ = store_a.ensure_chat_for_device("chat-t", "dev")
    title = store_a.replace_summary("chat-t", "Tides explained")
    hub_a, hub_b = SummaryHub(), SummaryHub()
    relay_a = TitleRelay(postgres_url, hub_a, store_a.aio)
    relay_b = TitleRelay(postgres_url, hub_b, store_b.aio)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay_a.run)
            await nursery.start(relay_b.run)
            with hub_a.subscribe(lambda c: True) as mine, hub_b.subscribe(lambda c: True) as theirs:
                hub_a.publish(SummaryEvent(chat, title, "req-1"))
                with trio.fail_after(WAIT_S):
                    event = await theirs.receive()
                assert (event.chat.id, event.message.text, event.request_id) == ("chat-t", "Tides explained", "req-1")
                assert (await mine.receive()).message.id == title.id  # delivered locally at once
                # Garbage on the channel (anyone with database access can NOTIFY) is ignored.
                with psycopg.connect(postgres_url, autocommit=True) as conn:
                    for payload in ("not json", '{"chat_id": "../x", "message_id": "m"}', "[1,2]",
                                    '{"chat_id": "gone", "message_id": "nope"}'):
                        conn.execute("SELECT pg_notify(%s, %s)", (TITLES_CHANNEL, payload))
                hub_a.publish(SummaryEvent(chat, title, "req-2"))
                with trio.fail_after(WAIT_S):
                    event = await theirs.receive()
                assert event.request_id == "req-2"  # the garbage delivered nothing in between
                assert (await mine.receive()).request_id == "req-2"
                # A marker from "another replica", sent after A's own two notifications: once A has
                # it, A has also read its own ones, and must not have delivered them again.
                with psycopg.connect(postgres_url, autocommit=True) as conn:
                    conn.execute("SELECT pg_notify(%s, %s)", (TITLES_CHANNEL, '{"replica": "other", '
                                 f'"chat_id": "chat-t", "message_id": "{title.id}", "request_id": "marker"}}'))
                with trio.fail_after(WAIT_S):
                    assert (await mine.receive()).request_id == "marker"
                    assert (await theirs.receive()).request_id == "marker"
            assert relay_a.announced == 2 and relay_b.received == 3 and relay_a.received == 1
            nursery.cancel_scope.cancel()
    finally:
        store_a.close()
        store_b.close()


async def test_a_title_message_id_is_read_from_the_store_not_the_notification(postgres_url: str) -> None:
    store = await trio.to_thread.run_sync(_open, postgres_url)
    hub = SummaryHub()
    relay = TitleRelay(postgres_url, hub, store.aio)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            with hub.subscribe(lambda c: True) as theirs:
                store.ensure_chat_for_device("chat-x", "dev")
                saved = store.save_message(Message(id="m1", chat_id="chat-x", role="summary", text="Stored title", ts=now_ms()))
                assert saved is not None
                with psycopg.connect(postgres_url, autocommit=True) as conn:
                    conn.execute("SELECT pg_notify(%s, %s)", (TITLES_CHANNEL,
                                 '{"replica": "other", "chat_id": "chat-x", "message_id": "m1", "text": "forged"}'))
                with trio.fail_after(WAIT_S):
                    event = await theirs.receive()
                assert event.message.text == "Stored title"
            nursery.cancel_scope.cancel()
    finally:
        store.close()
