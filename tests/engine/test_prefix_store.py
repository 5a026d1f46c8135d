"""What a slot gives up to another conversation outlives it: saved to host memory, restored into a
later request's slot (the chat's next turn, or another chat with the same system prompt), with the
same greedy reply as a prefill; a chat's own regenerated reply is not saved; never restored into a
slot whose cache a copy queued in the same step still reads. The store's own bookkeeping: longest
match (the cheapest on a tie), entries a newer one extends dropped, budget, least recently used
dropped first."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ktulhu.engine.model import Model
from ktulhu.engine.prefix_store import MAX_ENTRIES, PrefixStore
from ktulhu.engine.request import Generation
from ktulhu.engine.sampling import SamplingParams
from ktulhu.engine.slot_choice import MIN_COPIED_TOKENS, common_prefix
from ktulhu.engine.worker import DecodeWorker

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
SYSTEM = ("<|im_start|>system\nYou are Ktulhu, a friendly and helpful assistant. Answer clearly and concisely, "
          "in the language the user writes in. Prefer short paragraphs and plain words.<|im_end|>\n")
OTHER = "<|im_start|>system\nYou are a terse pirate who answers every question in one line.<|im_end|>\n"


def chat(model: Model, system: str, question: str) -> list[int]:
    return model.tokenize(f"{system}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", special=True)


def shared_length(*prompts: list[int]) -> int:
    return min(common_prefix(prompts[0], other) for other in prompts[1:])


# --- the store's bookkeeping -------------------------------------------------------------------------


def test_the_longest_match_wins_then_the_smallest_then_the_most_recently_used() -> None:
    store = PrefixStore(1000)
    store.put([1, 2, 3], b"a", 10, last_used=1.0)
    store.put([1, 2, 3, 4, 5], b"b", 10, last_used=2.0)
    store.put([1, 2, 9], b"c", 10, last_used=3.0)
    entry, common = store.longest([1, 2, 3, 4, 7])
    assert (entry.data, common) == (b"b", 4)
    entry, common = store.longest([1, 2, 8])
    assert (entry.data, common) == (b"c", 2)  # three entries of one size share [1, 2]: the newest
    store.put([1, 2, 7, 7, 7], b"d", 30, last_used=4.0)
    entry, common = store.longest([1, 2, 8])
    assert (entry.data, common) == (b"c", 2)  # the larger newest costs more to restore
    assert store.longest([7, 1, 2]) is None
    assert store.covers([1, 2, 3, 4]) and store.covers([1, 2, 9]) and not store.covers([1, 2, 3, 4, 5, 6])


def test_an_entry_that_a_newer_one_extends_is_dropped() -> None:
    store = PrefixStore(1000)
    store.put([1, 2, 3], b"turn 1", 10, last_used=1.0)
    store.put([1, 2, 4], b"other", 10, last_used=2.0)
    store.put([1, 2, 3, 5, 6], b"turn 2", 20, last_used=3.0)
    assert [e.data for e in store.entries] == [b"other", b"turn 2"] and store.bytes == 30


def test_the_least_recently_used_entries_make_room_and_an_oversized_one_is_refused() -> None:
    store = PrefixStore(100)
    store.put([1], b"a", 40, last_used=1.0)
    store.put([2], b"b", 40, last_used=2.0)
    store.entries[0].last_used = 3.0  # [1] was restored since
    store.put([3], b"c", 40, last_used=4.0)
    assert [e.tokens for e in store.entries] == [(1,), (3,)] and store.bytes == 80
    assert not store.fits(101) and not store.fits(0)
    with pytest.raises(ValueError):
        store.put([4], b"d", 101, last_used=5.0)
    assert store.bytes == 80 and len(store.entries) == 2  # a refused entry changes nothing
    store.clear()
    assert store.entries == [] and store.bytes == 0


@given(st.integers(1, 500), st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=6),
                                               st.integers(1, 600)), max_size=120))
def test_the_budget_the_entry_count_and_the_coverage_always_hold(budget: int,
                                                                 puts: list[tuple[list[int], int]]) -> None:
    store = PrefixStore(budget)
    for now, (tokens, size) in enumerate(puts):
        if store.fits(size):
            store.put(tokens, b"", size, last_used=float(now))
            assert store.entries[-1].tokens == tuple(tokens)  # the newest is always kept
        assert store.bytes == sum(e.size for e in store.entries) <= budget
        assert len(store.entries) <= MAX_ENTRIES
        for i, entry in enumerate(store.entries):  # none extends another
            assert not any(other.tokens[:len(entry.tokens)] == entry.tokens for other in store.entries[i + 1:])
        for probe in (tokens, tokens[:-1], [*tokens, 0]):  # covered exactly when an entry starts with it
            assert store.covers(probe) == any(e.tokens[:len(probe)] == tuple(probe) for e in store.entries)


# --- the decode worker, on the real model -----------------------------------------------------------


async def _reply(engine, tokens: list[int], chat_id: str):
    with engine.generate(tokens, GREEDY, chat_id=chat_id) as gen:
        text = await gen.text()
    return text, gen.metrics


async def _replies(engine, requests: list[tuple[list[int], str]]) -> None:
    async with trio.open_nursery() as nursery:
        for tokens, chat_id in requests:
            nursery.start_soon(_reply, engine, tokens, chat_id)


@pytest.mark.parametrize(("store_mb", "together"), [("64", False), ("64", True), ("0", False)])
async def test_a_shared_system_prompt_outlives_a_burst_that_takes_every_slot(
        smol_model: Model, running_engine, store_mb: str, together: bool) -> None:
    """`together`: alice and bob arrive at once, and each prefills the system prompt (nothing to copy
    yet); else bob starts from a copy of alice's."""
    alice, bob, carol = (chat(smol_model, SYSTEM, q) for q in (
        "What is the capital of France?", "Name a large ocean.", "How many legs has a spider?"))
    shared = shared_length(alice, bob, carol)
    async with running_engine(smol_model, KTULHU_SLOTS="2") as fresh:  # the reference: prefilled whole
        expected, _ = await _reply(fresh, carol, "carol")
    async with running_engine(smol_model, KTULHU_SLOTS="2", KTULHU_PREFIX_STORE_MB=store_mb) as engine:
        if together:
            await _replies(engine, [(alice, "alice"), (bob, "bob")])
        else:
            await _reply(engine, alice, "alice")
            await _reply(engine, bob, "bob")
        [worker] = engine._workers
        assert worker.prefix_copies == (0 if together else 1)
        # two chats with another system prompt take both slots
        await _replies(engine, [(chat(smol_model, OTHER, q), f"pirate-{i}")
                                for i, q in enumerate(("Where is the treasure?", "What ship is that?"))])
        text, metrics = await _reply(engine, carol, "carol")
        [stats] = engine.stats().workers
    assert text == expected  # restored or prefilled, the same greedy reply
    assert metrics.own_cached_tokens == 0
    if store_mb == "0":  # nothing kept: carol prefilled the system prompt again
        assert metrics.cached_tokens < shared - MIN_COPIED_TOKENS
        assert (stats.prefix_restores, stats.stored_prefixes, stats.stored_bytes) == (0, 0, 0)
    else:
        assert metrics.cached_tokens == shared
        assert stats.prefix_restores == 1 and stats.stored_prefixes >= 1 and stats.stored_bytes > 0


