"""The agent on a pseudo-terminal, for tests of its questions: what a person at a terminal sees."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio


class Terminal:
    """The master side of a pty: everything the process printed (`seen`), and typing."""

    def __init__(self, stream: trio.lowlevel.FdStream, proc: trio.Process) -> None:
        self.stream = stream
        self.proc = proc
        self.seen = b""

    async def read_until(self, pattern: bytes) -> None:
        while pattern not in self.seen:
            try:
                chunk = await self.stream.receive_some(4096)
            except OSError:  # EIO: the other side closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {pattern!r}: {self.seen.decode(errors='replace')}")
            self.seen += chunk

    async def type(self, text: bytes) -> None:
        await self.stream.send_all(text)


@asynccontextmanager
async def on_terminal(command: Sequence[str], *, cwd: Path, env: dict[str, str]) -> AsyncIterator[Terminal]:
    """Run `command` with a pty as its stdin/stdout/stderr; killed if still running at the end."""
    master, slave = os.openpty()
    try:
        proc = await trio.lowlevel.open_process(list(command), cwd=cwd, env=env, stdin=slave, stdout=slave,
                                                stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    terminal = Terminal(trio.lowlevel.FdStream(master), proc)
    try:
        yield terminal
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await terminal.stream.aclose()
