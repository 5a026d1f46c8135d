"""What the agent can do: list, read and write files inside its working directory, run commands.

File tools go through `Workspace` (see sandbox.py). A command runs under `/bin/sh -c` in the
working directory, in its own process group, with stdin closed, secrets removed from its
environment, output captured up to a bound and a timeout after which the whole group is ended
(SIGTERM, then SIGKILL). A command can do whatever the user can, so each one is shown and must be
confirmed unless the user chose `--yes`.

Replacing an existing file loses its content, so `write_file` asks too (unless `--yes`): a new file
is created with `O_EXCL`, and only when that finds a file there (however the path was spelled, through
a symlink or a hard link, or created a moment ago) is the user asked. A refusal is the tool's result;
the run goes on and the file is untouched. The file is written only if it is still the one the user
was asked about.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from .actions import Action
from .sandbox import SandboxError, Workspace

__all__ = ["CommandDeclined", "ConfirmOverwrite", "ToolBox", "ToolResult", "run_command"]

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
#: (the file as the workspace names it, its size in bytes) -> whether it may be replaced.
ConfirmOverwrite = Callable[[str, int], Awaitable[bool]]


@attrs.frozen
class _Existing:
    """The regular file a write would replace, as the user was asked about it."""

    path: Path
    name: str
    size: int
    #: Device, inode, size and change times: an inode number alone may be reused by a new file.
    identity: tuple[int, ...]


@attrs.define
class ToolBox:
    workspace: Workspace
    cmd_timeout: float = 30.0
    #: Asked before each command; None runs commands without asking (`--yes`).
    confirm: Confirm | None = None
    #: Asked before a write replaces an existing file; None replaces without asking (`--yes`).
    confirm_overwrite: ConfirmOverwrite | None = None
    commands_run: int = 0
    files_written: int = 0
    overwrites_declined: int = 0

    async def execute(self, action: Action) -> ToolResult:
        """Run one action's tool; sandbox refusals and I/O errors become failed results."""
        try:
            if action.name == "run_cmd":
                return await self.run_cmd(action.args["cmd"])
            if action.name == "write_file":
                return await self.write_file(action.args["path"], action.args["content"])
            tool = {"read_file": self.read_file, "list_dir": self.list_dir}[action.name]
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

    async def write_file(self, path: str, content: str) -> ToolResult:
        """Create `path`, or replace the existing file there once the user agrees (or `--yes`)."""
        data = content.encode("utf-8")
        if len(data) > WRITE_LIMIT:
            raise SandboxError(f"content is {len(data)} bytes; at most {WRITE_LIMIT} may be written")
        created = await trio.to_thread.run_sync(self._create, path, data)
        if isinstance(created, ToolResult):
            return created
        if self.confirm_overwrite is not None and not await self.confirm_overwrite(created.name, created.size):
            self.overwrites_declined += 1
            return ToolResult(False, f"not written: the user did not allow replacing the existing file {created.name}; "
                                     "it is unchanged. Write to a new path, or go on without it.",
                              f"declined: {created.name} was not replaced")
        return await trio.to_thread.run_sync(self._replace, path, data, created)

    def _create(self, path: str, data: bytes) -> ToolResult | _Existing:
        """Write a new file; or, when a file is already there, describe it (nothing is written)."""
        target = self.workspace.writable(path)
        name = self.workspace.relative(target)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(target, flags, 0o644)
        except FileExistsError:
            info = os.lstat(target)
            if not stat.S_ISREG(info.st_mode):  # e.g. a link or FIFO put there since `writable` looked
                raise SandboxError(f"{path!r} exists and is not a regular file") from None
            if os.path.normpath(path) != name:  # through a link or an absolute path: say which file it is
                name = f"{name} (named {path!r})"
            return _Existing(target, name, info.st_size, _identity(info))
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        self.files_written += 1
        return ToolResult(True, f"wrote {len(data)} bytes to new file {name}", f"wrote {len(data)} bytes to {name}")

    def _replace(self, path: str, data: bytes, existing: _Existing) -> ToolResult:
        """Replace `existing`, only if `path` still leads to that very file (the one the user agreed to)."""
        target = self.workspace.writable(path)
        changed = SandboxError(f"{path!r} changed while the user was asked; nothing was written")
        if target != existing.path:
            raise changed
        fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or _identity(info) != existing.identity:
                raise changed
            os.ftruncate(fd, 0)
            _write_all(fd, data)
        finally:
            os.close(fd)
        self.files_written += 1
        return ToolResult(True, f"replaced {existing.name}: wrote {len(data)} bytes (it had {existing.size})",
                          f"replaced {existing.name}: wrote {len(data)} bytes (it had {existing.size})")

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


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
