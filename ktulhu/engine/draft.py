"""Prompt-lookup (n-gram) drafts for speculative decoding, and how many of them a step verifies.

A reply that quotes its conversation (a paragraph repeated, a sentence corrected, a piece of code
edited) goes on with text its sequence already holds: after the sequence's last n tokens, the
tokens that followed their most recent earlier occurrence are a free guess at what comes next. The
decode worker verifies such a draft in its batched step, where greedy sampling keeps exactly the
tokens it picks one step at a time (`worker.DecodeWorker`; as far as llama.cpp's kernels round a
batch of another shape alike, as with concurrent streams).

On a CPU a draft token costs about what a prefill token costs, so a draft that fails slows every
stream of the step down. `plan_drafts` therefore sends a draft token only when the chance that it
is accepted (learned per sequence by `Drafter.observe`, also from drafts left unsent) pays for its
cost at the step's current rate: quoting replies draft, replies whose drafts fail stop drafting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from .sampling import SamplingParams, plain_greedy

__all__ = ["ACCEPTANCE_EMA", "PRIOR_ACCEPTANCE", "Drafter", "can_draft", "plan_drafts"]

#: What a new sequence's draft tokens are assumed to be accepted at, until its own steps tell.
PRIOR_ACCEPTANCE = 0.5
#: Weight of each newly compared draft token in a sequence's acceptance estimate.
ACCEPTANCE_EMA = 0.2
#: Shortest n-gram looked up (a single token matches too often to predict anything).
SHORTEST_NGRAM = 2


def can_draft(params: SamplingParams) -> bool:
    """Whether a request's sampled tokens depend on the logits alone, picked greedily: only then is a
    verified draft exactly what sampling one token at a time would give. Penalties, biases and
    grammars keep state or reshape the logits per token, and log probabilities are reported per
    sampled step: those requests sample as usual."""
    return plain_greedy(params) and params.logprobs is None


@attrs.define
class Drafter:
    """One sequence's tokens (prompt, then the reply so far) indexed by n-gram, and how often its
    drafts came true."""

    #: The n-gram sizes looked up, longest first.
    sizes: tuple[int, ...]
    tokens: list[int] = attrs.field(factory=list)
    #: Estimated chance that a draft token is accepted once the ones before it were.
    acceptance: float = PRIOR_ACCEPTANCE
    #: n-gram -> the position right after its most recent occurrence that has a token after it.
    _followers: dict[tuple[int, ...], int] = attrs.field(factory=dict)

    @classmethod
    def create(cls, tokens: Iterable[int], longest: int) -> Drafter:
        """A drafter over `tokens` that looks up n-grams of `longest` tokens, then shorter ones down to 2."""
        drafter = cls(tuple(range(longest, SHORTEST_NGRAM - 1, -1)))
        drafter.extend(tokens)
        return drafter

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens: each one becomes the follower of the n-grams that end just before it."""
        followers = self._followers
        for token in tokens:
            end = len(self.tokens)
            for n in self.sizes:
                if end >= n:
                    followers[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the most recent earlier occurrence of the sequence's
        last n tokens (the longest n that occurred before); empty when none did."""
        tokens = self.tokens
        for n in self.sizes:
            if len(tokens) >= n:
                start = self._followers.get(tuple(tokens[-n:]))
                if start is not None:
                    return tokens[start:start + max(limit, 0)]
        return []

    def observe(self, proposal: Sequence[int], produced: Sequence[int]) -> None:
        """Learn from one step: the tokens the model produced (the accepted draft, then its own)
        against what the lookup proposed, sent or not, up to the first difference."""
        for guess, token in zip(proposal, produced):
            hit = guess == token
            self.acceptance += ACCEPTANCE_EMA * (hit - self.acceptance)
            if not hit:
                break


def plan_drafts(offers: Sequence[tuple[float, int]], *, streams: int, step_s: float, token_s: float,
                room: int) -> list[int]:
    """How many draft tokens each sequence sends this step, from its (acceptance, tokens proposed).

    The k-th token of a draft is accepted with chance acceptance**k and costs `token_s`; a step of
    `streams` tokens takes `step_s`. Tokens are added most likely first while each raises the
    step's expected tokens per second (chance * seconds > token_s * expected tokens), at most
    `room` in all."""
    ranked = sorted(((acceptance ** place, i) for i, (acceptance, proposed) in enumerate(offers)
                     for place in range(1, proposed + 1)), reverse=True)
    lengths = [0] * len(offers)
    expected, seconds = float(streams), step_s
    for chance, i in ranked[:room]:
        if chance * seconds <= token_s * expected:
            break
        lengths[i] += 1
        expected += chance
        seconds += token_s
    return lengths
