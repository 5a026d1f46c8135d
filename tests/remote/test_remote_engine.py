"""`RemoteEngine` on two real llama-server workers (and a hostile one): routing, slots, queue,
cancellation, cached prompts, ejection. Mechanisms are asserted, never durations: every wait is
bounded only so that a broken mechanism fails instead of hanging."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ktulhu.agent.backends import local_backend
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.remote import RemoteEngine, WorkerContextTooLong, WorkerFailed
from ktulhu.engine.request import Busy, EngineClosed
from ktulhu.engine.routing import rank
from ktulhu.engine.sampling import SamplingParams
from ktulhu.settings import load_settings

from tests.paths import REPO
from .conftest import hostile_worker, slots_of, wait_until_idle, worker_list, worker_metric

pytestmark = pytest.mark.model

SYSTEM = ChatMessage("system", "You are a helpful assistant.")
QUESTION = [SYSTEM, ChatMessage("user", "Name three colours.")]
SHORT = SamplingParams(temperature=0.0, max_tokens=16)
#: Runs far longer than any test waits for it: it is always cancelled.
ENDLESS = SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)
WAIT_S = 60


def chat_for(engine: RemoteEngine, url: str, prefix: str = "chat") -> str:
    """A chat id whose first rendezvous choice is the worker at `url`."""
    return next(f"{prefix}-{i}" for i in range(10_000) if rank(f"{prefix}-{i}", engine.workers)[0].url == url)


def worker_stats(engine: RemoteEngine, url: str):
    return next(w for w in engine.stats().workers if w.url == url)


async def test_a_reply_streams_and_names_its_worker(fleet, remote_engine) -> None:
    async with remote_engine(worker_list(fleet)) as engine:
        with trio.fail_after(WAIT_S):
            with await engine.chat(QUESTION, SHORT, chat_id="c-stream") as gen:
                pieces = [piece async for piece in gen]
        assert "".join(pieces).strip() and len(pieces) > 1  # streamed, not one blob
        assert gen.finished is not None and gen.finished.reason in ("eos", "length")
        metrics = gen.metrics
        assert metrics.worker == rank("c-stream", engine.workers)[0].url
        assert metrics.prompt_tokens > 0 and 0 < metrics.generated_tokens <= SHORT.max_tokens
        assert metrics.first_token is not None and metrics.admitted is not None
        stats = worker_stats(engine, metrics.worker)
        assert stats.requests == 1 and stats.busy_slots == 0 and stats.generated_tokens == metrics.generated_tokens


async def test_a_chat_stays_on_its_worker_and_its_prompt_is_cached(fleet, remote_engine) -> None:
    async with remote_engine(worker_list(fleet)) as engine:
        turns = list(QUESTION)
        served = []
        with trio.fail_after(WAIT_S):
            for question in ("And three fruits?", "And three animals?"):
                with await engine.chat(turns, SHORT, chat_id="c-cache") as gen:
                    reply = await gen.text()
                served.append(gen.metrics)
                turns += [ChatMessage("assistant", reply), ChatMessage("user", question)]
        assert served[0].worker == served[1].worker
        # the follow-up's prompt starts with the first turn's, which the worker kept (llama-server's cache_n)
        assert served[1].cached_tokens > 0
        assert 0 < served[1].own_cached_tokens <= served[0].prompt_tokens + served[0].generated_tokens


async def test_chats_spread_over_both_workers(fleet, remote_engine) -> None:
    async with remote_engine(worker_list(fleet)) as engine:
        chats = [chat_for(engine, fleet[0].url, "a"), chat_for(engine, fleet[1].url, "b")]
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                gens = {}

                async def ask(chat_id: str) -> None:
                    with await engine.chat(QUESTION, SHORT, chat_id=chat_id) as gen:
                        await gen.text()
                    gens[chat_id] = gen

                for chat_id in chats:
                    nursery.start_soon(ask, chat_id)
        assert [gens[c].metrics.worker for c in chats] == [fleet[0].url, fleet[1].url]
        # many chats: every worker is somebody's first choice
        keys = [f"spread-{i}" for i in range(64)]
        assert {rank(k, engine.workers)[0].url for k in keys} == {w.url for w in fleet}


async def test_slots_bound_each_worker_and_a_full_queue_answers_busy(fleet, remote_engine) -> None:
    async with remote_engine(worker_list(fleet, slots=1), KTULHU_QUEUE="1") as engine:
        with trio.fail_after(WAIT_S):
            first = await engine.chat(QUESTION, ENDLESS, chat_id=chat_for(engine, fleet[0].url))
            second = await engine.chat(QUESTION, ENDLESS, chat_id=chat_for(engine, fleet[1].url))
            assert [w.busy_slots for w in engine.stats().workers] == [1, 1]
            for worker in fleet:  # llama-server has 2 slots, but is sent no more than the 1 configured
                assert sum(slot["is_processing"] for slot in await slots_of(worker)) == 1
            served: list[str | None] = []

            async def queued() -> None:
                with await engine.chat(QUESTION, SHORT, chat_id="c-queued") as gen:
                    served.append(gen.metrics.worker)
                    await gen.text()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(queued)
                await trio.testing.wait_all_tasks_blocked()
                assert engine.stats().queue_depth == 1 and served == []
                with pytest.raises(Busy, match="busy"):  # the queue is full: refused at once
                    await engine.chat(QUESTION, SHORT, chat_id="c-refused")
                first.cancel()  # its slot goes to the request that waited
            assert served == [fleet[0].url]
            assert all(w.busy_slots <= w.slots for w in engine.stats().workers)
            second.cancel()
            async for _ in second:
                pass
        assert second.finished.reason == "cancelled"


async def test_cancel_closes_the_stream_and_the_worker_stops_generating(fleet, remote_engine) -> None:
    worker = fleet[0]
    async with remote_engine(worker_list(fleet)) as engine:
        with trio.fail_after(WAIT_S):
            await wait_until_idle(worker)
            decodes_before = await worker_metric(worker, "llamacpp:n_decode_total")
            with await engine.chat(QUESTION, ENDLESS, chat_id=chat_for(engine, worker.url)) as gen:
                await gen.__anext__()
                assert any(slot["is_processing"] for slot in await slots_of(worker))
            # leaving `with` cancelled it: the handle ends as cancelled and the slot is given back
            async for _ in gen:
                pass
            assert gen.finished.reason == "cancelled" and gen.metrics.cancel_latency is not None
            assert worker_stats(engine, worker.url).busy_slots == 0
            # llama-server saw the connection close and freed its slot long before 600 tokens
            await wait_until_idle(worker)
            decodes = await worker_metric(worker, "llamacpp:n_decode_total") - decodes_before
        assert decodes < ENDLESS.max_tokens


async def test_stopping_the_engine_ends_replies_and_waiting_requests(fleet) -> None:
    settings = load_settings(environ={"KTULHU_WORKERS": worker_list(fleet[:1], slots=1)}, root=REPO)
    engine = RemoteEngine(settings)
    refused: list[EngineClosed] = []

    async def waiting() -> None:
        with pytest.raises(EngineClosed) as raised:
            await engine.chat(QUESTION, SHORT, chat_id="c-waits")
        refused.append(raised.value)

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as callers:
            async with trio.open_nursery() as service:
                await service.start(engine.run)
                running = await engine.chat(QUESTION, ENDLESS, chat_id="c-runs")
                callers.start_soon(waiting)
                await trio.testing.wait_all_tasks_blocked()
                assert engine.stats().queue_depth == 1
                service.cancel_scope.cancel()
        with pytest.raises(EngineClosed, match="shutting down"):
            async for _ in running:
                pass
        assert len(refused) == 1 and engine.stats().workers[0].busy_slots == 0
        with pytest.raises(EngineClosed):
            await engine.chat(QUESTION, SHORT)
        await wait_until_idle(fleet[0])  # the worker saw the connection close


async def test_a_prompt_too_long_for_the_worker_is_context_too_long(fleet, remote_engine) -> None:
    async with remote_engine(worker_list(fleet)) as engine:
        huge = [SYSTEM, ChatMessage("user", "word " * 3000)]
        with trio.fail_after(WAIT_S), pytest.raises(WorkerContextTooLong, match="holds 1024"):
            await engine.chat(huge, SHORT, chat_id="c-huge")
        # a long history is trimmed, oldest turns first, until the prompt fits
        history = [SYSTEM]
        for i in range(12):
            history += [ChatMessage("user", f"question {i} " + "filler " * 120), ChatMessage("assistant", "ok")]
        history.append(ChatMessage("user", "Say hello."))
        roomy = SamplingParams(temperature=0.0, max_tokens=600)  # room for the reply is kept too
        with trio.fail_after(WAIT_S):
            with await engine.chat(history, roomy, chat_id="c-long") as gen:
                assert (await gen.text()).strip()
        assert 0 < gen.metrics.prompt_tokens <= 1024 - 512
        assert all(w.healthy for w in engine.stats().workers)  # the worker was not at fault


async def test_the_agent_runs_on_the_workers_under_its_grammar(fleet) -> None:
    settings = load_settings(environ={"KTULHU_WORKERS": worker_list(fleet), "LLAMA_CLI_MODEL": "nowhere.gguf"},
                             root=REPO)
    with trio.fail_after(WAIT_S):
        async with local_backend(settings) as backend:
            assert isinstance(backend.engine, RemoteEngine) and "inference workers" in backend.description
            completion = await backend.complete(
                [SYSTEM, ChatMessage("user", "Is the sky blue? Answer yes or no.")], max_tokens=4,
                grammar_for=lambda budget: 'root ::= "yes" | "no"', temperature=0.0, seed=1)
    assert completion.text in ("yes", "no") and completion.finish_reason in ("eos", "length")
    assert completion.prompt_tokens and completion.generated_tokens


async def test_no_reachable_worker_means_busy(remote_engine) -> None:
    async with hostile_worker("silent") as closed_port:
        url = closed_port.url
    async with remote_engine(f"{url}|slots=1") as engine:  # nothing listens there any more
        assert engine.describe()["status"] == "unavailable"
        with pytest.raises(Busy, match="no inference worker"):
            await engine.chat(QUESTION, SHORT, chat_id="c-nobody")
        assert "connection failed" in engine.stats().workers[0].last_error


# --- hostile workers ---------------------------------------------------------------------------------

#: Hostile-worker tests: health checks would re-admit the worker (its /health answers); not during a test.
NO_RECHECK = {"KTULHU_WORKER_HEALTH_INTERVAL": "3600"}


async def test_a_worker_answering_http_500_is_ejected_and_the_prompt_moves_on(fleet, remote_engine) -> None:
    async with hostile_worker("http500") as bad:
        async with remote_engine(f"{bad.url}|slots=2,{fleet[0].url}|slots=2", **NO_RECHECK) as engine:
            with trio.fail_after(WAIT_S):
                with await engine.chat(QUESTION, SHORT, chat_id=chat_for(engine, bad.url)) as gen:
                    assert (await gen.text()).strip()
            assert gen.metrics.worker == fleet[0].url and bad.posts == 1
            stats = worker_stats(engine, bad.url)
            assert not stats.healthy and stats.failures == 1 and stats.busy_slots == 0
            assert "HTTP 500" in stats.last_error and "out of memory" in stats.last_error
        async with remote_engine(f"{bad.url}|slots=2", **NO_RECHECK) as engine:  # the only worker
            with trio.fail_after(WAIT_S), pytest.raises(WorkerFailed, match="answered HTTP 500"):
                await engine.chat(QUESTION, SHORT, chat_id="c-500")
            assert not engine.stats().workers[0].healthy


async def test_a_worker_sending_garbage_fails_the_reply_and_is_ejected(remote_engine) -> None:
    async with hostile_worker("garbage") as bad, remote_engine(f"{bad.url}|slots=2", **NO_RECHECK) as engine:
        with trio.fail_after(WAIT_S):
            with await engine.chat(QUESTION, SHORT, chat_id="c-garbage") as gen:
                pieces = []
                with pytest.raises(WorkerFailed, match="invalid event stream"):
                    async for piece in gen:
                        pieces.append(piece)
        assert pieces == ["Hi"] and gen.finished.reason == "error"
        stats = engine.stats().workers[0]
        assert not stats.healthy and stats.failures == 1 and stats.busy_slots == 0


async def test_a_silent_worker_times_out_and_is_ejected(remote_engine) -> None:
    async with hostile_worker("silent") as bad:
        async with remote_engine(f"{bad.url}|slots=2", KTULHU_WORKER_TIMEOUT="1", **NO_RECHECK) as engine:
            with trio.fail_after(WAIT_S):
                with pytest.raises(WorkerFailed, match="no answer in time"):
                    await engine.chat(QUESTION, SHORT, chat_id="c-silent")
                await bad.closed.wait()  # we hung up on it
            stats = engine.stats().workers[0]
            assert not stats.healthy and stats.failures == 1 and stats.busy_slots == 0
            assert engine.describe()["status"] == "unavailable"
