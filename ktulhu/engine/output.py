"""From sampled bytes to the text a user sees: UTF-8-safe, stop strings, no thinking block.

All three are incremental and hold back only what the next token could still change, so text is
delivered as early as it is certain.
"""

from __future__ import annotations

import codecs

import attrs

__all__ = ["THINK_TAGS", "OutputFilter", "StopMatcher", "ThinkFilter", "Utf8Decoder"]

#: (open, close) of reasoning blocks in the formats of common reasoning models.
THINK_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))


class Utf8Decoder:
    """Bytes in, text out: a character split across tokens waits for its remaining bytes;
    invalid sequences become U+FFFD instead of raising."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _partial_suffix(text: str, needle: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `needle`."""
    for n in range(min(len(text), len(needle) - 1), 0, -1):
        if needle.startswith(text[-n:]):
            return n
    return 0


@attrs.define
class StopMatcher:
    """Finds stop strings across token boundaries. `feed` returns (safe text, stopped)."""

    stops: tuple[str, ...]
    _held: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
        hold = max(_partial_suffix(buffer, s) for s in self.stops)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@attrs.define
class ThinkFilter:
    """Drops reasoning blocks from the visible text (all of it while a block is open)."""

    tags: tuple[tuple[str, str], ...] = THINK_TAGS
    _held: str = ""
    _closing: str | None = None  # the close tag we are waiting for while inside a block
    thinking_chars: int = 0

    def feed(self, text: str) -> str:
        buffer = self._held + text
        visible = []
        while buffer:
            if self._closing is not None:
                end = buffer.find(self._closing)
                if end < 0:
                    hold = _partial_suffix(buffer, self._closing)
                    self.thinking_chars += len(buffer) - hold
                    self._held = buffer[len(buffer) - hold:] if hold else ""
                    return "".join(visible)
                self.thinking_chars += end
                buffer = buffer[end + len(self._closing):]
                self._closing = None
                continue
            starts = [(buffer.find(open_), close) for open_, close in self.tags]
            found = [(i, close) for i, close in starts if i >= 0]
            if found:
                i, close = min(found)
                visible.append(buffer[:i])
                opener = next(o for o, c in self.tags if c == close)
                buffer = buffer[i + len(opener):]
                self._closing = close
                continue
            hold = max(_partial_suffix(buffer, open_) for open_, _ in self.tags)
            visible.append(buffer[: len(buffer) - hold])
            self._held = buffer[len(buffer) - hold:] if hold else ""
            return "".join(visible)
        self._held = ""
        return "".join(visible)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self._closing is not None else held


@attrs.define
class OutputFilter:
    """bytes of each sampled token -> visible text; `stopped` once a stop string was seen."""

    stop: StopMatcher
    think: ThinkFilter | None
    utf8: Utf8Decoder = attrs.field(factory=Utf8Decoder)
    stopped: bool = False

    @classmethod
    def create(cls, stops: tuple[str, ...], include_thinking: bool) -> "OutputFilter":
        return cls(stop=StopMatcher(stops), think=None if include_thinking else ThinkFilter())

    def feed(self, data: bytes) -> str:
        return self._pass(self.utf8.feed(data))

    def finish(self) -> str:
        """Text still held back when generation ends (not after a stop string)."""
        if self.stopped:
            return ""
        text = self._pass(self.utf8.flush())
        if self.stopped:
            return text
        if self.think is not None:
            text += self._stop_only(self.think.flush())
        return text + ("" if self.stopped else self.stop.flush())

    def _pass(self, text: str) -> str:
        if self.think is not None:
            text = self.think.feed(text)
        return self._stop_only(text)

    def _stop_only(self, text: str) -> str:
        safe, stopped = self.stop.feed(text)
        self.stopped = self.stopped or stopped
        return safe
