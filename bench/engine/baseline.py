"""The original server's design, rebuilt for comparison: a pool of single-sequence contexts.

Each request takes a context from the pool, clears its KV memory, prefills the whole prompt in
chunks of 512 and decodes one token at a time; N pool contexts serve N streams in N threads. To
keep the comparison kind to the original, the CPU threads are split between the contexts instead
of every context using all cores (which the original does, and which oversubscribes the CPU).
"""

from __future__ import annotations

import ctypes
import time

import llama_cpp
import trio

from ktulhu.engine.model import Model

from .workload import Record, TokenClock


class BaselinePool:
    def __init__(self, model: Model, *, contexts: int, n_ctx: int, threads: int) -> None:
        self.model = model
        per_context = max(1, threads // contexts)
        self.contexts = []
        for _ in range(contexts):
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = n_ctx
            params.n_batch = params.n_ubatch = 512
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = per_context
            params.no_perf = True
            self.contexts.append(llama_cpp.llama_init_from_model(model.handle, params))

    def close(self) -> None:
        for ctx in self.contexts:
            llama_cpp.llama_free(ctx)

    def generate(self, index: int, tokens: list[int], max_tokens: int, started: float) -> Record:
        """Greedy, `max_tokens` tokens (end-of-turn ignored), on context `index`; blocking."""
        ctx = self.contexts[index]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        batch = llama_cpp.llama_batch_init(512, 0, 1)
        piece = ctypes.create_string_buffer(256)
        try:
            pos = 0
            for start in range(0, len(tokens), 512):
                chunk = tokens[start:start + 512]
                _fill(batch, chunk, pos, want_last=start + 512 >= len(tokens))
                assert llama_cpp.llama_decode(ctx, batch) == 0
                pos += len(chunk)
            clock = TokenClock(started)
            for _ in range(max_tokens):
                token = llama_cpp.llama_sampler_sample(chain, ctx, -1)
                llama_cpp.llama_token_to_piece(self.model.vocab, token, piece, len(piece), 0, False)
                clock.tick()
                _fill(batch, [token], pos, want_last=True)
                assert llama_cpp.llama_decode(ctx, batch) == 0
                pos += 1
            return clock.record(max_tokens)
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_sampler_free(chain)


def _fill(batch: llama_cpp.llama_batch, tokens: list[int], pos: int, *, want_last: bool) -> None:
    batch.n_tokens = len(tokens)
    for k, token in enumerate(tokens):
        batch.token[k] = token
        batch.pos[k] = pos + k
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = 0
        batch.logits[k] = 0
    if want_last:
        batch.logits[len(tokens) - 1] = 1


async def run_streams(pool: BaselinePool, prompts: list[list[int]], max_tokens: int) -> tuple[list[Record], float]:
    """One worker thread per pool context, each serving one stream's request."""
    records: list[Record] = []
    limiter = trio.CapacityLimiter(len(prompts))
    started = time.perf_counter()

    async def stream(i: int) -> None:
        records.append(await trio.to_thread.run_sync(pool.generate, i, prompts[i], max_tokens,
                                                     time.perf_counter(), limiter=limiter))

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(stream, i)
    return records, time.perf_counter() - started
