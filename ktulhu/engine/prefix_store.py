"""Host-memory copies of the KV cache of prefixes that several requests shared, kept for when no slot
holds them any more.

A shared prefix (a system prompt that chats or API requests start with, a prompt sent again) lives in
the slots' KV caches only while some slot holds it: when a burst of other requests takes every slot,
the next requests that start with it would prefill it again. So before the last slot holding a
prefix known to be shared gives it up, the decode worker saves that prefix's cells (llama.cpp's
per-sequence state, only the cells the sequence holds, not its whole stream) here, and a later
request restores it into its slot: a copy of bytes, about a millisecond for 200 tokens of a small
model on a CPU, instead of a prefill of hundreds of milliseconds. Entries are dropped least recently
used first to stay within a byte budget and `MAX_ENTRIES` (each admission compares its prompt with
every entry).

Only the decode thread uses a store: it is not locked.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from .slot_choice import common_prefix

__all__ = ["MAX_ENTRIES", "PrefixStore", "StoredPrefix"]

#: Most entries kept, whatever their size.
MAX_ENTRIES = 64


@attrs.define(eq=False)
class StoredPrefix:
    #: The tokens whose KV `data` holds, from position 0.
    tokens: tuple[int, ...]
    #: llama.cpp's saved sequence state (a ctypes byte array: restored without another copy).
    data: object = attrs.field(repr=False)
    size: int
    last_used: float


class PrefixStore:
    """Saved prefixes within `budget_bytes` and `MAX_ENTRIES`, least recently used dropped first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.entries: list[StoredPrefix] = []
        self.bytes = 0

    def longest(self, prompt: Sequence[int]) -> tuple[StoredPrefix, int] | None:
        """The entry sharing the longest prefix with `prompt` (the most recently used on a tie), and
        that length; None when none shares a token."""
        best: tuple[StoredPrefix, int] | None = None
        for entry in self.entries:
            common = common_prefix(entry.tokens, prompt)
            if common and (best is None or (common, entry.last_used) > (best[1], best[0].last_used)):
                best = (entry, common)
        return best

    def covers(self, prefix: Sequence[int]) -> bool:
        """Whether an entry starts with all of `prefix` (restoring it and cutting gives `prefix`)."""
        return any(common_prefix(entry.tokens, prefix) == len(prefix) for entry in self.entries)

    def fits(self, size: int) -> bool:
        return 0 < size <= self.budget_bytes

    def put(self, tokens: Sequence[int], data: object, size: int, now: float) -> None:
        """Keep `data` (`size` bytes, which `fits`) for `tokens`, dropping the least recently used
        entries it does not leave room for."""
        if not self.fits(size):
            raise ValueError(f"a saved prefix of {size} bytes does not fit a budget of {self.budget_bytes}")
        self.entries.sort(key=lambda entry: entry.last_used)
        while self.bytes + size > self.budget_bytes or len(self.entries) >= MAX_ENTRIES:
            self.bytes -= self.entries.pop(0).size
        self.entries.append(StoredPrefix(tuple(tokens), data, size, now))
        self.bytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
