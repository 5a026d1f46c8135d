"""`ktulhu agent` as a user runs it: a real process on the real model, answering its questions on stdin
or a terminal. Commands are observed through stand-in programs placed first on PATH, which record
every invocation, so "did not run" is checked, not assumed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from ktulhu.cli import main
from tests.paths import REPO

from .terminal import on_terminal

# A 135M model copies the prompt's example command; cover it and the other usual first words.
STAND_INS = ("ls", "touch", "echo", "cat", "pwd", "mkdir", "python", "python3", "make", "pytest", "git", "rm",
             "cd", "find", "grep", "sh", "bash", "npm", "cargo", "head", "tail", "wc", "date", "whoami")


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """(workdir, record file, environment): every stand-in command appends its name and args to the record."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    record = tmp_path / "record.txt"
    for name in STAND_INS:
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\n')
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
    env.update({"PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", "LLAMA_CLI_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    return work, record, env


def agent_cmd(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ktulhu", "agent", "--workdir", str(work), "--max-tokens", "96",
            "--temperature", "0", "--seed", "7", *extra]


GOAL = "Run a shell command that shows the files here."


async def test_answering_no_stops_before_the_command_runs(recorder: tuple[Path, Path, dict[str, str]]) -> None:
    work, record, env = recorder
    result = await trio.run_process(agent_cmd(work, "--tools", "run_cmd", "--max-steps", "2", GOAL), cwd=REPO,
                                    env=env, stdin=b"n\n", capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 4, out + result.stderr.decode()
    assert "step 1/2: run_cmd" in out and "[y/N]" in out and "declined: the command was not run" in out
    assert "0 command(s) run" in out and "exit 4 (command declined)" in out
    assert not record.exists()  # nothing was executed
    # control: the same run with --yes executes the same command, so the record above would have shown it
    result = await trio.run_process(agent_cmd(work, "--tools", "run_cmd", "--max-steps", "1", "--yes", GOAL),
                                    cwd=REPO, env=env, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 3, out
    assert "step 1/1: run_cmd" in out and "[y/N]" not in out and "1 command(s) run" in out
    assert record.exists()


async def test_end_of_input_counts_as_no(recorder: tuple[Path, Path, dict[str, str]]) -> None:
    work, record, env = recorder
    result = await trio.run_process(agent_cmd(work, "--tools", "run_cmd", "--max-steps", "1", GOAL), cwd=REPO,
                                    env=env, stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 4 and "no answer: end of input" in result.stdout.decode()
    assert not record.exists()


async def test_the_question_waits_on_a_terminal(recorder: tuple[Path, Path, dict[str, str]]) -> None:
    work, record, env = recorder
    async with on_terminal(agent_cmd(work, "--tools", "run_cmd", "--max-steps", "2", GOAL), cwd=REPO,
                           env=env) as terminal:
        with trio.fail_after(180):
            await terminal.read_until(b"[y/N]")
            # A real second, on purpose: "it waits for the answer" is a negative about another process,
            # which signals nothing while it waits; one that went on would have run the command by now.
            await trio.sleep(1.0)
            assert terminal.proc.returncode is None and terminal.proc.poll() is None
            assert not record.exists()
            await terminal.type(b"n\n")
            await terminal.read_until(b"summary:")
            assert await terminal.proc.wait() == 4
    assert not record.exists()
    assert b"declined" in terminal.seen


async def test_ctrl_c_while_asking_exits_130(recorder: tuple[Path, Path, dict[str, str]]) -> None:
    work, record, env = recorder
    proc = await trio.lowlevel.open_process(
        agent_cmd(work, "--tools", "run_cmd", "--max-steps", "2", GOAL), cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    seen = b""
    try:
        with trio.fail_after(180):
            while b"[y/N]" not in seen:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, seen
                seen += chunk
            proc.send_signal(signal.SIGINT)
            while chunk := await proc.stdout.receive_some(4096):
                seen += chunk
            assert await proc.wait() == 130
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stdin.aclose()
        await proc.stdout.aclose()
    assert b"interrupted" in seen and b"exit 130 (interrupted)" in seen
    assert not record.exists()


async def test_a_real_run_parses_every_step_and_ends(recorder: tuple[Path, Path, dict[str, str]]) -> None:
    work, record, env = recorder
    (work / "notes.txt").write_text("The password is swordfish.\n")
    started = time.monotonic()
    result = await trio.run_process(
        agent_cmd(work, "--yes", "--max-steps", "4", "--cmd-timeout", "5", "--temperature", "0.8",
                  "Find out what notes.txt says and report it."),
        cwd=REPO, env=env, capture_stdout=True, capture_stderr=True, check=False,
    )
    out = result.stdout.decode()
    assert result.returncode in (0, 3), out + result.stderr.decode()
    steps = re.findall(r"^step (\d+)/4: (\w+) ", out, re.MULTILINE)
    assert steps and [int(n) for n, _ in steps] == list(range(1, len(steps) + 1))
    assert "not a valid action" not in out
    if result.returncode == 3:
        assert len(steps) == 4 and "exit 3 (step limit reached)" in out
    else:
        assert steps[-1][1] == "final" and "final answer:" in out
    assert time.monotonic() - started < 240


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/nonexistent/dir", "goal"], "working directory"),
    (["--max-steps", "0", "goal"], "--max-steps"),
    (["--max-tokens", "10", "goal"], "--max-tokens"),
    (["--cmd-timeout", "nan", "goal"], "--cmd-timeout"),
    (["--tools", "read_file,format_disk", "goal"], "unknown tool"),
    (["--api-key", "k", "goal"], "--api-key needs --server"),
    (["--server", "ftp://x", "goal"], "--server"),
    (["--seed", "-1", "goal"], "--seed"),
    (["   "], "goal is empty"),
])
def test_usage_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_goal_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["agent"])
    assert exit_info.value.code == 2


def test_unreachable_server_fails_with_exit_1(tmp_path: Path, free_port: int,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["agent", "--workdir", str(tmp_path), "--server", f"http://127.0.0.1:{free_port}", "--yes", "goal"])
    out = capsys.readouterr().out
    assert code == 1 and "cannot reach" in out and "exit 1 (failed)" in out
