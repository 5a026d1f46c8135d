"""`ktulhu agent "<goal>"`: reach a goal with file and shell tools, one model-chosen action per step.

Exit codes: 0 final answer given (and accepted), 1 model/server failure, 2 usage or configuration
error, 3 step limit reached without a final answer, 4 a command was declined, 5 the final answer was
rejected (a placeholder, or not backed by the run; see answers.py), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Any

import trio

from ..engine.model import ModelLoadError
from ..preflight import PreflightFailed
from ..engine.prompt import PromptError
from ..engine.request import EngineError
from ..logs import configure_logging
from ..settings import load_settings
from .actions import ACTIONS, action_grammar
from .backends import local_backend, server_backend
from .loop import (
    EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, AgentConfig, Console, Outcome, ask_user, run_agent,
)
from .sandbox import SandboxError, Workspace
from .tools import ToolBox

__all__ = ["add_parser", "run"]

CONFIRM_TIMEOUT_S = 600.0  # a command or overwrite nobody confirms within this counts as declined
EXIT_NAMES = {0: "final answer given", 1: "failed", 2: "usage error", 3: "step limit reached",
              4: "command declined", 5: "final answer rejected", 130: "interrupted"}


class UsageError(Exception):
    pass


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "agent", help="reach a goal with file and shell tools in a working directory",
        description="Ask the model for one action at a time (list_dir, read_file, write_file, run_cmd, final) "
                    "and carry it out inside the working directory. Every command, and every write that would "
                    "replace an existing file, is shown and needs your confirmation unless --yes is given. "
                    "Exit codes: 0 final answer, 1 failure, 2 usage error, 3 step limit reached, 4 command "
                    "declined, 5 final answer rejected (a placeholder or not backed by the run), 130 interrupted.",
    )
    parser.add_argument("goal", nargs="+", help="what to achieve (words are joined with spaces)")
    parser.add_argument("--workdir", default=".", help="directory the tools are confined to (default: current)")
    parser.add_argument("--yes", "-y", action="store_true",
                        help="run commands and replace existing files without asking")
    parser.add_argument("--max-steps", type=int, default=20, help="actions before giving up (default 20)")
    parser.add_argument("--max-tokens", type=int, default=384, help="token budget of one action (default 384)")
    parser.add_argument("--cmd-timeout", type=float, default=30.0, help="seconds a command may run (default 30)")
    parser.add_argument("--step-timeout", type=float, default=300.0,
                        help="seconds one model step may take (default 300)")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (default 0.2)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: random)")
    parser.add_argument("--tools", default=",".join(ACTIONS),
                        help="comma-separated tools the model may use; final is always allowed "
                             f"(default: {','.join(ACTIONS)})")
    parser.add_argument("--server", metavar="URL",
                        help="use a running Ktulhu server's /v1/chat/completions instead of the local model")
    parser.add_argument("--api-key", metavar="KEY", help="API key for --server (sent as a Bearer token)")
    return parser


def _config(args: argparse.Namespace) -> tuple[AgentConfig, Workspace]:
    goal = " ".join(args.goal).strip()
    if not goal:
        raise UsageError("the goal is empty")
    if len(goal) > 4000:
        raise UsageError("the goal must be at most 4000 characters")
    if not 1 <= args.max_steps <= 1000:
        raise UsageError("--max-steps must be from 1 to 1000")
    if not 64 <= args.max_tokens <= 16384:
        raise UsageError("--max-tokens must be from 64 to 16384")
    for name, value, lo, hi in (("--cmd-timeout", args.cmd_timeout, 0.1, 86400.0),
                                ("--step-timeout", args.step_timeout, 1.0, 86400.0),
                                ("--temperature", args.temperature, 0.0, 5.0)):
        if not (math.isfinite(value) and lo <= value <= hi):
            raise UsageError(f"{name} must be from {lo:g} to {hi:g}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be from 0 to {2**32 - 1}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in ACTIONS]
    if unknown:
        raise UsageError(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(ACTIONS)}")
    tools = tuple(name for name in ACTIONS if name in tools or name == "final")
    if args.api_key is not None and not args.server:
        raise UsageError("--api-key needs --server")
    if args.server and not args.server.startswith(("http://", "https://")):
        raise UsageError("--server must be an http:// or https:// URL")
    try:
        workspace = Workspace.open(args.workdir)
    except SandboxError as error:
        raise UsageError(str(error)) from None
    config = AgentConfig(goal=goal, max_steps=args.max_steps, max_tokens=args.max_tokens,
                         temperature=args.temperature, seed=args.seed, tools=tools,
                         step_timeout=args.step_timeout)
    action_grammar(config.max_tokens, config.tools)  # every tool fits the budget (64+ tokens): cannot fail
    return config, workspace


def run(args: argparse.Namespace) -> int:
    try:
        config, workspace = _config(args)
    except UsageError as error:
        print(f"ktulhu agent: {error}", file=sys.stderr)
        return EXIT_USAGE
    settings = None if args.server else load_settings(slots=1)  # SettingsError: exit 2 in ktulhu.cli
    configure_logging("warning", settings.log_format if settings else "text")
    console = Console(sys.stdout)
    confirm = confirm_overwrite = None
    if not args.yes:
        confirm = functools.partial(_confirm, workspace)
        confirm_overwrite = functools.partial(_confirm_overwrite, workspace)
    tools = ToolBox(workspace, cmd_timeout=args.cmd_timeout, confirm=confirm, confirm_overwrite=confirm_overwrite)
    try:
        outcome = trio.run(_main, args, settings, config, tools, console)
    except BaseException as error:  # Ctrl-C arrives as KeyboardInterrupt, maybe inside a nursery's group
        if not _interrupted(error):
            raise
        console.say("\ninterrupted")
        outcome = Outcome(EXIT_INTERRUPTED, "interrupted", 0)
    console.say("")
    declined = f", {tools.overwrites_declined} overwrite(s) declined" if tools.overwrites_declined else ""
    console.say(f"summary: {outcome.reason}; {outcome.steps} step(s), {tools.commands_run} command(s) run, "
                f"{tools.files_written} file(s) written{declined}; exit {outcome.code} ({EXIT_NAMES[outcome.code]})")
    return outcome.code


def _interrupted(error: BaseException) -> bool:
    if isinstance(error, KeyboardInterrupt):
        return True
    return isinstance(error, BaseExceptionGroup) and error.subgroup(KeyboardInterrupt) is not None


async def _confirm(workspace: Workspace, cmd: str) -> bool:
    return await ask_user(f"  run this command in {workspace.root}? [y/N] ", sys.stdin, sys.stdout,
                          CONFIRM_TIMEOUT_S)


async def _confirm_overwrite(workspace: Workspace, name: str, size: int) -> bool:
    return await ask_user(f"  replace the existing file {name} ({size} bytes) in {workspace.root}? [y/N] ",
                          sys.stdin, sys.stdout, CONFIRM_TIMEOUT_S)


async def _main(args: argparse.Namespace, settings: Any, config: AgentConfig, tools: ToolBox,
                console: Console) -> Outcome:
    console.say(f"goal: {config.goal}")
    console.say(f"working directory: {tools.workspace.root}")
    asking = "without asking (--yes)" if tools.confirm is None else "asked before each"
    console.say(f"commands and overwrites: {asking}; "
                f"timeout {tools.cmd_timeout:g} s; tools: {', '.join(config.tools)}")
    try:
        if args.server:
            async with server_backend(args.server, args.api_key, timeout=args.step_timeout) as backend:
                console.say(f"model: {backend.description}\n")
                return await run_agent(config, backend, tools, console)
        async with local_backend(settings) as backend:
            console.say(f"model: {backend.description}\n")
            return await run_agent(config, backend, tools, console)
    except (PreflightFailed, ModelLoadError, EngineError, PromptError, OSError) as error:
        console.say(f"cannot start the model: {error}")
        return Outcome(EXIT_FAILED, f"model not available: {error}", 0)