async def test_a_chat_whose_slot_others_took_continues_from_its_saved_cache(
        smol_model: Model, running_engine) -> None:
    """Its next turn restores the history its slot held (its own cache, shown as such) and prefills
    only the new turn, with the reply a prefill of the whole history gives; regenerating a reply in
    its own slot saves nothing."""
    first = chat(smol_model, SYSTEM, "What is the capital of France?")
    pirates = [(chat(smol_model, OTHER, q), f"pirate-{i}") for i, q in enumerate(("Where is the treasure?",
                                                                                 "What ship is that?"))]
    async with running_engine(smol_model, KTULHU_SLOTS="2", KTULHU_PREFIX_STORE_MB="64") as engine:
        answer, _ = await _reply(engine, first, "alice")
        [worker] = engine._workers
        await _reply(engine, first, "alice")  # regenerated in its own slot: the old reply is not kept
        assert worker.store is not None and worker.store.entries == []
        await _replies(engine, pirates)
        # the idle worker may also save the pirates' slots ahead (when their copy fits a decode step)
        [saved] = [entry for entry in worker.store.entries if entry.chat_id == "alice"]
        assert saved.tokens[:len(first)] == tuple(first)
        second = smol_model.tokenize(smol_model.detokenize(first) + answer
                                     + "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
                                     special=True)
        text, metrics = await _reply(engine, second, "alice")
        [stats] = engine.stats().workers
    async with running_engine(smol_model, KTULHU_SLOTS="2") as fresh:
        expected, _ = await _reply(fresh, second, "alice")
    assert text == expected
    assert stats.prefix_restores == 1
    assert metrics.cached_tokens == metrics.own_cached_tokens == common_prefix(saved.tokens, second) > len(first)


