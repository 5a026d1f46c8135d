"""A small progress bar for long CLI work; on a non-terminal it prints start and end lines only."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, label: str, total: int, out: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self._last_draw = 0.0
        self._started = time.monotonic()
        if not self.tty:
            self.out.write(f"{label}: {_size(total)}...\n")

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and (now - self._last_draw > 0.1 or self.done >= self.total):
            self._last_draw = now
            width = 30
            filled = int(width * min(self.done, self.total) / self.total)
            percent = 100 * min(self.done, self.total) // self.total
            self.out.write(f"\r{self.label}: [{'#' * filled}{'.' * (width - filled)}] {percent:3d}% "
                           f"{_size(self.done)}/{_size(self.total)}")
            self.out.flush()

    def finish(self) -> None:
        seconds = time.monotonic() - self._started
        if self.tty:
            self.out.write("\n")
        self.out.write(f"{self.label}: done, {_size(self.done)} in {seconds:.1f} s\n")
        self.out.flush()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
