"""Host-memory copies of the KV caches that slots gave up, for the requests that come back to them.

A decode worker has a few slots and serves more conversations than that: when a request takes a
slot that held another conversation (or another API prompt), the cache of that conversation is gone,
and its next turn would prefill its whole history again; a burst of other chats taking every slot
would cost the next requests their shared system prompt. So before a slot is given to another
conversation, the decode worker saves the cells it would lose (llama.cpp's per-sequence state: only
the cells the sequence holds, not its whole stream) here, and a later request whose prompt starts
with them restores them into its slot: a copy of bytes, about a millisecond for 200 tokens of a
small model on a CPU, instead of a prefill of hundreds of milliseconds. A request that shares only a
prefix with an entry (another chat with the same system prompt) restores it and keeps that prefix.

Entries that a newer one extends (an earlier turn of the same chat) are dropped; then the least
recently used ones, to stay within a byte budget and `MAX_ENTRIES` (each admission compares its
prompt with every entry, vectorised).

Only the decode thread uses a store: it is not locked.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

__all__ = ["MAX_ENTRIES", "PrefixStore", "StoredPrefix"]

#: Most entries kept, whatever their size.
MAX_ENTRIES = 64


def _tokens(tokens: Sequence[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@attrs.define(eq=False)
class StoredPrefix:
    #: The tokens whose KV `data` holds, from position 0.
    tokens: tuple[int, ...]
    #: llama.cpp's saved sequence state (bytes in a numpy array: restored without another copy).
    data: object = attrs.field(repr=False)
    size: int
    last_used: float
    #: The chat whose cache it was (None: a request without a chat): a restore into a request of
    #: that chat is its own reuse, one into another chat's request only shares a prefix.
    chat_id: str | None = None
    array: np.ndarray = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.array = _tokens(self.tokens)


class PrefixStore:
    """Saved caches within `budget_bytes` and `MAX_ENTRIES`, least recently used dropped first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.entries: list[StoredPrefix] = []
        self.bytes = 0
        #: The entries' tokens: the idle worker asks again and again whether a slot's cache is saved.
        self._saved: set[tuple[int, ...]] = set()

    def longest(self, prompt: Sequence[int]) -> tuple[StoredPrefix, int] | None:
        """The entry sharing the longest prefix with `prompt`, and that length; on a tie the smallest
        (the cheapest to restore), then the most recently used. None when none shares a token."""
        wanted = _tokens(prompt)
        best: tuple[int, int, float, StoredPrefix] | None = None
        for entry in self.entries:
            candidate = (_common(entry.array, wanted), -entry.size, entry.last_used, entry)
            if candidate[0] and (best is None or candidate[:3] > best[:3]):
                best = candidate
        return None if best is None else (best[3], best[0])

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether an entry starts with all of `tokens` (restoring it and cutting gives them)."""
        if tuple(tokens) in self._saved:
            return True
        wanted = _tokens(tokens)
        return any(_common(entry.array, wanted) == len(wanted) for entry in self.entries)

    def fits(self, size: int) -> bool:
        return 0 < size <= self.budget_bytes

    def has_room(self, size: int) -> bool:
        """Whether an entry of `size` bytes `fits` without dropping another."""
        return self.fits(size) and self.bytes + size <= self.budget_bytes and len(self.entries) < MAX_ENTRIES

    def put(self, tokens: Sequence[int], data: object, size: int, last_used: float,
            chat_id: str | None = None) -> None:
        """Keep `data` (`size` bytes, which `fits`) for `tokens`, as recent as `last_used`, dropping
        the entries it extends, then the least recently used ones it does not leave room for."""
        if not self.fits(size):
            raise ValueError(f"a saved cache of {size} bytes does not fit a budget of {self.budget_bytes}")
        entry = StoredPrefix(tuple(tokens), data, size, last_used, chat_id)
        kept = [e for e in self.entries if _common(e.array, entry.array) < len(e.array)]
        kept.sort(key=lambda e: e.last_used)
        held = sum(e.size for e in kept)
        while kept and (held + size > self.budget_bytes or len(kept) >= MAX_ENTRIES):
            held -= kept.pop(0).size
        self.entries = [*kept, entry]
        self.bytes = held + size
        self._saved = {e.tokens for e in self.entries}

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self._saved.clear()
