"""The agent loop: ask the model for one action, run it, show the result, until an accepted `final` or the step limit.

The model sees the goal and the tool descriptions in the system prompt, then its own past actions
(assistant turns, in canonical JSON) and their results (user turns), all rendered with the chat
template; the oldest turns are dropped first when the history outgrows the context.

The prompt describes the actions abstractly, with no example values: a small model copies whatever
concrete action it is shown (it listed `.`, read `notes.txt` and wrote `hello.txt` whatever the goal
was). The only placeholder is `…`, which the grammar (printable ASCII) cannot produce.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TextIO

import attrs
import trio

from ..engine.prompt import ChatMessage
from .actions import ACTIONS, ActionError, action_grammar, parse_action
from .answers import RunRecord, judge_answer
from .backends import Backend, ModelError
from .tools import CommandDeclined, ToolBox, ToolResult

__all__ = [
    "EXIT_DECLINED", "EXIT_DONE", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_MAX_STEPS", "EXIT_REJECTED", "EXIT_USAGE",
    "AgentConfig", "Outcome", "run_agent", "system_prompt",
]

EXIT_DONE = 0  # the model gave a final answer that was accepted
EXIT_FAILED = 1  # the model or server failed, or produced no valid action
EXIT_USAGE = 2  # bad command line or configuration
EXIT_MAX_STEPS = 3  # the step limit was reached without a final answer
EXIT_DECLINED = 4  # the user declined a command (or gave no answer in time)
EXIT_REJECTED = 5  # the final answer was a placeholder or not backed by the run (see answers.py)
EXIT_INTERRUPTED = 130  # Ctrl-C

#: A second rejected final answer ends the run (the first is reported to the model, which may go on).
MAX_REJECTED_ANSWERS = 2

#: name -> (fields, what it does); no example values, see the module docstring.
_DESCRIPTIONS = {
    "list_dir": ("path", "lists the directory at path."),
    "read_file": ("path", "shows the text file at path."),
    "write_file": ("path, content", "writes content to the file at path (replacing an existing file "
                                    "needs the user's consent)."),
    "run_cmd": ("cmd", "runs the shell command cmd (stopped after {timeout} s)."),
    "final": ("answer", "ends the work; answer tells the user the result."),
}
FIRST_QUESTION = "What is your first action?"
NEXT_QUESTION = "What is your next action?"
REPEATED_HINT = "You already did exactly this. Choose a different action, or use final."
REJECTED_HINT = ("Your answer was not accepted: {reason}. Take the actions the goal needs, then answer with "
                 "what their results showed.")


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
    """The instructions: the goal, the reply format and each allowed action's fields, without example values."""
    lines = [
        "You are a command-line agent. You reach a goal by taking one action at a time in a working directory.",
        f"Goal: {goal}",
        "",
        'Reply with exactly one JSON object and nothing else: {"action": …, …}, the name of the action, then its '
        "fields as JSON strings, in the order given below. Take every value (…) from the goal or from the results "
        "you got.",
        "The actions:",
    ]
    for name in ACTIONS:
        if name in tools:
            fields, what = _DESCRIPTIONS[name]
            lines.append(f"- {name} (fields: {fields}): {what.format(timeout=f'{cmd_timeout:g}')}")
    lines += [
        "Paths are relative to the working directory and cannot leave it.",
        "Use only the actions the goal needs. After each action you get its result. When the goal is reached, "
        "use final.",
    ]
    return "\n".join(lines)


def instruction_text(tools: Sequence[str], cmd_timeout: float) -> str:
    """Everything the agent itself tells the model, without the goal: an answer made of it is a copy."""
    return "\n".join([system_prompt("", tools, cmd_timeout), FIRST_QUESTION, NEXT_QUESTION, REPEATED_HINT,
                      REJECTED_HINT.format(reason=""), "Result:"])


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
    instructions = instruction_text(config.tools, tools.cmd_timeout)
    history: list[ChatMessage] = []
    first = ChatMessage("user", f"Goal: {config.goal}\n{FIRST_QUESTION}")
    arguments: list[str] = []
    results: list[str] = []
    rejected: list[str] = []

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
            answer = action.args["answer"]
            verdict = judge_answer(answer, RunRecord(
                goal=config.goal, instructions=instructions, tools_allowed=any(t != "final" for t in config.tools),
                arguments=tuple(arguments), results=tuple(results)))
            if verdict.accepted:
                console.say("")
                console.say("final answer:")
                console.show_block(answer, limit=4000, prefix="  ")
                return Outcome(EXIT_DONE, "final answer", step, answer)
            rejected.append(verdict.reason)
            console.say(f"  rejected: {verdict.reason}")
            if len(rejected) >= MAX_REJECTED_ANSWERS:
                return Outcome(EXIT_REJECTED, f"final answer rejected ({verdict.reason})", step, answer)
            result = ToolResult(False, REJECTED_HINT.format(reason=verdict.reason), verdict.reason)
        else:
            try:
                result = await tools.execute(action)
            except CommandDeclined:
                console.say("  declined: the command was not run; stopping")
                return Outcome(EXIT_DECLINED, "a command was declined", step)
            arguments.extend(action.args.values())
            results.append(result.text)
            console.say(f"  {'ok' if result.ok else 'failed'}: {result.summary}")
            if result.text != result.summary and action.name in ("run_cmd", "read_file", "list_dir"):
                console.show_block(result.text)
        repeated = len(history) >= 2 and history[-2].content == action.to_json()
        history += [
            ChatMessage("assistant", action.to_json()),
            ChatMessage("user", _observation(result, config.observation_chars, repeated)),
        ]
    if rejected:
        return Outcome(EXIT_REJECTED, f"no accepted final answer after {config.max_steps} steps "
                                      f"(rejected: {rejected[-1]})", config.max_steps)
    return Outcome(EXIT_MAX_STEPS, f"no final answer after {config.max_steps} steps", config.max_steps)


def _observation(result: ToolResult, limit: int, repeated: bool) -> str:
    hint = REPEATED_HINT if repeated else ""
    return f"Result:\n{clip(result.text, limit)}\n\n{hint}\n{NEXT_QUESTION}".replace("\n\n\n", "\n\n")


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
