"""The final-answer rule (ktulhu/agent/answers.py) and the loop's use of it: placeholders and answers that
nothing in the run backs are rejected (exit 5), honest answers are not. Hostile strings never break it."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.agent.actions import ACTIONS, Action
from ktulhu.agent.answers import PLACEHOLDERS, RunRecord, Verdict, file_names, judge_answer
from ktulhu.agent.backends import Completion
from ktulhu.agent.loop import (
    EXIT_DONE, EXIT_MAX_STEPS, EXIT_REJECTED, AgentConfig, Console, instruction_text, run_agent, system_prompt,
)
from ktulhu.agent.sandbox import Workspace
from ktulhu.agent.tools import ToolBox
from ktulhu.engine.prompt import ChatMessage

INSTRUCTIONS = instruction_text(tuple(ACTIONS), 30)
GOAL = "Create a file named fruit.txt that contains the word banana."
#: The prompt the review found copied verbatim (the examples of the old system prompt).
OLD_EXAMPLE_ANSWER = "what you did or found"


def record(goal: str = GOAL, arguments: Sequence[str] = (), results: Sequence[str] = (),
           tools_allowed: bool = True) -> RunRecord:
    return RunRecord(goal=goal, instructions=INSTRUCTIONS, tools_allowed=tools_allowed,
                     arguments=tuple(arguments), results=tuple(results))


WROTE = record(arguments=["fruit.txt", "banana"], results=["wrote 6 bytes to new file fruit.txt"])
READ = record(goal="Find out what notes.txt says and report it.", arguments=["notes.txt"],
              results=["content of notes.txt:\nThe password is swordfish.\n"])


@pytest.mark.parametrize("answer", [
    OLD_EXAMPLE_ANSWER, "What you did or found.", "  WHAT YOU DID OR FOUND!  ", "what you did or found: fruit.txt",
    "", "   ", "...", "\n\t", "«»", "Answer", "your answer", "**Final answer**", "<answer>", "[result]", "TODO",
    "lists the directory at path", "Use final.", "When the goal is reached, use final",
    "ends the work; answer tells the user the result.", "What is your next action?",
    "Take the actions the goal needs", "path", "content",
])
def test_placeholders_and_copied_instructions_are_rejected(answer: str) -> None:
    verdict = judge_answer(answer, WROTE)
    assert not verdict.accepted and verdict.reason, answer


@pytest.mark.parametrize(("answer", "run"), [
    ("I wrote banana to fruit.txt.", WROTE),
    ("Done.", WROTE),
    ("banana", WROTE),
    ("fruit.txt now contains banana", WROTE),
    ("notes.txt says: The password is swordfish.", READ),
    ("The password is swordfish", READ),
    ("It says the password is swordfish (see ./notes.txt).", READ),
    ("4", record(goal="What is 2+2?")),  # no tool needed: nothing to check against
    ("Paris", record(goal="What is the capital of France?")),
    ("e.g. Python 3.11, i.e. a recent one", record(goal="Which Python should I use?")),
    # the same words as a placeholder are content when the run showed them
    ("TODO", record(goal="What does todo.md say?", arguments=["todo.md"], results=["content of todo.md:\nTODO\n"])),
    ("the result", record(goal="Print the result", arguments=["echo the result"],
                          results=["exit status 0\noutput:\nthe result\n"])),
    # an answer about the workspace without tools is fine when no tool was allowed
    ("fruit.txt would hold banana", record(tools_allowed=False)),
])
def test_honest_answers_are_accepted(answer: str, run: RunRecord) -> None:
    assert judge_answer(answer, run) == Verdict(True)


def test_an_answer_without_any_action_is_rejected_when_the_goal_is_about_the_workspace() -> None:
    for goal in (GOAL, "List the files here.", "Run the tests", "Show what is in the src directory",
                 "Summarise README.md"):
        verdict = judge_answer("All done, everything is fine.", record(goal=goal))
        assert not verdict.accepted and "no action was taken" in verdict.reason, goal
    # a failed action is still an action: its honest report is accepted
    failed = record(goal="Summarise README.md", arguments=["README.md"],
                    results=["refused: 'README.md' does not exist"])
    assert judge_answer("README.md does not exist.", failed).accepted


def test_files_no_action_touched_or_showed_are_rejected() -> None:
    verdict = judge_answer("I wrote the word banana to fruit.txt and saved a copy in backup.txt.", WROTE)
    assert not verdict.accepted and "backup.txt" in verdict.reason and "fruit.txt" not in verdict.reason
    # the goal naming a file is not evidence that the run produced it (the model wrote hello.b instead)
    truncated = record(goal="Write hello to hello.txt", arguments=["hello.b", "hello"],
                       results=["wrote 5 bytes to hello.b"])
    assert not judge_answer("Wrote hello.txt", truncated).accepted
    assert judge_answer("Wrote hello.b", truncated).accepted
    # a file shown by a listing or a command's output counts
    listed = record(goal="List the files here.", arguments=["."], results=["entries of .:\ndata.csv (12 bytes)\nsub/"])
    assert judge_answer("There is data.csv and a directory sub.", listed).accepted
    assert judge_answer("There is /tmp/x/DATA.CSV.", listed).accepted  # paths and case do not matter


def test_file_names_need_a_known_extension() -> None:
    assert file_names("see notes.txt, ./src/main.py and archive.tar.gz.") == {"notes.txt", "main.py", "archive.tar.gz"}
    assert file_names("e.g. i.e. version 3.11 at 10.30 a.m. ... .txt x.") == set()


# --- hostile strings -----------------------------------------------------------------------------------

texts = st.text(max_size=300) | st.text(alphabet=st.sampled_from(list(" ./-_\\\"'`*\n\tabcxyz019.txt")), max_size=300)


@given(answer=texts, goal=texts, arguments=st.lists(texts, max_size=3), results=st.lists(texts, max_size=3),
       tools_allowed=st.booleans())
@hsettings(max_examples=400, deadline=1000)
def test_any_answer_gets_a_verdict(answer: str, goal: str, arguments: list[str], results: list[str],
                                   tools_allowed: bool) -> None:
    run = RunRecord(goal, INSTRUCTIONS, tools_allowed, tuple(arguments), tuple(results))
    verdict = judge_answer(answer, run)
    assert verdict == judge_answer(answer, run)  # deterministic
    assert verdict.accepted == (verdict.reason == "")


decoration = st.tuples(st.sampled_from(["", " ", "\n", "**", "\"", "'", "`", "<", "[", "(", "- ", "> "]),
                       st.sampled_from(["", " ", ".", "!", "...", "**", "\"", ">", "]", ")", ":", "\n"]))


@given(placeholder=st.sampled_from(sorted(PLACEHOLDERS)), ends=decoration, upper=st.booleans())
def test_a_decorated_placeholder_is_still_a_placeholder(placeholder: str, ends: tuple[str, str], upper: bool) -> None:
    text = placeholder.upper() if upper else placeholder.title()
    assert not judge_answer(f"{ends[0]}{text}{ends[1]}", WROTE).accepted


@given(prefix=st.text(max_size=60), suffix=st.text(max_size=60))
def test_the_old_example_answer_is_rejected_inside_any_text(prefix: str, suffix: str) -> None:
    answer = f"{prefix} {OLD_EXAMPLE_ANSWER.upper()} {suffix}"
    assert not judge_answer(answer, WROTE).accepted


@given(result=st.lists(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12),
                       min_size=1, max_size=30),
       cut=st.tuples(st.integers(0, 30), st.integers(1, 30)))
def test_quoting_a_tool_result_is_always_accepted(result: list[str], cut: tuple[int, int]) -> None:
    """An answer made of whole words of what a tool showed is a report of the run, whatever those words are."""
    start = min(cut[0], len(result) - 1)
    answer = " ".join(result[start:start + cut[1]])
    run = record(arguments=["notes.txt"], results=[" ".join(result)])
    if any(c.isalnum() for c in answer):
        assert judge_answer(answer, run).accepted, answer


@given(stem=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=12),
       extension=st.sampled_from(["txt", "py", "json", "md", "csv"]), filler=st.text(max_size=40))
def test_an_unseen_file_name_is_always_rejected(stem: str, extension: str, filler: str) -> None:
    name = f"zz{stem}.{extension}"
    run = record(arguments=["fruit.txt", "banana"], results=["wrote 6 bytes to new file fruit.txt"])
    assert not judge_answer(f"{filler} wrote {name} {filler}", run).accepted


# --- the loop: a rejected answer is told to the model, a second one ends the run with exit 5 -----------

class Scripted:
    """A backend that replies with the given actions in turn and records what it was sent."""

    description = "scripted"

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies = list(replies)
        self.sent: list[list[ChatMessage]] = []

    async def complete(self, messages: Sequence[ChatMessage], **_: object) -> Completion:
        self.sent.append(list(messages))
        return Completion(self.replies.pop(0), "eos")


def final(answer: str) -> str:
    return Action("final", {"answer": answer}).to_json()


async def _run(tmp_path: Path, replies: Sequence[str], max_steps: int = 5,
               goal: str = GOAL) -> tuple[int, str, Scripted, str | None]:
    backend = Scripted(replies)
    out = io.StringIO()
    outcome = await run_agent(AgentConfig(goal=goal, max_steps=max_steps), backend,
                              ToolBox(Workspace.open(tmp_path)), Console(out))
    return outcome.code, out.getvalue(), backend, outcome.answer


async def test_the_reviewed_run_no_longer_counts_as_success(tmp_path: Path) -> None:
    """The review's transcript: list ., read notes.txt, write hello.txt, then the example answer: exit 5, not 0."""
    replies = [Action("list_dir", {"path": "."}).to_json(), Action("read_file", {"path": "notes.txt"}).to_json(),
               Action("write_file", {"path": "hello.txt", "content": "Hello\n"}).to_json(),
               final(OLD_EXAMPLE_ANSWER), final(OLD_EXAMPLE_ANSWER)]
    code, out, backend, _ = await _run(tmp_path, replies)
    assert code == EXIT_REJECTED, out
    assert out.count("rejected: the answer is a placeholder") == 2 and "final answer:" not in out
    # the first rejection was told to the model as the result of its step
    told = backend.sent[-1][-1].content
    assert backend.sent[-1][-1].role == "user" and "Your answer was not accepted" in told


