"""Prompts are built off the trio thread, a bounded number at once, and a cancelled caller does not
keep a worker thread busy: the mechanism is asserted (which thread, how many, how many calls), never
a duration."""

from __future__ import annotations

import threading

import httpx
import pytest
import trio
import trio.testing

from ktulhu.engine.engine import PROMPT_THREADS, Engine
from ktulhu.engine.model import Model
from ktulhu.engine.prompt import ChatMessage, ContextTooLong, PromptBuilder
from ktulhu.engine.request import EngineClosed
from ktulhu.settings import load_settings
from tests.paths import REPO

CHATML = (REPO / "chat_template.jinja").read_text(encoding="utf-8")
#: Bounds the polling loops below; they end as soon as the state they wait for is reached.
WAIT_S = 30


def byte_tokens(text: str, special: bool) -> list[int]:
    return list(text.encode())


def engine_with(model: Model, tokenize) -> Engine:
    """An engine (not running: building a prompt needs no decode thread) with a test tokenizer."""
    settings = load_settings(environ={"LLAMA_CLI_THREADS": "1"}, root=REPO)
    return Engine(model, settings, prompt_builder=PromptBuilder(CHATML, tokenize))


def chat(turns: int) -> list[ChatMessage]:
    history = [ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(turns)]
    return [ChatMessage("system", "Be brief."), *history, ChatMessage("user", "and now?")]


async def test_a_prompt_is_built_on_a_worker_thread(tiny_model: Model) -> None:
    threads: set[int] = set()

    def tokenize(text: str, special: bool) -> list[int]:
        threads.add(threading.get_ident())
        return byte_tokens(text, special)

    engine = engine_with(tiny_model, tokenize)
    prompt = await engine.build_prompt(chat(20), 16)
    assert prompt.tokens and threads and threading.get_ident() not in threads
    assert engine.prompt_limiter.total_tokens == PROMPT_THREADS and engine.prompt_limiter.borrowed_tokens == 0
    with pytest.raises(ContextTooLong):  # errors reach the caller unchanged
        await engine.build_prompt([ChatMessage("user", "x" * 10 * engine.n_ctx_seq)], 16)


async def test_at_most_prompt_threads_build_at_once(tiny_model: Model) -> None:
    lock = threading.Lock()
    release = threading.Event()
    inside = peak = 0

    def tokenize(text: str, special: bool) -> list[int]:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        release.wait(WAIT_S)
        with lock:
            inside -= 1
        return byte_tokens(text, special)

    engine = engine_with(tiny_model, tokenize)
    callers = PROMPT_THREADS + 3
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(engine.build_prompt, chat(4), 16)
        with trio.fail_after(WAIT_S):
            while engine.prompt_limiter.statistics().tasks_waiting < callers - PROMPT_THREADS:
                await trio.sleep(0.01)
        assert engine.prompt_limiter.borrowed_tokens == PROMPT_THREADS
        release.set()
    assert peak == PROMPT_THREADS


async def test_a_cancelled_caller_returns_at_once_and_its_thread_stops_at_the_next_step(tiny_model: Model) -> None:
    entered, release = threading.Event(), threading.Event()
    calls = 0

    def tokenize(text: str, special: bool) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            release.wait(WAIT_S)
        return byte_tokens(text, special)

    engine = engine_with(tiny_model, tokenize)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.build_prompt, chat(500), 16)
            await trio.to_thread.run_sync(entered.wait, WAIT_S)
            scope.cancel()
    # The caller is back while its thread is still inside the tokenizer (abandoned, not waited for);
    # the thread keeps its limiter token until it has really stopped, so the bound stays true.
    assert not release.is_set() and engine.prompt_limiter.borrowed_tokens == 1
    release.set()
    with trio.fail_after(WAIT_S):
        while engine.prompt_limiter.borrowed_tokens:
            await trio.sleep(0.01)
    assert calls == 1  # it gave up before the next of the ~500 texts instead of finishing the prompt


async def test_the_engine_stops_only_after_prompt_threads_left_by_cancelled_callers(
    tiny_model: Model, running_engine
) -> None:
    """The model is freed once the engine has stopped: no abandoned thread may still tokenise with it."""
    entered, release = threading.Event(), threading.Event()

    def tokenize(text: str, special: bool) -> list[int]:
        entered.set()
        release.wait(WAIT_S)
        return byte_tokens(text, special)

    stopped = trio.Event()
    engines: list[Engine] = []

    async def serve_one_abandoned_prompt() -> None:
        async with running_engine(tiny_model) as engine:
            engines.append(engine)
            engine.prompts = PromptBuilder(CHATML, tokenize)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(engine.build_prompt, chat(10), 16)
                    await trio.to_thread.run_sync(entered.wait, WAIT_S)
                    scope.cancel()
        stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one_abandoned_prompt)
        await trio.to_thread.run_sync(entered.wait, WAIT_S)
        with trio.fail_after(WAIT_S):  # the stopping engine queues for the token the thread holds
            while engines[0].prompt_limiter.statistics().tasks_waiting < 1:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped.is_set() and engines[0].prompt_limiter.borrowed_tokens >= 1
        release.set()
    assert stopped.is_set()
    with pytest.raises(EngineClosed):
        await engines[0].build_prompt(chat(1), 16)


@pytest.mark.model
async def test_v1_and_ws_prompts_are_built_off_the_event_loop(live_server) -> None:
    from auth.helpers import bearer, make_user
    from chat.wsclient import dones, ws_client

    async with live_server(KTULHU_ANON_RATE="0", LLAMA_CLI_MAX_TOKENS="4") as server:
        engine = server.runtime.engine.get()
        tokenize = engine.prompts.tokenize
        calls: list[tuple[str, int]] = []
        surface = "none"

        def spy(text: str, special: bool) -> list[int]:
            calls.append((surface, threading.get_ident()))
            return tokenize(text, special)

        engine.prompts.tokenize = spy
        trio_thread = threading.get_ident()
        _, token = make_user(server.runtime, role="paid")
        history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20}
                   for i in range(99)]
        surface = "v1"
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            response = await http.post("/v1/chat/completions", headers=bearer(token),
                                       json={"messages": history, "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        surface = "ws"
        async with ws_client(server.ws_url + "/ws") as ws:
            frames = await ws.ask("Hello there")
        assert dones(frames)[0]["reason"] in ("eos", "length", "stop")
        by_surface = {name: {ident for s, ident in calls if s == name} for name in ("v1", "ws")}
        assert by_surface["v1"] and by_surface["ws"], calls
        assert trio_thread not in by_surface["v1"] | by_surface["ws"]