def _worker(model: Model, n_slots: int) -> DecodeWorker:
    """A decode worker driven on the test's own thread (`_drive`), with a store."""
    return DecodeWorker(model, n_slots=n_slots, n_ctx_seq=512, n_threads=1,
                        trio_token=trio.lowlevel.current_trio_token(), on_slot_free=lambda: None,
                        prefix_store_bytes=64 << 20)


async def _drive(worker: DecodeWorker, *requests: tuple[list[int], str]) -> list[str]:
    """Admitted together, in order, then stepped to the end on this thread."""
    gens = [Generation.create(tokens, GREEDY, chat_id) for tokens, chat_id in requests]
    for gen in gens:
        worker.submit(gen)
    while worker._step():
        pass
    worker._post_calls()
    with trio.fail_after(60):
        return [await gen.text() for gen in gens]


async def _prefilled(model: Model, tokens: list[int]) -> str:
    """The reply of a worker with nothing cached."""
    worker = _worker(model, n_slots=1)
    try:
        [text] = await _drive(worker, (tokens, "reference"))
        return text
    finally:
        worker.stop()
        worker.run()


async def test_an_idle_worker_saves_its_caches_ahead_of_the_requests_that_take_their_slots(
        smol_model: Model) -> None:
    """With every slot idle and holding a cache, each is saved in turn, the least recently used
    first, while the store has room without dropping an entry; a request of another chat that then
    takes a slot copies nothing more, and the chat that comes back restores its cache."""
    worker = _worker(smol_model, n_slots=2)
    alice = chat(smol_model, SYSTEM, "What is the capital of France?")
    pirates = [chat(smol_model, OTHER, q) for q in ("Where is the treasure?", "What ship is that?")]
    try:
        await _drive(worker, (alice, "alice"))
        assert not worker._save_ahead()  # a slot is still empty: the next request takes it
        await _drive(worker, (pirates[0], "p0"))
        assert worker.store is not None
        budget = worker.store.budget_bytes
        assert worker._save_ahead()
        assert [(e.chat_id, e.tokens[:len(alice)]) for e in worker.store.entries] == [("alice", tuple(alice))]
        worker.store.budget_bytes = worker.store.bytes + 1  # p0's cache fits, but only in alice's place
        assert not worker._save_ahead()
        worker.store.budget_bytes = budget
        cell_copy_s, worker.cell_copy_s = worker.cell_copy_s, worker.costs.decode_step_s
        assert not worker._save_ahead()  # a copy longer than a decode step would hold up a request
        worker.cell_copy_s = cell_copy_s
        assert worker._save_ahead() and not worker._save_ahead()  # p0's, then nothing left
        saved = list(worker.store.entries)
        assert [e.chat_id for e in saved] == ["alice", "p0"]
        await _drive(worker, (pirates[1], "p1"))  # takes alice's slot, the least recently used
        await _drive(worker, (alice, "alice"))  # takes p0's: restored, nothing copied out
        assert worker.store.entries == saved and worker.prefix_restores == 1
    finally:
        worker.stop()
        worker.run()  # frees the context


