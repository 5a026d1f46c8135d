"""The trio face of inference: bounded admission, decode workers, and chat prompts.

    Engine.run (engine nursery)
    ├── feeder[i]       takes requests from the admission channel when worker i has a free slot
    └── decode thread[i] DecodeWorker.run: batched steps over its slots

`generate()` puts a request into a bounded memory channel (`KTULHU_QUEUE`); when it is full the
caller gets `Busy` at once, nothing queued. A request waits there until a worker has a free slot.
Every accepted generation is counted in flight until it ends (`wait_idle` awaits none being left).
Chat prompts are rendered, tokenised and trimmed on worker threads (`build_prompt`, `chat`), at
most `PROMPT_THREADS` at once, so a huge conversation never stalls the event loop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import attrs
import llama_cpp
import trio

from ..settings import DEFAULT_TEMPLATE_FILE, Settings
from .arrivals import Arrivals
from .in_flight import InFlight
from .model import Model
from .prompt import DEFAULT_SYSTEM, ChatMessage, ContextTooLong, Prompt, PromptBuilder, PromptError
from .request import Busy, EngineClosed, EngineEvents, Finished, Generation
from .sampling import SamplingParams
from .worker import GATHER_MAX_S, DecodeWorker, WorkerStats, physical_cores

__all__ = ["PROMPT_THREADS", "Engine", "EngineStats"]

log = logging.getLogger("ktulhu.engine")

#: Prompts built at once (worker threads); more wait their turn. Tokenisation releases the GIL, so
#: two keep a second core busy without starving the event loop or the decode threads.
PROMPT_THREADS = 2
#: Bound on waiting, at shutdown, for prompt threads that cancelled callers left running.
PROMPT_STOP_TIMEOUT_S = 10.0


@attrs.frozen
class EngineStats:
    """A snapshot for `/metrics` and the admin panel."""

    queue_depth: int
    queue_capacity: int
    workers: tuple[WorkerStats, ...]

    @property
    def busy_slots(self) -> int:
        return sum(w.busy_slots for w in self.workers)

    @property
    def kv_usage(self) -> float:
        capacity = sum(w.kv_capacity for w in self.workers)
        return 0.0 if capacity == 0 else sum(w.kv_tokens for w in self.workers) / capacity

    @property
    def stored_bytes(self) -> int:
        return sum(w.stored_bytes for w in self.workers)

    @property
    def prefix_restores(self) -> int:
        return sum(w.prefix_restores for w in self.workers)


class Engine:
    """Batched generation on one loaded model. Create it, then run `run` in a nursery."""

    def __init__(self, model: Model, settings: Settings, *, prompt_builder: PromptBuilder | None = None,
                 events: EngineEvents = EngineEvents(), arrivals: Arrivals | None = None,
                 gather_max_s: float = GATHER_MAX_S) -> None:
        self.model = model
        self.settings = settings
        #: Told of every step and every generation's end (the process's metrics when serving).
        self.events = events
        #: Requests on their way (the process's, when serving): an idle worker waits up to
        #: `gather_max_s` for them. A generation counts from `generate` until a worker has it.
        self.arrivals = arrivals if arrivals is not None else Arrivals()
        self.gather_max_s = gather_max_s
        self.n_ctx_seq = min(settings.ctx, model.info.n_ctx_train) if model.info.n_ctx_train > 0 else settings.ctx
        self.prompts = prompt_builder or _prompt_builder(model, settings)
        #: Bounds the worker threads building prompts (`build_prompt`).
        self.prompt_limiter = trio.CapacityLimiter(PROMPT_THREADS)
        self._prompts_closed = False
        self._send, self._receive = trio.open_memory_channel[Generation](settings.queue)
        self._workers: list[DecodeWorker] = []
        self._running = False
        self._in_flight = InFlight()

    # --- service ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        threads = settings.threads or physical_cores()
        token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                for index in range(settings.engine_workers):
                    slots_free = trio.Semaphore(settings.n_slots)
                    worker = await trio.to_thread.run_sync(functools.partial(
                        DecodeWorker, self.model, n_slots=settings.n_slots, n_ctx_seq=self.n_ctx_seq,
                        n_threads=threads, trio_token=token, on_slot_free=slots_free.release,
                        step_target_s=settings.step_target_ms / 1000, events=self.events,
                        draft_tokens=settings.draft_tokens if settings.speculative == "ngram" else 0,
                        draft_ngram=settings.draft_ngram, arrivals=self.arrivals, gather_max_s=self.gather_max_s,
                        prefix_store_bytes=settings.prefix_store_mb << 20,
                    ))
                    self._workers.append(worker)
                    nursery.start_soon(self._run_worker, worker, name=f"decode-{index}")
                    nursery.start_soon(self._feed, worker, slots_free, name=f"feeder-{index}")
                self._running = True
                task_status.started({"slots": settings.n_slots, "workers": settings.engine_workers,
                                     "n_ctx_per_slot": self.n_ctx_seq, "threads": threads,
                                     "queue": settings.queue})
        finally:
            self._running = False
            self._send.close()
            while True:  # requests still waiting for a slot end now, with a clear error
                try:
                    gen = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self.arrivals.leave()
                gen.fail(EngineClosed("the server is shutting down"))
            await self._stop_prompts()

    async def _run_worker(self, worker: DecodeWorker) -> None:
        try:
            with self.arrivals.waking(worker.wake):
                await trio.to_thread.run_sync(worker.run, abandon_on_cancel=True)
        finally:
            worker.stop()
            with trio.CancelScope(shield=True):  # the context is freed by its own thread: wait for it
                await trio.to_thread.run_sync(worker.stopped.wait, 10.0)

    async def _stop_prompts(self) -> None:
        """The model is freed after `run` returns, so no prompt thread may still be tokenising with it:
        new builds are refused, and all limiter tokens are taken (a thread its cancelled caller
        abandoned holds one until it has really stopped), within a bound."""
        self._prompts_closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(PROMPT_STOP_TIMEOUT_S) as waited:
            for _ in range(PROMPT_THREADS):
                await self.prompt_limiter.acquire_on_behalf_of(object())
        if waited.cancelled_caught:
            log.warning("a prompt thread was still busy %g s after the engine stopped", PROMPT_STOP_TIMEOUT_S)

    async def _feed(self, worker: DecodeWorker, slots_free: trio.Semaphore) -> None:
        async for gen in self._receive:
            try:
                if gen.cancelled:  # its reader left while it waited: it never needs a slot
                    gen.deliver("", Finished("cancelled", gen.metrics))
                    continue
                try:
                    await slots_free.acquire()
                except BaseException:
                    gen.fail(EngineClosed("the server is shutting down"))
                    raise
                worker.submit(gen)
            finally:  # after the worker has it: a gathering worker then also waits for the next one
                self.arrivals.leave()

    # --- requests --------------------------------------------------------------------------------

    async def build_prompt(self, messages: Sequence[ChatMessage], max_tokens: int) -> Prompt:
        """Chat messages -> tokens within the slot's context (raises `PromptError`/`ContextTooLong`,
        `EngineClosed` once the engine has stopped).

        Runs on a worker thread under `prompt_limiter`: its cost grows with the conversation. A
        cancelled caller returns at once; the thread stops at its next step (it polls for the
        cancellation between tokenizer calls) and only then gives its limiter token back.
        """
        if self._prompts_closed:
            raise EngineClosed("the engine is not running")
        messages = tuple(messages)  # the thread reads a snapshot, never a list the caller changes
        build = functools.partial(self.prompts.build, messages, n_ctx=self.n_ctx_seq, max_tokens=max_tokens,
                                  check=trio.from_thread.check_cancelled)
        return await trio.to_thread.run_sync(build, limiter=self.prompt_limiter, abandon_on_cancel=True)

    def generate(self, tokens: Sequence[int], params: SamplingParams, *, chat_id: str | None = None) -> Generation:
        """Queue a generation and return its handle (use `with`); raises `Busy` when the queue is full."""
        if not self._running:
            raise EngineClosed("the engine is not running")
        if not tokens:
            raise PromptError("empty prompt")
        if len(tokens) >= self.n_ctx_seq:  # first: the scan below is then bounded by the context
            raise ContextTooLong(len(tokens) + 1, self.n_ctx_seq)
        n_vocab = self.model.info.n_vocab
        if any(not 0 <= t < n_vocab for t in tokens):
            raise PromptError(f"token ids must be from 0 to {n_vocab - 1}")
        gen = Generation.create(tokens, params, chat_id, self.events)
        try:
            self._send.send_nowait(gen)
        except trio.WouldBlock:
            raise Busy(f"the server is busy ({self.settings.queue} requests waiting); try again shortly") from None
        self.arrivals.enter()  # on its way until a feeder hands it to a worker
        # every way out ends the handle: finished, cancelled (queued or running), failed at close
        self._in_flight.enter()
        gen.when_finished(self._in_flight.leave)
        return gen

    async def chat(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                   chat_id: str | None = None, left_on: tuple[str, int] | None = None) -> Generation:
        """Build the prompt (`build_prompt`, off the trio thread) and queue its generation (`generate`).

        `left_on` (where the chat's last reply was made, and its length in tokens) matters only to
        remote workers; this engine knows its own slots."""
        with self.arrivals.expecting():
            prompt = await self.build_prompt(messages, params.max_tokens)
            if prompt.max_tokens < params.max_tokens:
                params = attrs.evolve(params, max_tokens=prompt.max_tokens)
            return self.generate(prompt.tokens, params, chat_id=chat_id)

    async def complete(self, prompt: str | Sequence[int], params: SamplingParams, *,
                       chat_id: str | None = None) -> Generation:
        """A raw completion: `prompt` as text (tokenised off the trio thread, with the model's BOS and
        control tokens parsed, as llama-server does) or as token ids (taken as they are); no chat
        template. The reply's budget is cut to what the slot's context leaves after the prompt."""
        with self.arrivals.expecting():
            tokens = await self.tokenize(prompt, add_special=True) if isinstance(prompt, str) else list(prompt)
            room = self.n_ctx_seq - len(tokens)
            if tokens and room < 1:
                raise ContextTooLong(len(tokens) + 1, self.n_ctx_seq)
            if tokens and room < params.max_tokens:
                params = attrs.evolve(params, max_tokens=room)
            return self.generate(tokens, params, chat_id=chat_id)

    async def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True,
                       with_pieces: bool = False) -> list[int] | list[tuple[int, bytes]]:
        """Token ids of `text` (with `with_pieces`, (id, the bytes it spells) pairs), on a worker
        thread under `prompt_limiter` (its cost grows with the text); raises `EngineClosed` once the
        engine has stopped."""
        if self._prompts_closed:
            raise EngineClosed("the engine is not running")

        def work() -> list[int] | list[tuple[int, bytes]]:
            tokens = self.model.tokenize(text, special=parse_special, add_bos=add_special)
            return [(t, self.model.piece(t)) for t in tokens] if with_pieces else tokens

        return await trio.to_thread.run_sync(work, limiter=self.prompt_limiter, abandon_on_cancel=True)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` (ids from 0 to `n_vocab - 1`, checked by the caller), control tokens
        spelled out; on a worker thread like `tokenize`."""
        if self._prompts_closed:
            raise EngineClosed("the engine is not running")
        return await trio.to_thread.run_sync(self.model.detokenize, list(tokens), limiter=self.prompt_limiter,
                                             abandon_on_cancel=True)

    async def vocab_size(self) -> int:
        return self.model.info.n_vocab

    async def wait_idle(self) -> None:
        """Return once no generation is queued or running (at once if none is): background work
        (chat titles) awaits this instead of polling `stats`."""
        await self._in_flight.wait_idle()

    def drop_cache(self) -> None:
        """Free the KV cache of idle conversations (they prefill from scratch next time)."""
        for worker in self._workers:
            worker.drop_cache()

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_depth=self._receive.statistics().current_buffer_used,
            queue_capacity=self.settings.queue,
            workers=tuple(w.stats() for w in self._workers),
        )


