"""Concurrent trio tasks through `AsyncStore`: no lost update, unique order, the loop keeps running."""

from __future__ import annotations

import threading

import trio

from ktulhu.store import AsyncStore, Chat, Message, Store, User


async def test_100_concurrent_quota_increments_count_exactly_100(store: Store) -> None:
    await store.aio.save_user(User(id="u1", created_ts=1))
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(store.aio.increment_generation_count, "u1")
    assert (await store.aio.load_user("u1")).generation_count == 100


async def test_concurrent_increments_never_pass_the_limit(store: Store) -> None:
    await store.aio.save_user(User(id="u1", created_ts=1))
    allowed = []

    async def one() -> None:
        allowed.append((await store.aio.increment_generation_count("u1", limit=10)).allowed)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert allowed.count(True) == 10 and (await store.aio.load_user("u1")).generation_count == 10


async def test_concurrent_saves_in_one_chat_get_unique_increasing_seqs(store: Store) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(store.aio.save_message, Message(id=f"m{i}", chat_id="c", role="user", ts=1_700_000_000_000))
    seqs = [m.seq for m in await store.aio.list_messages_for_chat("c")]
    assert seqs == list(range(1, 201))


async def test_concurrent_read_modify_writes_of_chat_meta_lose_nothing(store: Store) -> None:
    await store.aio.save_chat(Chat(id="c", updated_ts=1, meta={"n": 0}))

    def bump(chat: Chat) -> Chat:
        chat.meta["n"] += 1
        return chat

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(store.aio.update_chat, "c", bump)
    assert (await store.aio.load_chat("c")).meta == {"n": 100}


async def test_threads_without_trio_are_serialised_too(store: Store) -> None:
    store.save_user(User(id="u1", created_ts=1))
    threads = [threading.Thread(target=lambda: [store.increment_generation_count("u1") for _ in range(50)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load_user("u1").generation_count == 200


async def test_store_calls_run_off_the_trio_thread(store: Store) -> None:
    """Every blocking store call runs on a worker thread, never on the trio thread (asserted by where
    the calls ran, not by timing the loop: a busy machine makes loop gaps meaningless)."""
    aio = AsyncStore(store, threads=2)
    trio_thread = threading.get_ident()
    threads: set[int] = set()
    original = store.save_message

    def recording_save(message: Message, **kwargs: object) -> object:
        threads.add(threading.get_ident())
        return original(message, **kwargs)

    store.save_message = recording_save  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as savers:
            for i in range(200):
                savers.start_soon(aio.save_message, Message(id=f"m{i}", chat_id=f"c{i % 10}", role="user", ts=1))
    finally:
        del store.save_message
    assert len(await aio.list_recent_messages(5000)) == 200
    assert threads and trio_thread not in threads


async def test_a_cancelled_caller_does_not_half_write(store: Store) -> None:
    with trio.move_on_after(0):
        await store.aio.save_message(Message(id="m", chat_id="c", role="user", ts=1))
    # either written with all its index entries, or not at all
    found = await store.aio.find_message("c", "m")
    assert (found is None) == (await store.aio.list_recent_messages(5) == [])


async def test_cancelled_queued_callers_never_strand_the_others(store: Store) -> None:
    aio = AsyncStore(store, threads=1)
    finished: list[int] = []

    async def save(i: int) -> None:
        await aio.save_message(Message(id=f"m{i}", chat_id="c", role="user", ts=1_700_000_000_000))
        finished.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(300):
            nursery.start_soon(save, i)
        await trio.sleep(0)
        async with trio.open_nursery() as victims:  # queued behind the 300, then cancelled
            for i in range(1000, 1100):
                victims.start_soon(save, i)
            await trio.sleep(0)
            victims.cancel_scope.cancel()
    assert sorted(i for i in finished if i < 1000) == list(range(300))  # nobody stranded
    assert aio.queue_statistics().queued == 0
    stored = {m.id for m in await aio.list_messages_for_chat("c")}
    recent = {m.id for m in await aio.list_recent_messages(1000)}
    assert stored == recent  # whatever ran, ran completely (record and index entries)
    assert {f"m{i}" for i in range(300)} <= stored


async def test_store_aio_is_shared_and_reports_its_queue(store: Store) -> None:
    assert store.aio is store.aio
    await store.aio.save_message(Message(id="m", chat_id="c", role="user", ts=1))
    stats = store.aio.queue_statistics()
    assert stats.queued == 0 and stats.calls == 1 and stats.workers_busy == 0
    assert store.aio.statistics().writes == 1
