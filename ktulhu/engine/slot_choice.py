"""The slot-reuse policy of a decode worker: which idle slot a new request takes, and whether it
starts from a copy of another slot's cached prefix.

Finished sequences keep their KV cache, keyed by the tokens it holds. A request should land where
the most of its prompt is cached (a follow-up turn of the same chat) and evict as little as
possible; a prefix cached in another slot (a system prompt shared across chats, a repeated API
prompt, the system prompt of unique API requests) is worth copying when the prefill it saves costs
more than the copy (`min_copied_tokens`, from the worker's measured costs). Pure functions over the
slots' cached tokens: the worker applies the choice to llama.cpp's memory.

Where no slot holds the request's conversation, the slot is chosen next to the slots generating
now: each sequence has its own KV stream, and llama.cpp decodes only sequences of consecutive ids in
one pass over the weights (its split of a batch across streams), so generating slots 1, 3, 4 and 6
take three passes a step where slots 3 to 6 take one: on a 2-core CPU, 4 streams step in 35 ms
instead of 23.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence, Set as AbstractSet
from typing import Protocol, TypeVar

__all__ = ["MIN_COPIED_TOKENS", "CachedSlot", "choose_slot", "common_prefix", "copy_source", "min_copied_tokens",
           "runs"]

#: Fewest prefill tokens a copy must save, whatever the measured costs say (a copy also evicts
#: what the receiving slot held).
MIN_COPIED_TOKENS = 4
#: A copy must save this many times its own measured cost (the measure is one sample).
COPY_MARGIN = 2.0


class CachedSlot(Protocol):
    """What the policy reads of a slot."""

    #: Its sequence id in llama.cpp (consecutive ids decode in one pass).
    sid: int
    #: Tokens whose KV is in the slot, in order.
    cached: list[int]
    #: The chat whose tokens these are (None: a request without a chat).
    chat_id: str | None
    #: When its last generation ended (any monotonic clock).
    last_used: float


S = TypeVar("S", bound=CachedSlot)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def runs(sids: AbstractSet[int]) -> int:
    """How many runs of consecutive ids `sids` makes: the decode passes a step of them takes."""
    return sum(1 for sid in sids if sid - 1 not in sids)


def choose_slot(idle: Sequence[S], prompt: Sequence[int], chat_id: str | None,
                busy: AbstractSet[int] = frozenset()) -> S:
    """The slot among `idle` (at least one) for `prompt`, losing as little cached work as possible
    and keeping the generating slots (the ids in `busy`) in as few runs as possible.

    1. the slot of the same chat, or one whose whole cache is a prefix of the prompt (a follow-up
       turn): the longest common prefix wins, then the most recently used;
    2. else an empty slot, next to the generating ones where one is;
    3. else one is evicted: next to the generating ones where one is, the least recently used among
       those (a shared system prompt alone is not worth evicting another conversation's cache:
       `copy_source` shares it instead).
    """
    affine = []
    for slot in idle:
        common = common_prefix(slot.cached, prompt)
        if slot.cached and (common == len(slot.cached) or (chat_id is not None and slot.chat_id == chat_id)):
            affine.append((common, slot.last_used, slot))
    if affine:
        return max(affine, key=lambda entry: entry[:2])[2]

    def passes(slot: S) -> int:
        return runs(busy | {slot.sid})

    empty = [s for s in idle if not s.cached]
    if empty:
        return min(empty, key=lambda s: (passes(s), s.sid))
    return min(idle, key=lambda s: (passes(s), s.last_used))


def min_copied_tokens(copy_s: float, prefill_token_s: float) -> int:
    """Prefill tokens a copy must save to pay: its cost (`copy_s`, as the worker makes it) over one
    prompt token's, with `COPY_MARGIN`, and never under `MIN_COPIED_TOKENS`."""
    return max(MIN_COPIED_TOKENS, math.ceil(COPY_MARGIN * copy_s / max(prefill_token_s, 1e-9)))


def copy_source(target: CachedSlot, idle: Iterable[S], prompt: Sequence[int],
                min_saved: int = MIN_COPIED_TOKENS) -> tuple[S, int] | None:
    """Another slot among `idle` that caches a longer prefix of `prompt` than `target` does, by at
    least `min_saved` tokens, and the length of that prefix (the longest; the first slot on a tie);
    None when no copy pays."""
    best = common_prefix(target.cached, prompt) + min_saved - 1
    donor = None
    for other in idle:
        if other is not target and other.cached:
            common = common_prefix(other.cached, prompt)
            if common > best:
                best, donor = common, other
    return None if donor is None else (donor, best)