async def test_no_restore_goes_into_a_slot_that_a_queued_copy_reads(smol_model: Model) -> None:
    """llama.cpp copies a sequence's whole stream at the next decode, while a restore writes at
    once: a restore into the copy's source before that decode would hand the copy the restored
    cells."""
    worker = _worker(smol_model, n_slots=3)
    run = partial(_drive, worker)
    try:
        system = [chat(smol_model, SYSTEM, q) for q in ("What is the capital of France?", "Name a large ocean.")]
        pirate = [chat(smol_model, OTHER, q) for q in ("Where is the treasure?", "What ship is that?", "Who?")]
        replies = [(await run((tokens, name)))[0]
                   for tokens, name in zip(system + pirate, ("a", "b", "p0", "p1", "p2"))]
        # the pirates took the slots of the two chats that shared the system prompt: both were saved
        assert worker.store is not None and [e.chat_id for e in worker.store.entries] == ["a", "b"]
        [source] = [s for s in worker.slots if s.cached[:len(pirate[2])] == pirate[2]]
        target, other = (s for s in worker.slots if s is not source)
        target.last_used, source.last_used = 0.0, 1.0  # the copy lands in `target`; then `source` is LRU
        worker.stream_copy_s = 0.0  # copies go stream by stream, queued for the next decode
        restores = worker.prefix_restores
        copied, _ = await run((pirate[2], "r1"), (chat(smol_model, SYSTEM, "How many legs has a spider?"), "r2"))
        assert target.chat_id == "r1" and source.chat_id == "r2"
        assert worker.prefix_restores == restores  # not into the copy's source: r2 prefilled
        assert copied == replies[4]  # r1's copy holds p2's cells, not the system prompt's
    finally:
        worker.stop()
        worker.run()  # frees the context


async def test_a_slot_whose_queued_copy_has_not_run_is_not_saved(smol_model: Model) -> None:
    """A request that starts from a stream copy and is cancelled before any decode leaves its slot
    idle with the copy still queued: its cells are not there yet, so they are not saved, even once
    no other slot holds them (the source taken by another chat before that decode); the next request
    in that slot gets the copied cells (the copy runs at its decode)."""
    worker = _worker(smol_model, n_slots=2)
    alice, bob = (chat(smol_model, SYSTEM, q) for q in ("What is the capital of France?", "Name a large ocean."))
    try:
        expected = await _prefilled(smol_model, bob)
        await _drive(worker, (alice, "alice"))
        worker.stream_copy_s = 0.0  # the copy goes stream by stream, queued for the next decode
        cancelled = Generation.create(bob, GREEDY, "bob")
        worker._admit(cancelled)  # copies alice's system prompt into the empty slot
        [target] = [s for s in worker.slots if s.gen is cancelled]
        [source] = [s for s in worker.slots if s is not target]
        assert target.cached and {target.sid, source.sid} <= worker._queued
        cancelled.cancel()
        assert not worker._step()  # dropped before any decode: nothing ran
        assert target.gen is None and target.cached and target.sid in worker._queued
        pirate = Generation.create(chat(smol_model, OTHER, "Where is the treasure?"), GREEDY, "pirate")
        worker._admit(pirate)  # takes alice's slot, the least recently used, before any decode
        assert source.gen is pirate and len(source.cached) < len(target.cached)
        assert worker.store is not None and not worker.store.covers(target.cached)  # alice's was not saved either
        assert not worker._save_evicted(target, 0)
        while worker._step():
            pass
        worker._post_calls()
        assert await _drive(worker, (bob, "bob")) == [expected]
    finally:
        worker.stop()
        worker.run()  # frees the context
