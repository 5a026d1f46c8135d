"""One llama context and the decode thread that owns it: continuous batching over its slots.

Every step packs one token for each sequence that is generating plus prefill chunks of new ones into
one `llama_batch`. The prefill of a step (at most `n_batch` tokens) is planned by the step-cost
model (`step_cost.StepCost`, fed every measured step): about `step_target_s` of it, so a long prompt
delays running streams, and cancellations take effect, within one short step; whole prompts at once
when a burst of requests waits for its first tokens. Then the step decodes it (the GIL is released
inside llama.cpp), samples each sequence with its own sampler chain, and hands the step's text to
trio in one `TrioToken.run_sync_soon`, which never blocks. A cancelled sequence is dropped at the
start of the next step; a prefill step that contains it is interrupted (llama.cpp's abort callback)
and redone without it. Finished sequences keep their KV cache, and the slot-reuse policy
(`slot_choice`) decides where a new request goes: the slot whose cache shares a prefix with its
prompt (a follow-up turn of the same chat), which then prefills only the new tokens; on another slot
it starts from a copy of the longest cached prefix (a system prompt shared across chats, a repeated
API prompt) when that saves enough prefill. Before a slot is given to another conversation, the cache
it loses is saved to host memory (`prefix_store`) and restored from there into the slot of a later
request that starts with it: a chat whose slot was taken by others does not prefill its history
again, and a burst that takes every slot does not cost the next requests their system prompt. An
idle worker saves its slots' caches ahead of time, where the store has room, so that the next such
requests do not wait for the copy.

An idle worker that gets a prompt while other requests are still on their way (`arrivals`: being
authenticated, routed, built on the trio thread) waits briefly for them before its first step, so a
burst that arrived together is prefilled together rather than behind the first request's step.

With speculative decoding on, a plain greedy sequence may also send a draft after its token: the
tokens that followed the latest earlier occurrence of its last n tokens (`draft`), as many as pay
for their compute. Each of its positions gets logits; greedy sampling there keeps the draft up to
its first miss, plus the model's own token at that position: 1 to K+1 tokens a step, each handled as
a token sampled alone. The rejected positions leave the KV cache, so `_Slot.cached` stays exactly
what the cache holds.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import llama_cpp
import numpy as np
import trio

from . import llama_log
from .arrivals import Arrivals
from .draft import Drafter, can_draft, plan_drafts
from .model import Model
from .output import OutputFilter
from .prefix_store import PrefixStore, StoredPrefix
from .request import EngineClosed, EngineError, EngineEvents, Finished, Generation, GrammarDeadEnd, TokenLogprob
from .sampling import TokenSampler, token_logprobs
from .slot_choice import choose_slot, common_prefix, copy_source, min_copied_tokens
from .step_cost import MIN_PREFILL_CHUNK, StepCost
from .threadpool import ThreadPool

__all__ = ["GATHER_MAX_S", "DecodeWorker", "WorkerStats", "physical_cores"]

log = logging.getLogger("ktulhu.engine")
IDLE_WAIT_S = 0.1  # bounded sleep of an idle decode thread between checks for work or stop
LLAMA_DECODE_ABORTED = 2  # llama_decode's return code when the abort callback stopped it
#: The longest an idle worker waits for requests on their way before its first step (`_gather`): a
#: burst of 8 reaches the engine over 5-25 ms on a 2-core CPU (the per-request work before it).
GATHER_MAX_S = 0.05
#: Fewest tokens of a cache worth saving to the store when its slot goes to another conversation:
#: fewer save less than a step of prefill.
MIN_SAVED_TOKENS = 16


def physical_cores() -> int:
    """Physical CPU cores (llama.cpp decodes best with one thread per core)."""
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


@attrs.define(eq=False)
class _Slot:
    sid: int
    #: Tokens whose KV is in this sequence, in order (the prefix-reuse key).
    cached: list[int] = attrs.field(factory=list)
    chat_id: str | None = None
    last_used: float = 0.0
    gen: Generation | None = None
    pending: list[int] = attrs.field(factory=list)  # prompt tokens still to prefill
    last_token: int = -1
    chain: TokenSampler | None = None
    output: OutputFilter | None = None
    max_tokens: int = 0
    batch_index: int | None = None
    #: What this step added (for undoing an aborted step): tokens, and the prompt chunk among them.
    step_tokens: int = 0
    step_chunk: list[int] = attrs.field(factory=list)
    #: Log-probability entries of sampled tokens whose text is not delivered yet (requests that ask).
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    #: Its n-gram drafts (a plain greedy request while speculation is on), else None.
    drafter: Drafter | None = None
    #: This step's draft as looked up, and the part of it sent for verification.
    proposal: list[int] = attrs.field(factory=list)
    draft: list[int] = attrs.field(factory=list)


@attrs.frozen
class WorkerStats:
    slots: int
    busy_slots: int
    cached_slots: int
    kv_tokens: int
    kv_capacity: int
    steps: int
    decode_seconds: float
    step_seconds: float
    prompt_tokens: int
    generated_tokens: int
    #: Prefill steps abandoned half-way because a sequence in them was cancelled.
    aborted_steps: int
    #: Draft tokens verified (speculative decoding), and those accepted.
    draft_tokens: int
    accepted_tokens: int
    #: Caches saved in host memory (`prefix_store`), their bytes, and restores from them.
    stored_prefixes: int
    stored_bytes: int
    prefix_restores: int

    @property
    def bookkeeping_share(self) -> float:
        """Share of step time spent in Python rather than in llama_decode."""
        return 0.0 if self.step_seconds <= 0 else max(0.0, 1.0 - self.decode_seconds / self.step_seconds)


class DecodeWorker:
    """Owns one context; `run` is the body of its decode thread. Other methods are thread-safe."""

    def __init__(
        self,
        model: Model,
        *,
        n_slots: int,
        n_ctx_seq: int,
        n_threads: int,
        trio_token: trio.lowlevel.TrioToken,
        on_slot_free: Callable[[], None],
        n_batch: int = 512,
        step_target_s: float = 0.1,
        draft_tokens: int = 0,
        draft_ngram: int = 3,
        events: EngineEvents = EngineEvents(),
        arrivals: Arrivals | None = None,
        gather_max_s: float = GATHER_MAX_S,
        prefix_store_bytes: int = 0,
    ) -> None:
        """`draft_tokens`: longest draft a plain greedy sequence verifies per step (0 = no speculative
        decoding), looked up by n-grams of `draft_ngram` tokens down to 2. `arrivals`: requests on
        their way, waited for up to `gather_max_s` by an idle worker (none: never waits).
        `prefix_store_bytes`: host memory for the caches slots give up (0: none kept)."""
        self.model = model
        self.store = PrefixStore(prefix_store_bytes) if prefix_store_bytes > 0 else None
        #: Host memory a copy between slots goes through (`_transfer`), grown as needed.
        self._scratch = np.empty(0, np.uint8)
        self.arrivals = arrivals if arrivals is not None else Arrivals()
        self.gather_max_s = gather_max_s
        #: Told of every step (`EngineEvents.step`, on this thread: cheap and thread-safe).
        self.events = events
        self.n_slots = n_slots
        self.n_ctx_seq = n_ctx_seq
        # a recurrent model's state cannot drop the rejected positions of a draft
        recurrent = llama_cpp.llama_model_is_recurrent(model.handle) or llama_cpp.llama_model_is_hybrid(model.handle)
        self.draft_tokens = 0 if recurrent else draft_tokens
        self.draft_ngram = draft_ngram
        self._trio_token = trio_token
        self._on_slot_free = on_slot_free
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_slots
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_slots
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = False  # each sequence gets its own n_ctx_seq
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model.handle, params)
        if not self.ctx:
            raise EngineError(
                f"llama.cpp could not create a context of {n_slots} x {n_ctx_seq} tokens "
                "(not enough memory? lower KTULHU_SLOTS or LLAMA_CLI_CTX)"
            )
        self.threads = ThreadPool(self.ctx, n_threads)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.slots = [_Slot(sid) for sid in range(n_slots)]
        self._inbox: collections.deque[Generation] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._drop_cache = False
        self.stopped = threading.Event()
        self._piece = ctypes.create_string_buffer(256)
        #: Calls for trio made during a step (tokens, endings, freed slots), handed over after it.
        self._outbox: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        #: Seconds a copy of a sequence's cells (`_transfer`) takes per cell: timed by the calibration.
        self.cell_copy_s = 0.0
        #: Sizes each step's prefill: timed once here, so the first real step is sized right, then fed every step.
        self.costs = StepCost.calibrate(self._time_calibration_step, n_batch=n_batch, step_target_s=step_target_s)
        #: Seconds a copy of a slot's whole KV stream adds to the next step (`_copy`), timed once.
        self.stream_copy_s = self._time_copy() if n_slots > 1 else 0.0
        # llama.cpp polls this between graph nodes of long (prefill) steps: a cancel stops the step
        self._watched: list[_Slot] = []
        self._abort_callback = llama_cpp.ggml_abort_callback(self._cancel_pending)
        self._aborted_steps = 0
        self._steps = 0
        self._decode_s = 0.0
        self._step_s = 0.0
        self._prompt_tokens = 0
        self._generated = 0
        self._drafted = 0
        self._accepted = 0
        #: Admissions that started from another slot's copied prefix (`_copy`).
        self.prefix_copies = 0
        #: Admissions that started from a saved cache (`_restore`).
        self.prefix_restores = 0
        #: Slots that a stream copy queued since the last decode reads or writes (llama.cpp copies
        #: at the next decode): their cells are not final before it, so nothing reads or writes them
        #: at once until then (a restore, a cell copy, a save).
        self._queued: set[int] = set()

    def _time_calibration_step(self, n_tokens: int) -> float:
        """Seconds one step of `n_tokens` arbitrary tokens takes on slot 0 (left empty again). A
        step of several tokens also times their copy into slot 1 (`cell_copy_s`)."""
        self._fill_batch(n_tokens)
        started = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise EngineError("the model failed to decode its calibration batch")
        elapsed = time.perf_counter() - started
        if n_tokens > 1 and self.n_slots > 1:
            copied = time.perf_counter()
            self.cell_copy_s = (time.perf_counter() - copied) / n_tokens if self._transfer(0, 1) else math.inf
            llama_cpp.llama_memory_seq_rm(self.mem, 1, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.mem, 0, -1, -1)
        return elapsed

    def _time_copy(self) -> float:
        """Seconds a copy of one slot's KV into another adds to the next step: llama.cpp copies a
        sequence's whole stream there. Timed as a one-token step after the copy, less a plain one."""
        self._fill_batch(1, seq=0)
        failed = llama_cpp.llama_decode(self.ctx, self.batch) != 0
        llama_cpp.llama_memory_seq_cp(self.mem, 0, 1, -1, -1)
        self._fill_batch(1, seq=1, pos=1)
        started = time.perf_counter()
        failed = llama_cpp.llama_decode(self.ctx, self.batch) != 0 or failed
        elapsed = time.perf_counter() - started
        for sid in (0, 1):
            llama_cpp.llama_memory_seq_rm(self.mem, sid, -1, -1)
        return 0.0 if failed else max(0.0, elapsed - self.costs.decode_step_s)

    def _fill_batch(self, n_tokens: int, *, seq: int = 0, pos: int = 0) -> None:
        """`n_tokens` arbitrary tokens of sequence `seq` from position `pos`, logits for the last."""
        n_vocab = self.model.info.n_vocab
        batch = self.batch
        for k in range(n_tokens):
            batch.token[k] = (k * 7919) % n_vocab
            batch.pos[k] = pos + k
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = int(k == n_tokens - 1)
        batch.n_tokens = n_tokens

    # --- called from trio ------------------------------------------------------------------------

    def submit(self, gen: Generation) -> None:
        """Hand over a generation; the caller guarantees a free slot (one semaphore unit each)."""
        self._inbox.append(gen)
        self._wake.set()

    def drop_cache(self) -> None:
        """Forget the KV cache of idle slots at the next step (frees memory; the next turns prefill cold)."""
        self._drop_cache = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def wake(self) -> None:
        """Look again for work now (`Arrivals` calls it when no request is on its way any more)."""
        self._wake.set()

    def stats(self) -> WorkerStats:
        slots = list(self.slots)
        return WorkerStats(
            slots=self.n_slots,
            busy_slots=sum(s.gen is not None for s in slots),
            cached_slots=sum(s.gen is None and bool(s.cached) for s in slots),
            kv_tokens=sum(len(s.cached) for s in slots),
            kv_capacity=self.n_slots * self.n_ctx_seq,
            steps=self._steps,
            decode_seconds=self._decode_s,
            step_seconds=self._step_s,
            prompt_tokens=self._prompt_tokens,
            generated_tokens=self._generated,
            aborted_steps=self._aborted_steps,
            draft_tokens=self._drafted,
            accepted_tokens=self._accepted,
            stored_prefixes=len(self.store.entries) if self.store else 0,
            stored_bytes=self.store.bytes if self.store else 0,
            prefix_restores=self.prefix_restores,
        )

    # --- the decode thread -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            saving = False  # whether slots changed since the idle worker last found nothing to save ahead
            while not self._stopping:
                self._wake.clear()  # before looking for work, so a submit that follows is not missed
                worked = self._step()
                self._post_calls()
                if worked:
                    saving = True
                elif not (saving and self._save_ahead()):
                    saving = False
                    self._wake.wait(IDLE_WAIT_S)
        finally:
            for slot in self.slots:
                if slot.gen is not None:
                    self._finish(slot, "cancelled", error=EngineClosed("the server is shutting down"))
            while self._inbox:
                self._call_trio(self._inbox.popleft().fail, EngineClosed("the server is shutting down"))
            self._post_calls()
            llama_cpp.llama_batch_free(self.batch)
            self.threads.close()
            llama_cpp.llama_free(self.ctx)
            self.stopped.set()

    def _step(self) -> bool:
        """One batched decode. Returns False when there was nothing to do."""
        started = time.perf_counter()
        if self._drop_cache:
            self._drop_cache = False
            for slot in self.slots:
                if slot.gen is None and slot.cached:
                    llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, -1, -1)
                    slot.cached = []
            if self.store:
                self.store.clear()
        was_idle = all(slot.gen is None for slot in self.slots)
        while self._inbox:
            self._admit(self._inbox.popleft())
        if was_idle and self.arrivals.count and any(slot.gen is not None for slot in self.slots):
            self._gather()
        for slot in self.slots:
            if slot.gen is not None and slot.gen.cancelled:
                self._finish(slot, "cancelled")
        self._post_calls()  # freed slots and refused requests are not held up by this step's decode
        running = [s for s in self.slots if s.gen is not None]
        if not running:
            return False
        batch = self.batch
        batch.n_tokens = 0
        for slot in running:
            slot.batch_index = None
            slot.step_tokens = 0
            slot.step_chunk = []
            slot.proposal = []
            slot.draft = []
        streams = [s for s in running if not s.pending]
        drafted = self._plan_drafts(streams)
        for slot in streams:  # generating sequences first: one token each, and their drafts
            self._add(slot, [slot.last_token, *slot.draft], logits=1 + len(slot.draft))
        generating = len(streams)
        waiting = sorted((s for s in running if s.pending), key=lambda s: s.gen.metrics.submitted)
        prefilled = chunks = 0
        for slot, size in zip(waiting, self.costs.plan_prefill([len(s.pending) for s in waiting], generating, drafted)):
            if size:  # then prefill, oldest first
                chunk = slot.pending[:size]
                del slot.pending[:size]
                self._add(slot, chunk, logits=0 if slot.pending else 1)
                slot.step_chunk = chunk
                prefilled += size
                chunks += 1
        self._prompt_tokens += prefilled
        # Only prefill steps are long enough to be worth interrupting (the check runs per graph node).
        watch = prefilled >= MIN_PREFILL_CHUNK
        if watch:
            self._watched = running
            llama_cpp.llama_set_abort_callback(self.ctx, self._abort_callback, None)
        decode_started = time.perf_counter()
        if watch:
            with llama_log.expected_failures():
                rc = llama_cpp.llama_decode(self.ctx, batch)
        else:
            rc = llama_cpp.llama_decode(self.ctx, batch)
        elapsed = time.perf_counter() - decode_started
        self._queued.clear()  # the queued copies were made before the decode wrote anything
        if watch:
            llama_cpp.llama_set_abort_callback(self.ctx, llama_cpp.ggml_abort_callback(), None)
            self._watched = []
        self._decode_s += elapsed
        # before any of its tokens is handed to trio: whoever sees a reply end sees its steps counted
        # an aborted step's chunks are prefilled again later: not counted
        self.events.report(self.events.step, generating + chunks, 0 if rc else prefilled)
        if rc == LLAMA_DECODE_ABORTED:
            self._undo_step(running, prefilled)
        elif rc != 0:
            self._decode_failed(running, rc)
        else:
            self.costs.learn(generating, prefilled + drafted, elapsed)
            produced = {slot: self._produced(slot) for slot in running if slot.batch_index is not None}
            if drafted:  # counted before any token is handed on, like the step
                self._count_drafts(drafted, sum(len(tokens) - 1 for tokens in produced.values()))
            now = time.perf_counter()
            for slot, tokens in produced.items():
                self._take(slot, tokens, now)
        self._steps += 1
        self._step_s += time.perf_counter() - started
        return True

    def _gather(self) -> None:
        """Admit the requests still on their way (`arrivals`) as they come, until none is left, the
        slots are full, or the wait would cost more than it saves: at most `gather_max_s`, and at
        most the step the admitted prompts would take, which is all a later request could lose by
        waiting for it. A submission or the count falling to zero wakes the wait."""
        costs = self.costs
        pending = sum(len(slot.pending) for slot in self.slots if slot.gen is not None)
        deadline = time.perf_counter() + min(self.gather_max_s, costs.decode_step_s + pending * costs.prefill_token_s)
        while True:
            self._wake.clear()  # before looking: a submission that follows sets it again
            while self._inbox:
                self._admit(self._inbox.popleft())
            left = deadline - time.perf_counter()
            if left <= 0 or not self.arrivals.count or self._stopping or all(s.gen is not None for s in self.slots):
                return
            self._wake.wait(left)

    def _plan_drafts(self, streams: list[_Slot]) -> int:
        """Look up the draft of each speculating stream and choose how much of it this step verifies
        (`plan_drafts`, from the step's costs); returns the draft tokens chosen."""
        drafting = [s for s in streams if s.drafter is not None]
        if not drafting:
            return 0
        for slot in drafting:
            # the step yields at most draft + 1 tokens; max_tokens also keeps them within the context
            left = slot.max_tokens - slot.gen.metrics.generated_tokens
            slot.proposal = slot.drafter.propose(min(self.draft_tokens, left - 1))
        costs = self.costs
        lengths = plan_drafts([(s.drafter.acceptance, len(s.proposal)) for s in drafting], streams=len(streams),
                              step_s=costs.decode_step_s, token_s=costs.prefill_token_s,
                              room=costs.draft_room(len(streams)))
        for slot, length in zip(drafting, lengths):
            slot.draft = slot.proposal[:length]
        return sum(lengths)

    def _produced(self, slot: _Slot) -> list[int | None]:
        """The tokens sampled at the slot's positions of this step: the draft tokens greedy sampling
        agrees with, then the model's own token (one token for a sequence without a draft)."""
        produced: list[int | None] = []
        for offset, guess in enumerate([*slot.draft, None]):
            produced.append(slot.chain.sample(self.ctx, slot.batch_index + offset))
            if produced[-1] != guess:
                break
        return produced

    def _count_drafts(self, drafted: int, accepted: int) -> None:
        self._drafted += drafted
        self._accepted += accepted
        self.events.report(self.events.drafted, drafted, accepted)

    def _take(self, slot: _Slot, produced: list[int | None], now: float) -> None:
        """Cut the rejected draft tokens from the KV cache, then handle the step's tokens of `slot` in
        order, each as a token sampled alone, until its generation ends or is cancelled.

        The cache is cut before any token is handed on, so whoever sees the reply end sees the cache
        as it stays. Accepted draft tokens past the reply's end stay in it: they are the model's own
        continuation, and a next prompt reuses what it shares with them (`slot_choice`)."""
        if slot.drafter is not None:
            slot.drafter.observe(slot.proposal, produced)
        rejected = len(slot.draft) + 1 - len(produced)
        if rejected:
            del slot.cached[-rejected:]
            llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, len(slot.cached), -1)
        for token in produced:
            self._sampled(slot, token, now)
            if slot.gen is None or slot.gen.cancelled:
                break

    def _cancel_pending(self, _data: object) -> bool:
        return any(slot.gen is not None and slot.gen.cancelled for slot in self._watched)

    def _undo_step(self, running: list[_Slot], prefilled: int) -> None:
        """llama.cpp dropped the aborted step's positions; put our bookkeeping back to match."""
        self._aborted_steps += 1
        self._prompt_tokens -= prefilled
        for slot in running:
            if slot.step_tokens:
                del slot.cached[-slot.step_tokens:]
                llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, len(slot.cached), -1)
            if slot.step_chunk:
                slot.pending[:0] = slot.step_chunk

    def _add(self, slot: _Slot, tokens: list[int], *, logits: int) -> None:
        """Put `tokens` at the sequence's next positions; its last `logits` positions get logits, the
        first of them at `slot.batch_index`."""
        batch = self.batch
        base = len(slot.cached)
        for k, token in enumerate(tokens):
            j = batch.n_tokens
            batch.token[j] = token
            batch.pos[j] = base + k
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = slot.sid
            batch.logits[j] = 0
            batch.n_tokens = j + 1
        slot.cached.extend(tokens)
        slot.step_tokens += len(tokens)
        if logits:
            for j in range(batch.n_tokens - logits, batch.n_tokens):
                batch.logits[j] = 1
            slot.batch_index = batch.n_tokens - logits

    def _admit(self, gen: Generation) -> None:
        if gen.cancelled:
            self._call_trio(gen.deliver, "", Finished("cancelled", gen.metrics))
            self._call_trio(self._on_slot_free)
            return
        prompt = list(gen.tokens)
        try:
            chain = TokenSampler.create(gen.params, self.model.vocab, self.model.info.n_vocab,
                                        gen.params.resolved_seed(), prompt)
        except ValueError as error:  # a grammar llama.cpp refuses: this request fails, nothing else
            self._call_trio(gen.fail, EngineError(str(error)))
            self._call_trio(self._on_slot_free)
            return
        idle = [s for s in self.slots if s.gen is None]
        slot = choose_slot(idle, prompt, gen.chat_id, busy={s.sid for s in self.slots if s.gen is not None})
        self._start_from_longest_prefix(slot, idle, prompt, gen.chat_id)
        reuse = common_prefix(slot.cached, prompt)
        reuse = min(reuse, len(prompt) - 1)  # the last prompt token is decoded again for its logits
        if reuse < len(slot.cached):
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, reuse, -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, -1, -1)
                reuse = 0
            del slot.cached[reuse:]
        own = gen.chat_id is not None and slot.chat_id == gen.chat_id
        slot.drafter = Drafter.create(prompt, self.draft_ngram) if self.draft_tokens and can_draft(gen.params) else None
        slot.chain = chain
        slot.gen = gen
        slot.chat_id = gen.chat_id
        slot.pending = prompt[reuse:]
        slot.output = OutputFilter.create(gen.params.stop, gen.params.include_thinking)
        slot.max_tokens = min(gen.params.max_tokens, self.n_ctx_seq - len(prompt))
        gen.metrics.admitted = time.perf_counter()
        gen.metrics.cached_tokens = reuse
        gen.metrics.own_cached_tokens = reuse if own else 0

    def _start_from_longest_prefix(self, slot: _Slot, idle: list[_Slot], prompt: list[int],
                                   chat_id: str | None) -> None:
        """Give `slot` the longest cached prefix of `prompt` where that saves enough prefill: its
        own, another idle slot's (`copy_source`: a system prompt shared across chats, a repeated API
        prompt, a regenerated reply), or a saved one (`_worth_restoring`: a conversation whose slot
        others took). What the slot held for another conversation is saved first (`_save_evicted`)."""
        kept = common_prefix(slot.cached, prompt)
        own = kept == len(slot.cached) or (chat_id is not None and slot.chat_id == chat_id)
        longest = max(len(other.cached) for other in idle)
        source = copy_source(slot, idle, prompt, min_copied_tokens(self._copy_cost(slot, longest),
                                                                   self.costs.prefill_token_s))
        stored = self._worth_restoring(slot, prompt, max(kept, source[1] if source else 0))
        if not own:
            self._save_evicted(slot, 0 if stored or source else kept)
        if stored is not None:
            self._restore(slot, stored)
        elif source is not None:
            self._copy(slot, *source)

    def _copy_cost(self, slot: _Slot, cells: int) -> float:
        """Seconds a copy of a cache of `cells` cells into `slot` costs, the cheaper way (`_copy`)."""
        if slot.sid in self._queued:
            return self.stream_copy_s
        return min(self.stream_copy_s, cells * self.cell_copy_s)

    def _copy(self, slot: _Slot, donor: _Slot, length: int) -> None:
        """Start `slot` from the first `length` tokens of `donor`'s cache; the donor keeps its own.

        Each sequence has its own KV stream. A short cache is copied cell by cell (`_transfer`: its
        bytes, at once); a long one (or between slots a queued stream copy involves) stream and all
        by llama.cpp, at the next decode before that decode writes anything, which costs the same
        whatever the cache holds. Either copy is then cut to the shared prefix."""
        llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, -1, -1)
        if (donor.sid in self._queued or self._copy_cost(slot, len(donor.cached)) >= self.stream_copy_s
                or not self._transfer(donor.sid, slot.sid)):
            llama_cpp.llama_memory_seq_cp(self.mem, donor.sid, slot.sid, -1, -1)
            self._queued |= {donor.sid, slot.sid}
        if not llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, length, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, -1, -1)
            slot.cached = []
            return
        slot.cached = donor.cached[:length]
        slot.chat_id = donor.chat_id  # whose prefix it now holds (what counts as a chat's own reuse)
        self.prefix_copies += 1

    def _worth_restoring(self, slot: _Slot, prompt: list[int], have: int) -> StoredPrefix | None:
        """The saved cache sharing the longest prefix with `prompt`, where that is longer than `have`
        (what `slot` keeps or copies) by enough to pay for its restore (its cells, `cell_copy_s`
        each at most); None too for a slot that a queued stream copy involves (a restore writes at once)."""
        found = self.store.longest(prompt) if self.store is not None and slot.sid not in self._queued else None
        if found is None or math.isinf(self.cell_copy_s):
            return None
        entry, common = found
        cost = len(entry.tokens) * self.cell_copy_s
        return entry if common - have >= min_copied_tokens(cost, self.costs.prefill_token_s) else None

    def _save_ahead(self) -> bool:
        """With every slot idle and holding a cache, save one that is not saved yet, the least
        recently used first (the one the next request of another conversation takes), where the
        store has room without dropping an entry: that request then finds it saved (`_save_evicted`),
        where fresh host memory would cost it about as much as the copy. Only a cache whose copy
        takes at most a decode step (`cell_copy_s` a cell): a request that arrives meanwhile waits
        no longer. True when it saved one (the caller looks for work again before the next)."""
        if self.store is None or not all(slot.cached and slot.gen is None for slot in self.slots):
            return False
        oldest_first = sorted(self.slots, key=lambda slot: slot.last_used)
        return any(self._save_evicted(slot, 0, room_only=True) for slot in oldest_first
                   if len(slot.cached) * self.cell_copy_s <= self.costs.decode_step_s)

    def _save_evicted(self, slot: _Slot, keep: int, *, room_only: bool = False) -> bool:
        """Before `slot` keeps only its first `keep` tokens for another conversation, save its cache
        to the store when that loses at least `MIN_SAVED_TOKENS`, unless an entry or another slot
        holds all of it, or a queued stream copy involves the slot (`room_only`: unless that would
        drop an entry). The entry is as recent as the slot's last use. True when it saved."""
        cached = slot.cached
        if (self.store is None or len(cached) - keep < MIN_SAVED_TOKENS or slot.sid in self._queued
                or self.store.covers(cached)):
            return False
        if any(other is not slot and other.cached[:len(cached)] == cached for other in self.slots):
            return False
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.sid)
        if not (self.store.has_room(size) if room_only else self.store.fits(size)):
            return False
        data = np.empty(size, np.uint8)  # not zeroed: llama.cpp writes all of it
        if not self._get_state(slot.sid, data, size):
            return False
        self.store.put(cached, data, size, slot.last_used, slot.chat_id)
        return True

    def _transfer(self, source: int, target: int) -> bool:
        """Copy sequence `source`'s cells into sequence `target` in place of its own (llama.cpp's
        per-sequence state, through host memory: bytes in proportion to the cells); False when
        llama.cpp refuses (`target` is then empty)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, source)
        if len(self._scratch) < size:
            self._scratch = np.empty(size, np.uint8)
        if not self._get_state(source, self._scratch, size):
            llama_cpp.llama_memory_seq_rm(self.mem, target, -1, -1)
            return False
        return self._set_state(target, self._scratch, size)

    def _get_state(self, source: int, into: np.ndarray, size: int) -> bool:
        """Write sequence `source`'s cells (`size` bytes, llama.cpp's per-sequence state) into `into`."""
        return llama_cpp.llama_state_seq_get_data(self.ctx, _pointer(into), size, source) == size

    def _set_state(self, target: int, data: np.ndarray, size: int) -> bool:
        """Put saved cells into sequence `target` in place of its own; False, and `target` empty,
        when llama.cpp refuses them."""
        if llama_cpp.llama_state_seq_set_data(self.ctx, _pointer(data), size, target) == size:
            return True
        llama_cpp.llama_memory_seq_rm(self.mem, target, -1, -1)
        return False

    def _restore(self, slot: _Slot, entry: StoredPrefix) -> None:
        """Put a saved cache's cells into `slot` in place of what it held."""
        slot.chat_id = entry.chat_id
        if not self._set_state(slot.sid, entry.data, entry.size):
            slot.cached = []
            return
        slot.cached = list(entry.tokens)
        entry.last_used = time.perf_counter()
        self.prefix_restores += 1

    def _sampled(self, slot: _Slot, token: int | None, now: float) -> None:
        gen = slot.gen
        if token is None:
            self._finish(slot, "error", error=GrammarDeadEnd("the grammar allows no further text at this point"))
            return
        metrics = gen.metrics
        if metrics.first_token is None:
            metrics.first_token = now
        else:
            metrics.gaps.append(now - metrics.last_token)
        metrics.last_token = now
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token) and not gen.params.ignore_eos:
            self._finish(slot, "eos")
            return
        metrics.generated_tokens += 1
        self._generated += 1
        data = self._token_bytes(token)
        if gen.params.logprobs is not None:
            slot.logprobs.append(self._logprob(slot, token, data, gen.params.logprobs))
        text = slot.output.feed(data)
        if slot.output.stopped:
            self._finish(slot, "stop", text)
        elif metrics.generated_tokens >= slot.max_tokens:
            self._finish(slot, "length", text)
        else:
            slot.last_token = token
            if slot.drafter is not None:
                slot.drafter.extend((token,))
            if text:
                logprobs, slot.logprobs = slot.logprobs, []
                self._call_trio(gen.deliver, text, None, logprobs)

    def _logprob(self, slot: _Slot, token: int, data: bytes, n_top: int) -> TokenLogprob:
        """The sampled token's entry from the raw logits of its step (O(n_vocab), only for requests
        that ask): read after sampling, which leaves the context's logits as they are."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, slot.batch_index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.model.info.n_vocab,))
        logprob, top = token_logprobs(logits, token, n_top)
        return TokenLogprob(data, logprob, tuple((data if i == token else self._token_bytes(i), lp) for i, lp in top))

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.model.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buffer, len(buffer), 0, False)
            return buffer.raw[:n]
        return self._piece.raw[:n]

    def _finish(self, slot: _Slot, reason: str, text: str = "", error: EngineError | None = None) -> None:
        gen = slot.gen
        if reason not in ("cancelled", "stop") and error is None:
            text += slot.output.finish()
        logprobs, slot.logprobs = slot.logprobs, []
        if reason == "stop":  # the stop string's own tokens have no entry (as llama-server)
            logprobs = _covering(logprobs, text)
        slot.chain.close()
        slot.chain = None
        slot.drafter = None
        slot.gen = None
        slot.pending = []
        slot.output = None
        slot.last_used = time.perf_counter()
        gen.metrics.finished = slot.last_used
        if reason == "cancelled":
            gen.metrics.slot_freed = slot.last_used
        if error is not None:
            self._call_trio(gen.fail, error)
        else:
            self._call_trio(gen.deliver, text, Finished(reason, gen.metrics), logprobs)
        self._call_trio(self._on_slot_free)

    def _decode_failed(self, running: list[_Slot], rc: int) -> None:
        log.error("llama_decode failed with code %d for %d sequences", rc, len(running))
        for slot in running:
            llama_cpp.llama_memory_seq_rm(self.mem, slot.sid, -1, -1)
            slot.cached = []
            self._finish(slot, "error", error=EngineError(f"the model failed to decode (code {rc})"))

    def _call_trio(self, fn: Callable[..., object], *args: object) -> None:
        """Queue a call for trio; `_post_calls` hands the step's calls over together."""
        self._outbox.append((fn, args))

    def _post_calls(self) -> None:
        """Hand the queued calls to trio in one `run_sync_soon` (each wakes trio with a syscall),
        in the order they were made."""
        if not self._outbox:
            return
        calls, self._outbox = self._outbox, []
        try:
            self._trio_token.run_sync_soon(_run_calls, calls)
        except trio.RunFinishedError:
            pass


def _pointer(data: np.ndarray) -> ctypes._Pointer[ctypes.c_uint8]:
    """Where `data`'s bytes start, as llama.cpp's state functions take it (no copy: numpy allocates
    without zeroing, where a ctypes array of a few MiB costs milliseconds to create)."""
    return data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def _run_calls(calls: list[tuple[Callable[..., object], tuple[object, ...]]]) -> None:
    for fn, args in calls:
        fn(*args)


def _covering(entries: list[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The first entries whose bytes cover `text`, the reply's last text before a stop string: the
    tokens after them spelled only the stop string."""
    need = len(text.encode("utf-8"))
    kept: list[TokenLogprob] = []
    for entry in entries:
        if need <= 0:
            break
        kept.append(entry)
        need -= len(entry.data)
    return kept
