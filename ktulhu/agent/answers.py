"""Whether a final answer reports the run or is a placeholder: deterministic rules, no model involved.

A small model often ends with text it copied from its instructions ("what you did or found"), an empty
answer, or a claim about files that nothing in the run touched. Such an answer is not a success, so it
is rejected (the model is told why and may try again; see loop.py). The rules, checked in order, are:

1. **empty**: the answer has no letter or digit;
2. **placeholder**: its words (letters and digits, case-folded) are a known placeholder ("answer",
   "your answer", "result", "todo", ...), or contain a template phrase ("what you did or found",
   "lorem ipsum"), or are as a whole (two words or more) a contiguous run of the instruction text (the
   system prompt without the goal, and the agent's own boilerplate); in each case unless the same words
   also occur contiguously in the goal, an action's argument or a tool result (then they are content,
   not a copy);
3. **nothing done**: no tool was called, although tools were allowed and the goal names a file (a
   word with a known file extension, like `notes.txt`) or a workspace word (file, folder, directory,
   command, shell, script, run, execute, ...): an answer about the workspace without looking at it;
4. **unknown file**: the answer names a file (a word with a known file extension) that no action's
   argument and no tool result of the run contains (nor the goal, when no tool was allowed): a claimed
   file nothing produced or showed.

Everything else is accepted: the rules only reject what is certainly not a report of this run, and
never judge whether an honest answer is right.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["PLACEHOLDERS", "RunRecord", "Verdict", "file_names", "judge_answer", "words"]

#: Answers that are placeholders when they are the whole answer (compared as words).
PLACEHOLDERS = frozenset({
    "answer", "the answer", "your answer", "my answer", "final", "final answer", "the final answer",
    "your final answer", "result", "the result", "results", "output", "the output", "todo", "tbd",
    "placeholder", "xxx", "what you did", "what you found", "what you did or found", "answer here",
    "your answer here", "action", "path", "cmd", "content",
})
#: Phrases that mark a templated answer wherever they occur.
TEMPLATES = ("what you did or found", "lorem ipsum", "your answer here", "insert answer")
#: Extensions that make a word a file name for rules 3 and 4 (a fixed list: "e.g." or "3.11" never count).
EXTENSIONS = frozenset("""
    txt md rst csv tsv json jsonl yaml yml toml ini cfg conf env log xml html htm css js mjs ts jsx tsx
    py pyi ipynb rb go rs c h cc cpp hpp java kt swift sh bash zsh fish ps1 bat sql db sqlite lock
    pdf png jpg jpeg gif svg webp zip tar gz tgz bz2 xz whl jar exe dll so dat bin out tmp bak gguf onnx
    lua php pl r scala dart vue mk cmake gradle dockerfile diff patch
""".split())
#: Goal words that say the work is in the working directory (rule 3), besides file names.
WORKSPACE_WORDS = frozenset("""
    file files folder folders directory directories dir dirs workdir command commands shell script scripts
    run execute
""".split())

_WORD = re.compile(r"[^\W_]+")
_TOKEN_SEPARATOR = re.compile(r"[^\w.-]+")


@attrs.frozen
class RunRecord:
    """What the run did, as the rules see it."""

    goal: str
    #: Text the model was given that is not evidence: the system prompt without the goal, and boilerplate.
    instructions: str
    #: Whether any tool besides final was allowed.
    tools_allowed: bool
    #: The argument values of every tool action taken (not final), in order.
    arguments: tuple[str, ...] = ()
    #: The text of every tool result, in order.
    results: tuple[str, ...] = ()


@attrs.frozen
class Verdict:
    accepted: bool
    #: Why it was rejected (shown to the user and the model); empty when accepted.
    reason: str = ""


def words(text: str) -> list[str]:
    """The case-folded runs of letters and digits of `text`."""
    return _WORD.findall(text.casefold())


def _joined(items: Sequence[str]) -> str:
    return " " + " ".join(items) + " "


def file_names(text: str) -> set[str]:
    """The case-folded words of `text` that are file names (a known extension after a dot), without paths."""
    names = set()
    for token in _TOKEN_SEPARATOR.split(text.casefold()):
        token = token.strip(".-")
        stem, dot, extension = token.rpartition(".")
        if dot and stem.strip(".") and extension in EXTENSIONS:
            names.add(token)
    return names


def _tokens(texts: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for text in texts:
        found.update(token.strip(".-") for token in _TOKEN_SEPARATOR.split(text.casefold()))
    return found


def judge_answer(answer: str, run: RunRecord) -> Verdict:
    """Accept `answer`, or reject it with the first rule (module docstring) it breaks."""
    said = words(answer)
    if not said:
        return Verdict(False, "the answer is empty")
    evidence = [run.goal, *run.arguments, *run.results]
    phrase = _joined(said)
    in_evidence = any(phrase in _joined(words(text)) for text in evidence)
    if not in_evidence:
        if " ".join(said) in PLACEHOLDERS:
            return Verdict(False, "the answer is a placeholder, not a result")
        for template in TEMPLATES:
            if _joined(template.split()) in phrase:
                return Verdict(False, f"the answer is a template ({template!r}), not a result")
        if len(said) >= 2 and phrase in _joined(words(run.instructions)):
            return Verdict(False, "the answer repeats the instructions, not a result")
    if run.tools_allowed and not run.arguments:
        goal_words = set(words(run.goal))
        if file_names(run.goal) or goal_words & WORKSPACE_WORDS:
            return Verdict(False, "no action was taken, but the goal is about the working directory")
    seen = _tokens([*run.arguments, *run.results, *(() if run.tools_allowed else (run.goal,))])
    unknown = sorted(name for name in file_names(answer) if name not in seen)
    if unknown:
        return Verdict(False, f"the answer names {', '.join(unknown[:3])}, which no action of this run touched "
                              "or showed")
    return Verdict(True)
