"""The step-cost model of a decode worker: how long a batched step takes, and so how many prompt
tokens the next step may prefill.

A step costs about `decode_step_s` for its generating sequences (one token each, nearly flat in
their number) plus `prefill_token_s` per further token: a prompt token, or a draft token verified
for a generating sequence (speculative decoding), which the batch computes alike. Both are
measured once at start (`StepCost.calibrate`) and then follow every completed step (`learn`), so
the prefill budget keeps a step near `step_target_s` on a CPU (slow prefill) as on a GPU (fast
prefill, where the budget reaches `n_batch`). Pure arithmetic: the worker times the steps, this
decides what they mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

__all__ = ["EMA", "MIN_PREFILL_CHUNK", "TAIL_SHARE", "StepCost"]

# Smallest prefill chunk of a step: below ~64 tokens llama.cpp's CPU kernels cost about 30% more per
# token (measured with the default model on 2 cores: 3.4 ms/token at 16, 2.6 ms/token at 64-512).
MIN_PREFILL_CHUNK = 64
EMA = 0.2  # weight of the newest measurement in the estimates
#: A prompt whose rest is at most this share of the step's budget is finished in the step: left for the
#: next step, that tail would hold its first token back a whole step.
TAIL_SHARE = 0.25


@attrs.define
class StepCost:
    """Running estimates (seconds) of a step's cost, and the prefill budget they give."""

    #: Most tokens one step may hold (the context's `n_batch`).
    n_batch: int
    #: How long a step should last: what a running stream waits for a newcomer's prompt at most.
    step_target_s: float
    #: A step of generating sequences only.
    decode_step_s: float = 0.0
    #: One prefill token.
    prefill_token_s: float = 0.0

    @classmethod
    def calibrate(cls, measure: Callable[[int], float], *, n_batch: int, step_target_s: float) -> StepCost:
        """Estimates from two timed steps (`measure(n)`: seconds one step of `n` tokens took), so the
        first real step is sized right: a `MIN_PREFILL_CHUNK` prefill first (it also warms the
        kernels up), then a one-token step."""
        prefill_s = measure(MIN_PREFILL_CHUNK)
        decode_s = measure(1)
        return cls(n_batch, step_target_s, decode_step_s=decode_s, prefill_token_s=prefill_s / MIN_PREFILL_CHUNK)

    def prefill_budget(self, generating: int, drafted: int = 0) -> int:
        """Prefill tokens that keep a step with `generating` streams and `drafted` draft tokens near
        `step_target_s`: never under `MIN_PREFILL_CHUNK`, never beyond what `n_batch` leaves."""
        room = self.n_batch - generating - drafted
        spare = self.step_target_s - (self.decode_step_s if generating else 0.0) - drafted * self.prefill_token_s
        return max(MIN_PREFILL_CHUNK, min(room, self._tokens_in(spare)))

    def plan_prefill(self, waiting: Sequence[int], generating: int, drafted: int = 0) -> list[int]:
        """Prompt tokens each waiting sequence prefills this step (`waiting`: their pending tokens,
        oldest first), within what `n_batch` leaves beside `generating` streams and `drafted` tokens.

        The step keeps to `prefill_budget`, except that a prompt it starts is finished when only a
        tail is left (`TAIL_SHARE`), and that when several sequences wait for their first token, at
        least as many as generate (a burst of arrivals), every whole prompt that fits goes in:
        stalling the few streams once costs less than holding each waiting request back a step and
        stalling the streams in each of those steps. A single waiting prompt gains only the fixed
        cost of the steps it saves, and keeps its steps short for whoever comes next; a prompt too
        long for one step is chunked either way."""
        room = self.n_batch - generating - drafted
        budget = self.prefill_budget(generating, drafted)
        if len(waiting) > 1 and len(waiting) >= generating:
            budget = max(budget, _whole_prompts(waiting, room))
        budget = min(budget, room)
        chunks: list[int] = []
        used = 0
        for pending in waiting:
            take = min(pending, budget - used)
            if 0 < take < pending and pending - take <= budget * TAIL_SHARE and used + pending <= room:
                take = pending
            chunks.append(max(take, 0))
            used += chunks[-1]
        return chunks

    def draft_room(self, generating: int) -> int:
        """Draft tokens a step with `generating` streams may verify: what its time target leaves
        beside the streams, and what `n_batch` leaves beside them and a minimal prefill chunk."""
        spare = self.step_target_s - self.decode_step_s
        return max(0, min(self.n_batch - generating - MIN_PREFILL_CHUNK, self._tokens_in(spare)))

    def _tokens_in(self, seconds: float) -> int:
        return int(seconds / max(self.prefill_token_s, 1e-7))

    def learn(self, generating: int, prefilled: int, elapsed: float) -> None:
        """Fold one completed step (its streams, its further tokens: prompt and draft ones, its
        seconds) into the estimates: a step of streams alone times the decode; one with more
        tokens times those, net of the decode share."""
        if prefilled == 0:
            self.decode_step_s += EMA * (elapsed - self.decode_step_s)
            return
        per_token = max(elapsed - (self.decode_step_s if generating else 0.0), 0.0) / prefilled
        self.prefill_token_s += EMA * (per_token - self.prefill_token_s)


def _whole_prompts(waiting: Sequence[int], room: int) -> int:
    """Tokens of the oldest prompts that fit `room` whole."""
    used = 0
    for pending in waiting:
        if used + pending > room:
            break
        used += pending
    return used
