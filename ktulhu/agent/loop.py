"""The agent loop: ask the model for one action, run it, show the result, until `final` or the step limit.

The model sees the goal and the tool descriptions in the system prompt, then its own past actions
(assistant turns, in canonical JSON) and their results (user turns), all rendered with the chat
template; the oldest turns are dropped first when the history outgrows the context.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TextIO

import attrs
import trio

from ..engine.prompt import ChatMessage
from .actions import ACTIONS, ActionError, action_grammar, parse_action
from .backends import Backend, ModelError
from .tools import CommandDeclined, ToolBox, ToolResult

__all__ = [
    "EXIT_DECLINED", "EXIT_DONE", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_MAX_STEPS", "EXIT_USAGE",
    "AgentConfig", "Outcome", "run_agent", "system_prompt",
]

EXIT_DONE = 0  # the model gave its final answer
EXIT_FAILED = 1  # the model or server failed, or produced no valid action
EXIT_USAGE = 2  # bad command line or configuration
EXIT_MAX_STEPS = 3  # the step limit was reached without a final answer
EXIT_DECLINED = 4  # the user declined a command (or gave no answer in time)
EXIT_INTERRUPTED = 130  # Ctrl-C

_EXAMPLES = {
    "list_dir": ('{"action": "list_dir", "path": "."}', "lists a directory."),
    "read_file": ('{"action": "read_file", "path": "notes.txt"}', "shows a text file."),
    "write_file": ('{"action": "write_file", "path": "hello.txt", "content": "Hello\\n"}',
                   "creates or replaces a file."),
    "run_cmd": ('{"action": "run_cmd", "cmd": "ls -l"}', "runs a shell command (stopped after {timeout} s)."),
    "final": ('{"action": "final", "answer": "what you did or found"}', "ends the work with your answer."),
}


@attrs.frozen
class AgentConfig:
    goal: str
    max_steps: int = 20
    max_tokens: int = 384
    temperature: float = 0.2
    seed: int | None = None
    tools: tuple[str, ...] = tuple(ACTIONS)
    #: Characters of a tool result shown to the model (the terminal shows the same text).
    observation_chars: int = 3000
    #: Seconds one model step may take (a stuck engine or server ends the run).
    step_timeout: float = 300.0


@attrs.frozen
class Outcome:
    code: int
    reason: str
    steps: int
    answer: str | None = None


def system_prompt(goal: str, tools: Sequence[str], cmd_timeout: float) -> str:
    lines = [
        "You are a command-line agent. You reach a goal by taking one action at a time in a working directory.",
        f"Goal: {goal}",
        "",
        "Reply with exactly one JSON object and nothing else. The actions:",
    ]
    for name in ACTIONS:
        if name in tools:
            example, what = _EXAMPLES[name]
            lines.append(f"{example} {what.format(timeout=f'{cmd_timeout:g}')}")
    lines += [
        "Paths are relative to the working directory and cannot leave it.",
        "After each action you get its result. When the goal is reached, use final.",
    ]
    return "\n".join(lines)


def clip(text: str, limit: int) -> str:
    """`text` within `limit` characters: its head and tail around a note."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - head - tail} characters left out ...]\n{text[-tail:]}"


@attrs.define
class Console:
    """The terminal side: each step, what ran, its result, the summary."""

    out: TextIO

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def show_block(self, text: str, limit: int = 1200, prefix: str = "    | ") -> None:
        for line in clip(text, limit).splitlines() or [""]:
            self.say(prefix + line)


async def run_agent(config: AgentConfig, backend: Backend, tools: ToolBox, console: Console) -> Outcome:
    """Run the loop; returns how it ended (never raises for model, tool or user outcomes)."""
    system = system_prompt(config.goal, config.tools, tools.cmd_timeout)
    history: list[ChatMessage] = []
    first = ChatMessage("user", f"Goal: {config.goal}\nWhat is your first action?")

    def grammar_for(max_tokens: int) -> str:
        return action_grammar(max_tokens, config.tools)

    for step in range(1, config.max_steps + 1):
        messages = [ChatMessage("system", system), first, *history]
        started = time.monotonic()
        completion = None
        try:
            with trio.move_on_after(config.step_timeout):
                completion = await backend.complete(messages, max_tokens=config.max_tokens, grammar_for=grammar_for,
                                                    temperature=config.temperature, seed=config.seed)
        except ModelError as error:
            console.say(f"step {step}: the model failed: {error}")
            return Outcome(EXIT_FAILED, f"model error: {error}", step - 1)
        if completion is None:
            console.say(f"step {step}: the model gave no answer within {config.step_timeout:g} s")
            return Outcome(EXIT_FAILED, "model step timed out", step - 1)
        elapsed = time.monotonic() - started
        try:
            action = parse_action(completion.text, config.tools)
        except ActionError as error:
            console.say(f"step {step}: the model's output is not a valid action ({error}; "
                        f"finish reason {completion.finish_reason}):")
            console.show_block(completion.text)
            return Outcome(EXIT_FAILED, f"invalid action: {error}", step - 1)
        tokens = f", {completion.generated_tokens} tokens" if completion.generated_tokens is not None else ""
        console.say(f"step {step}/{config.max_steps}: {action.name} ({elapsed:.1f} s{tokens})")
        for field, value in action.args.items():
            if "\n" in value or len(value) > 100:
                console.say(f"  {field}:")
                console.show_block(value, prefix="    > ")
            else:
                console.say(f"  {field}: {value}")
        if action.name == "final":
            console.say("")
            console.say("final answer:")
            console.show_block(action.args["answer"], limit=4000, prefix="  ")
            return Outcome(EXIT_DONE, "final answer", step, action.args["answer"])
        try:
            result = await tools.execute(action)
        except CommandDeclined:
            console.say("  declined: the command was not run; stopping")
            return Outcome(EXIT_DECLINED, "a command was declined", step)
        console.say(f"  {'ok' if result.ok else 'failed'}: {result.summary}")
        if result.text != result.summary and action.name in ("run_cmd", "read_file", "list_dir"):
            console.show_block(result.text)
        repeated = len(history) >= 2 and history[-2].content == action.to_json()
        history += [
            ChatMessage("assistant", action.to_json()),
            ChatMessage("user", _observation(result, config.observation_chars, repeated)),
        ]
    return Outcome(EXIT_MAX_STEPS, f"no final answer after {config.max_steps} steps", config.max_steps)


def _observation(result: ToolResult, limit: int, repeated: bool) -> str:
    hint = "You already did exactly this. Choose a different action, or use final." if repeated else ""
    return f"Result:\n{clip(result.text, limit)}\n\n{hint}\nWhat is your next action?".replace("\n\n\n", "\n\n")


async def ask_user(question: str, stdin: TextIO, out: TextIO, timeout: float) -> bool:
    """Ask `question` on the terminal; True only for an answer of y or yes (EOF or timeout: no)."""
    print(question, end="", file=out, flush=True)
    with trio.move_on_after(timeout):
        line = await trio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
        answer = line.strip().lower()
        if not line:
            print("(no answer: end of input)", file=out, flush=True)
        return answer in ("y", "yes")
    print(f"\n(no answer within {timeout:g} s)", file=out, flush=True)
    return False