def _prompt_builder(model: Model, settings: Settings) -> PromptBuilder:
    def tokenize(text: str, special: bool) -> list[int]:
        return model.tokenize(text, special=special)

    bos = _token_text(model, llama_cpp.llama_vocab_bos(model.vocab))
    eos = _token_text(model, llama_cpp.llama_vocab_eos(model.vocab))
    mode = settings.chat_template_path
    if mode in ("gguf", "auto"):
        source = llama_cpp.llama_model_chat_template(model.handle, None)
        if source:
            builder = PromptBuilder(source.decode("utf-8"), tokenize, bos, eos)
            if mode == "gguf":  # the model's template exactly as its authors wrote it
                return builder
            return _with_default_system(builder)
        if mode == "gguf":
            raise PromptError("CHAT_TEMPLATE_PATH=gguf but the model has no embedded chat template; "
                              "set CHAT_TEMPLATE_PATH to a template file, or to `auto`")
    path = settings.path(DEFAULT_TEMPLATE_FILE if mode == "auto" else mode)
    return PromptBuilder.from_file(path, tokenize, bos_token=bos, eos_token=eos)


def _with_default_system(builder: PromptBuilder) -> PromptBuilder:
    """`builder` with Ktulhu's default system prompt, unless its template refuses system messages."""
    try:
        builder.tokens([ChatMessage("system", "s"), ChatMessage("user", "u")])
    except PromptError:
        return builder
    return attrs.evolve(builder, default_system=DEFAULT_SYSTEM)


def _token_text(model: Model, token: int) -> str:
    if token < 0:
        return ""
    text = llama_cpp.llama_vocab_get_text(model.vocab, token)
    return text.decode("utf-8", "replace") if text else ""
