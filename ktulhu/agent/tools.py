"""What the agent can do: list, read and write files inside its working directory, run commands.

File tools go through `Workspace` (see sandbox.py). A command runs under `/bin/sh -c` in the
working directory, in its own process group, with stdin closed, secrets removed from its
environment, output captured up to a bound and a timeout after which the whole group is ended
(SIGTERM, then SIGKILL). A command can do whatever the user can, so each one is shown and must be
confirmed unless the user chose `--yes`.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from .actions import Action
from .sandbox import SandboxError, Workspace

__all__ = ["CommandDeclined", "ToolBox", "ToolResult", "run_command"]

READ_LIMIT = 16 * 1024  # bytes of a file returned by read_file
WRITE_LIMIT = 1024 * 1024  # bytes write_file accepts
OUTPUT_LIMIT = 4000  # bytes of a command's output kept
LIST_LIMIT = 200  # entries list_dir shows
TERM_GRACE_S = 2.0  # between SIGTERM and SIGKILL of a timed-out command's process group
DRAIN_S = 1.0  # how long output is still read after the shell exited (background children)
_SECRET_MARKS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "API_KEY", "APIKEY", "PRIVATE_KEY", "CREDENTIAL")


class CommandDeclined(Exception):
    """The user said no to a command; the agent stops."""


@attrs.frozen
class ToolResult:
    ok: bool
    #: What the model is told (bounded).
    text: str
    #: One line for the terminal.
    summary: str


@attrs.frozen
class CommandOutcome:
    exit_status: int | None
    timed_out: bool
    output: str
    output_bytes: int
    seconds: float


def _command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not any(mark in k.upper() for mark in _SECRET_MARKS) and not k.startswith(("STRIPE_", "KTULHU_"))}
    env.update({"PAGER": "cat", "GIT_PAGER": "cat", "TERM": "dumb", "GIT_TERMINAL_PROMPT": "0"})
    return env


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run_command(
    cmd: str, cwd: os.PathLike[str] | str, *, timeout: float, limit: int = OUTPUT_LIMIT,
) -> CommandOutcome:
    """Run `cmd` with `/bin/sh -c` in `cwd`; nothing it started outlives this call."""
    started = time.monotonic()
    kept = bytearray()
    total = 0
    drained = trio.Event()

    async def collect(stream: trio.abc.ReceiveStream) -> None:
        nonlocal total
        while chunk := await stream.receive_some(65536):
            total += len(chunk)
            if len(kept) < limit:
                kept.extend(chunk[: limit - len(kept)])
        drained.set()

    proc = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", cmd], cwd=os.fspath(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, env=_command_env(),
    )
    try:
        with trio.move_on_after(timeout) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, proc.stdout)
                await proc.wait()
                with trio.move_on_after(DRAIN_S):  # a background child may hold the output open
                    await drained.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:  # timed out or interrupted: end the whole group
                _signal_group(proc.pid, signal.SIGTERM)
                with trio.move_on_after(TERM_GRACE_S):
                    await proc.wait()
            _signal_group(proc.pid, signal.SIGKILL)  # and anything it left running in the background
            await proc.wait()
            await proc.stdout.aclose()
    return CommandOutcome(
        exit_status=None if deadline.cancelled_caught else proc.returncode,
        timed_out=deadline.cancelled_caught,
        output=kept.decode("utf-8", "replace"),
        output_bytes=total,
        seconds=time.monotonic() - started,
    )


Confirm = Callable[[str], Awaitable[bool]]


@attrs.define
class ToolBox:
    workspace: Workspace
    cmd_timeout: float = 30.0
    #: Asked before each command; None runs commands without asking (`--yes`).
    confirm: Confirm | None = None
    commands_run: int = 0
    files_written: int = 0

    async def execute(self, action: Action) -> ToolResult:
        """Run one action's tool; sandbox refusals and I/O errors become failed results."""
        try:
            if action.name == "run_cmd":
                return await self.run_cmd(action.args["cmd"])
            tool = {"read_file": self.read_file, "write_file": self.write_file, "list_dir": self.list_dir}[action.name]
            return await trio.to_thread.run_sync(tool, *action.args.values())
        except SandboxError as error:
            return ToolResult(False, f"refused: {error}", f"refused: {error}")
        except OSError as error:
            message = f"{error.strerror or error}"
            return ToolResult(False, f"error: {message}", f"error: {message}")

    async def run_cmd(self, cmd: str) -> ToolResult:
        if self.confirm is not None and not await self.confirm(cmd):
            raise CommandDeclined(cmd)
        outcome = await run_command(cmd, self.workspace.root, timeout=self.cmd_timeout)
        self.commands_run += 1
        if outcome.timed_out:
            head = f"timed out after {self.cmd_timeout:g} s; the command and its children were stopped"
        else:
            head = f"exit status {outcome.exit_status}"
        output = outcome.output
        if outcome.output_bytes > len(output.encode("utf-8", "replace")):
            output += f"\n[output truncated: {outcome.output_bytes} bytes in all]"
        text = f"{head}\noutput:\n{output}" if output else f"{head}\n(no output)"
        ok = not outcome.timed_out and outcome.exit_status == 0
        return ToolResult(ok, text, f"{head} ({outcome.seconds:.2f} s, {outcome.output_bytes} bytes of output)")

    def read_file(self, path: str) -> ToolResult:
        target = self.workspace.existing(path)
        name = self.workspace.relative(target)
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise SandboxError(f"{path!r} is a directory; use list_dir")
            if not stat.S_ISREG(info.st_mode):
                raise SandboxError(f"{path!r} is not a regular file")
            data = bytearray()
            while len(data) <= READ_LIMIT and (chunk := os.read(fd, READ_LIMIT + 1 - len(data))):
                data.extend(chunk)
        finally:
            os.close(fd)
        truncated = len(data) > READ_LIMIT
        data = bytes(data[:READ_LIMIT])
        text = _text_or_none(data, truncated)
        if text is None:
            return ToolResult(True, f"{name} is a binary file of {info.st_size} bytes; its content is not shown",
                              f"binary file, {info.st_size} bytes")
        note = f"\n[truncated: first {len(data)} of {info.st_size} bytes shown]" if truncated else ""
        return ToolResult(True, f"content of {name}:\n{text}{note}",
                          f"read {name}: {info.st_size} bytes" + (" (truncated)" if truncated else ""))

    def write_file(self, path: str, content: str) -> ToolResult:
        data = content.encode("utf-8")
        if len(data) > WRITE_LIMIT:
            raise SandboxError(f"content is {len(data)} bytes; at most {WRITE_LIMIT} may be written")
        target = self.workspace.writable(path)
        name = self.workspace.relative(target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(target, flags, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SandboxError(f"{path!r} is not a regular file")
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.files_written += 1
        return ToolResult(True, f"wrote {len(data)} bytes to {name}", f"wrote {len(data)} bytes to {name}")

    def list_dir(self, path: str) -> ToolResult:
        target = self.workspace.existing(path)
        name = self.workspace.relative(target)
        if not target.is_dir():
            raise SandboxError(f"{path!r} is not a directory; use read_file")
        lines = []
        with os.scandir(target) as entries:
            ordered = sorted(entries, key=lambda e: e.name)
        for entry in ordered[:LIST_LIMIT]:
            if entry.is_symlink():
                lines.append(f"{entry.name}@ (symlink)")
            elif entry.is_dir(follow_symlinks=False):
                lines.append(f"{entry.name}/")
            else:
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    size = 0
                lines.append(f"{entry.name} ({size} bytes)")
        if len(ordered) > LIST_LIMIT:
            lines.append(f"[{len(ordered) - LIST_LIMIT} more entries not shown]")
        listing = "\n".join(lines) if lines else "(empty)"
        return ToolResult(True, f"entries of {name}:\n{listing}", f"{name}: {len(ordered)} entries")


def _text_or_none(data: bytes, truncated: bool) -> str | None:
    """`data` as text, or None for binary content (NUL bytes or not UTF-8)."""
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if truncated and error.start >= len(data) - 3:  # cut inside the last character
            try:
                return data[: error.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None
