"""Commands: timeouts end the whole process group, output is bounded, secrets stay out of the environment."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from ktulhu.agent.actions import Action
from ktulhu.agent.sandbox import Workspace
from ktulhu.agent.tools import OUTPUT_LIMIT, CommandDeclined, ToolBox, run_command


def _alive(pid: int) -> bool:
    """Whether `pid` still runs, after giving a just-killed process a moment to die."""
    deadline = time.monotonic() + 2
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _running(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_hanging_command_is_stopped_by_its_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    outcome = await run_command("echo started; sleep 60", tmp_path, timeout=1.0)
    elapsed = time.monotonic() - started
    assert outcome.timed_out and outcome.exit_status is None
    assert "started" in outcome.output
    assert elapsed < 5, elapsed


async def test_timeout_ends_children_and_background_processes(tmp_path: Path) -> None:
    # the shell ignores SIGTERM and leaves children behind: the group still ends (SIGKILL after the grace)
    script = "trap '' TERM; sleep 60 & echo $! > bg.pid; sleep 60 & echo $! > fg.pid; wait"
    outcome = await run_command(script, tmp_path, timeout=1.0)
    assert outcome.timed_out
    for name in ("bg.pid", "fg.pid"):
        pid = int((tmp_path / name).read_text())
        assert not _alive(pid), name


async def test_background_leftovers_of_a_finished_command_are_ended(tmp_path: Path) -> None:
    started = time.monotonic()
    outcome = await run_command("sleep 60 > /dev/null 2>&1 & echo $! > bg.pid; echo done", tmp_path, timeout=20.0)
    assert not outcome.timed_out and outcome.exit_status == 0 and outcome.output == "done\n"
    assert time.monotonic() - started < 5
    assert not _alive(int((tmp_path / "bg.pid").read_text()))


async def test_output_is_bounded_and_stdin_is_closed(tmp_path: Path) -> None:
    outcome = await run_command("yes 0123456789 | head -c 1000000; cat; echo rc=$? >&2", tmp_path, timeout=20.0)
    assert outcome.exit_status == 0
    assert outcome.output_bytes > 1_000_000 and len(outcome.output) == OUTPUT_LIMIT
    tools = ToolBox(Workspace.open(tmp_path), confirm=None)
    result = await tools.execute(Action("run_cmd", {"cmd": "head -c 9000 /dev/zero | tr '\\0' a"}))
    assert result.ok and "[output truncated: 9000 bytes in all]" in result.text


async def test_commands_run_in_the_workdir_without_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", "s3cr3t-value")
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_x")
    monkeypatch.setenv("MY_API_KEY", "k")
    monkeypatch.setenv("HARMLESS", "visible")
    tools = ToolBox(Workspace.open(tmp_path), cmd_timeout=10, confirm=None)
    result = await tools.execute(Action("run_cmd", {"cmd": "pwd; env"}))
    assert result.ok
    assert str(tmp_path.resolve()) in result.text and "HARMLESS=visible" in result.text
    for leaked in ("s3cr3t-value", "sk_live_x", "MY_API_KEY"):
        assert leaked not in result.text
    failed = await tools.execute(Action("run_cmd", {"cmd": "exit 3"}))
    assert not failed.ok and "exit status 3" in failed.text


async def test_timeout_through_the_toolbox(tmp_path: Path) -> None:
    tools = ToolBox(Workspace.open(tmp_path), cmd_timeout=0.5, confirm=None)
    with trio.fail_after(5):
        result = await tools.execute(Action("run_cmd", {"cmd": "sleep 60"}))
    assert not result.ok and "timed out after 0.5 s" in result.text and tools.commands_run == 1


async def test_declined_commands_do_not_run(tmp_path: Path) -> None:
    asked = []

    async def no(cmd: str) -> bool:
        asked.append(cmd)
        return False

    tools = ToolBox(Workspace.open(tmp_path), confirm=no)
    with pytest.raises(CommandDeclined):
        await tools.execute(Action("run_cmd", {"cmd": "touch ran.txt"}))
    assert asked == ["touch ran.txt"] and not (tmp_path / "ran.txt").exists() and tools.commands_run == 0


async def test_cancelling_a_command_ends_its_group(tmp_path: Path) -> None:
    with trio.move_on_after(0.5):
        await run_command("sleep 60 & echo $! > bg.pid; wait", tmp_path, timeout=30)
    await trio.sleep(0.1)
    assert not _alive(int((tmp_path / "bg.pid").read_text()))