async def test_a_rejected_answer_can_be_followed_by_a_good_one(tmp_path: Path) -> None:
    write = Action("write_file", {"path": "fruit.txt", "content": "banana"}).to_json()
    code, out, _, answer = await _run(tmp_path, [final("Answer"), write, final("fruit.txt holds banana.")])
    assert code == EXIT_DONE and answer == "fruit.txt holds banana." and "rejected:" in out, out
    assert (tmp_path / "fruit.txt").read_text() == "banana"


async def test_the_step_limit_after_a_rejected_answer_is_exit_5(tmp_path: Path) -> None:
    code, out, _, _ = await _run(tmp_path, [final(" . ")], max_steps=1)
    assert code == EXIT_REJECTED and "the answer is empty" in out
    code, _, _, _ = await _run(tmp_path, [Action("list_dir", {"path": "."}).to_json()], max_steps=1)
    assert code == EXIT_MAX_STEPS


async def test_an_answer_at_once_to_a_workspace_goal_is_rejected(tmp_path: Path) -> None:
    code, out, _, _ = await _run(tmp_path, [final("I created fruit.txt with banana."), final("Done")])
    assert code == EXIT_REJECTED and "no action was taken" in out


def test_the_prompt_has_no_example_values() -> None:
    """No concrete action for a small model to copy: the only placeholder (…) is outside the grammar's ASCII."""
    prompt = system_prompt(GOAL, tuple(ACTIONS), 30)
    for copied in ("notes.txt", "hello.txt", "Hello", "ls -l", OLD_EXAMPLE_ANSWER, '"path": "'):
        assert copied not in prompt
    assert "…" in prompt and not "…".isascii()
    assert prompt.count(GOAL) == 1
