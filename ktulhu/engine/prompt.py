"""Chat prompts: template rendering, safe tokenisation and the token budget.

The template's scaffold (role markers, BOS, end-of-turn) is tokenised with special-token parsing;
every message's text is tokenised without it, so a user who types `<|im_end|>` gets those
characters, not a control token. History is trimmed by tokens, oldest turns first, keeping the
system prompt and the newest message, so prompt + reply always fit the slot's context.

Building grows with the request (a /v1 body may hold megabytes of text), so it never runs on the
trio thread: `Engine.build_prompt` runs it on a worker thread. Trimming is linear in the history:
each piece is tokenised once and candidate sizes are sums of token counts, not re-renders.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatMessage",
    "ContextTooLong",
    "DEFAULT_SYSTEM",
    "Prompt",
    "PromptBuilder",
    "PromptError",
]

ROLES = ("system", "user", "assistant")
# Private-use characters delimit message text in the rendered template; they are removed from text.
_OPEN, _CLOSE = "\ue000", "\ue001"
#: The system prompt of a conversation that brings none (the same as chat_template.jinja's).
DEFAULT_SYSTEM = ("You are Ktulhu, a friendly and helpful assistant. Answer clearly and concisely, in the "
                  "language the user writes in.")
_MARKER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class PromptError(ValueError):
    """The prompt cannot be built (bad template, bad messages); the message says why."""


class ContextTooLong(PromptError):
    """Even the system prompt and the newest message alone do not fit the context with the reply."""

    def __init__(self, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(
            f"the message needs {needed} tokens with the system prompt and the reply, but a conversation "
            f"slot holds {available}; shorten the message (or raise LLAMA_CLI_CTX)"
        )


@attrs.frozen
class ChatMessage:
    role: str = attrs.field(validator=attrs.validators.in_(ROLES))
    content: str = attrs.field(validator=attrs.validators.instance_of(str))


@attrs.frozen
class Prompt:
    tokens: tuple[int, ...]
    #: Messages of the history left out to fit the budget (oldest first).
    dropped_messages: int
    max_tokens: int


Tokenize = Callable[[str, bool], list[int]]  # (text, parse_special) -> ids
#: Called between steps of a build; raises to abandon it (the engine passes trio's check_cancelled).
Check = Callable[[], None]


def _no_check() -> None:
    return None


@attrs.frozen
class _Rendered:
    """A template rendered with markers in place of message text: the scaffold before each marker,
    the scaffold after the last one, and which message each marker stands for."""

    scaffolds: tuple[str, ...]
    tail: str
    order: tuple[int, ...]


@attrs.define
class _Tokens:
    """The token ids of one build, each piece tokenised once: message text by message index (without
    special tokens), scaffold by its string (with them). `check` runs before every tokenizer call."""

    tokenize: Tokenize
    texts: Sequence[str]
    check: Check
    _text: dict[int, list[int]] = attrs.field(factory=dict)
    _scaffold: dict[str, list[int]] = attrs.field(factory=dict)

    def text(self, index: int) -> list[int]:
        ids = self._text.get(index)
        if ids is None:
            text = self.texts[index]
            if text:
                self.check()
                ids = self.tokenize(text, False)
            else:
                ids = []
            self._text[index] = ids
        return ids

    def scaffold(self, text: str) -> list[int]:
        ids = self._scaffold.get(text)
        if ids is None:
            if text:
                self.check()
                ids = self.tokenize(text, True)
            else:
                ids = []
            self._scaffold[text] = ids
        return ids

    def ids(self, rendered: _Rendered, indices: Sequence[int]) -> list[int]:
        """The ids of `rendered`, whose marker k stands for message `indices[k]` of this build."""
        ids: list[int] = []
        for scaffold, marker in zip(rendered.scaffolds, rendered.order):
            ids += self.scaffold(scaffold)
            ids += self.text(indices[marker])
        ids += self.scaffold(rendered.tail)
        return ids


@attrs.define
class PromptBuilder:
    """Renders a Jinja chat template and tokenises it safely for one model.

    Thread-safe (no state changes after construction), so builds may run on several worker threads.
    """

    template_source: str
    tokenize: Tokenize
    bos_token: str = ""
    eos_token: str = ""
    #: Put in front of a conversation without a system message (a model's own template would
    #: otherwise add its vendor's default, or none).
    default_system: str | None = None
    _template: object = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)

        def raise_exception(message: str) -> None:
            raise PromptError(f"the chat template refused the messages: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(self.template_source)
        except TemplateError as error:
            raise PromptError(f"the chat template does not compile: {error}") from None

    @classmethod
    def from_file(cls, path: Path, tokenize: Tokenize, *, bos_token: str = "", eos_token: str = "") -> "PromptBuilder":
        return cls(path.read_text(encoding="utf-8"), tokenize, bos_token, eos_token)

    def _render(self, roles: Sequence[str]) -> _Rendered:
        """Render the template for messages of `roles` with a marker in place of each text.

        The cost grows with the number of messages, not with their text."""
        marked = [{"role": role, "content": f"{_OPEN}{i}{_CLOSE}"} for i, role in enumerate(roles)]
        try:
            rendered = self._template.render(
                messages=marked, add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token, tools=[],
            )
        except PromptError:
            raise
        except Exception as error:  # a template may fail in any way: report, never crash the caller
            raise PromptError(f"the chat template failed: {type(error).__name__}: {error}") from None
        scaffolds: list[str] = []
        order: list[int] = []
        position = 0
        for match in _MARKER.finditer(rendered):
            scaffolds.append(rendered[position:match.start()])
            order.append(int(match.group(1)))
            position = match.end()
        if len(set(order)) != len(order):
            raise PromptError("the chat template repeats message text; use a template that renders each once")
        return _Rendered(tuple(scaffolds), rendered[position:], tuple(order))

    def _with_system(self, messages: Sequence[ChatMessage]) -> Sequence[ChatMessage]:
        if self.default_system is None or not messages or messages[0].role == "system":
            return messages
        return [ChatMessage("system", self.default_system), *messages]

    def tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of `messages` rendered with the generation prompt."""
        messages = self._with_system(messages)
        work = _Tokens(self.tokenize, _texts(messages), _no_check)
        return work.ids(self._render([m.role for m in messages]), range(len(messages)))

    def build(self, messages: Sequence[ChatMessage], *, n_ctx: int, max_tokens: int,
              check: Check = _no_check) -> Prompt:
        """Fit `messages` (optional system first, newest last) into `n_ctx` with room for the reply.

        Whole turns are dropped from the oldest until prompt + `max_tokens` fits. When the system
        prompt and the newest message alone leave less than `max_tokens`, the reply gets what is
        left, but never less than a quarter of `max_tokens` (then `ContextTooLong`).

        Linear in the conversation: the template is rendered once with markers in place of text
        (its cost grows with the number of messages only), and the size of every candidate prompt
        is the sum of per-message and per-scaffold token counts, each piece tokenised at most once,
        newest first, and only as far back as the budget reaches. The chosen prompt is rendered
        and checked against that sum (and the next larger candidate too), so the result is the one
        that dropping turns one by one and re-rendering would give. `check` runs between steps and
        raises to abandon the build (a caller that stopped waiting).
        """
        if not messages:
            raise PromptError("no messages to answer")
        messages = self._with_system(messages)
        n_system = 1 if messages[0].role == "system" else 0
        newest = len(messages) - 1
        if messages[newest].role == "system":
            raise PromptError("the newest message must be from the user or the assistant")
        min_reply = max(1, min(max_tokens, max(16, max_tokens // 4)))
        roles = [m.role for m in messages]
        work = _Tokens(self.tokenize, _texts(messages), check)
        candidates = _candidates(roles, n_system)
        check()
        full = self._render(roles)
        chosen = None  # also when the template reorders or leaves out messages: sizes cannot be summed
        if full.order == tuple(range(len(messages))):
            try:
                chosen = self._fit(full, work, roles, candidates, n_system, n_ctx, max_tokens)
            except PromptError:  # the template refused a shorter conversation that dropping one by
                pass             # one may never reach: let the step-by-step path decide
        if chosen is None:
            chosen = self._fit_by_rendering(work, roles, candidates, n_system, n_ctx, max_tokens)
        start, ids = chosen
        room = n_ctx - len(ids)
        if room < min_reply:
            raise ContextTooLong(len(ids) + min_reply, n_ctx)
        return Prompt(tokens=tuple(ids), dropped_messages=start - n_system, max_tokens=min(max_tokens, room))

    def _fit(self, full: _Rendered, work: _Tokens, roles: Sequence[str], candidates: Sequence[int],
             n_system: int, n_ctx: int, max_tokens: int) -> tuple[int, list[int]] | None:
        """The first candidate (index of the oldest history message kept) that fits, and its ids,
        found by arithmetic on token counts; None when the template's scaffold is not additive
        (a rendered candidate differs from its computed size).

        The size of [system?, messages[start:]] is: the system message with its scaffold, the
        scaffold that leads into messages[start] (it depends on that message's role: without a
        system message, a template may add its own default in front of a user turn but not in front
        of a system turn), then per message j > start its text and the scaffold in front of it
        (both from the full render), then the generation prompt."""
        newest = len(roles) - 1
        seg = [len(work.scaffold(s)) for s in full.scaffolds]
        fixed = (seg[0] + len(work.text(0)) if n_system else 0) + len(work.scaffold(full.tail))
        leads: dict[str, int] = {}
        for start in reversed(candidates):  # per role, from the newest candidate: the shortest render
            if roles[start] not in leads:
                rendered = full if start == candidates[0] else self._render_from(roles, n_system, start)
                if rendered.order != tuple(range(n_system + len(roles) - start)):
                    return None
                leads[roles[start]] = len(work.scaffold(rendered.scaffolds[n_system]))
        min_lead = min(leads.values())

        # Walking from the newest candidate back, `suffix` is sum(text[j] + seg[j]) for j > start.
        suffix = 0
        summed_to = newest + 1

        def core(start: int) -> int:
            nonlocal suffix, summed_to
            while summed_to > start + 1:
                summed_to -= 1
                suffix += len(work.text(summed_to)) + seg[summed_to]
            return len(work.text(start)) + suffix

        budget = n_ctx - max_tokens
        sizes: dict[int, int] = {}
        fitting: int | None = None
        # Older candidates are never smaller except for their lead, so once even the smallest lead
        # cannot fit, no older candidate can: only the history back to there is tokenised.
        for pick in range(len(candidates) - 1, -1, -1):
            start = candidates[pick]
            work.check()
            at_least = fixed + core(start)
            sizes[start] = at_least + leads[roles[start]]
            if sizes[start] <= budget:
                fitting = pick
            if at_least + min_lead > budget:
                break
        pick = len(candidates) - 1 if fitting is None else fitting
        start = candidates[pick]
        ids = work.ids(full, range(len(roles))) if pick == 0 else self._ids_from(work, roles, n_system, start)
        if len(ids) != sizes[start]:
            return None
        if pick > 0:  # the next larger candidate must really be too large
            larger = candidates[pick - 1]
            if larger not in sizes:
                sizes[larger] = fixed + core(larger) + leads[roles[larger]]
            if len(self._ids_from(work, roles, n_system, larger)) != sizes[larger]:
                return None
        return start, ids

    def _fit_by_rendering(self, work: _Tokens, roles: Sequence[str], candidates: Sequence[int],
                          n_system: int, n_ctx: int, max_tokens: int) -> tuple[int, list[int]]:
        """Drop turns one candidate at a time, rendering each: for templates whose scaffold around
        a message depends on other messages. Text is still tokenised once; rendering repeats."""
        for position, start in enumerate(candidates):
            work.check()
            ids = self._ids_from(work, roles, n_system, start)
            if n_ctx - len(ids) >= max_tokens or position == len(candidates) - 1:
                return start, ids
        raise AssertionError("unreachable: the last candidate is always returned")

    def _render_from(self, roles: Sequence[str], n_system: int, start: int) -> _Rendered:
        """The render of the prompt keeping the system message (if any) and messages[start:]."""
        return self._render([*roles[:n_system], *roles[start:]])

    def _ids_from(self, work: _Tokens, roles: Sequence[str], n_system: int, start: int) -> list[int]:
        """Ids of the prompt keeping the system message (if any) and messages[start:]."""
        work.check()
        return work.ids(self._render_from(roles, n_system, start), [*range(n_system), *range(start, len(roles))])


def _texts(messages: Sequence[ChatMessage]) -> list[str]:
    """Message text with the marker characters removed (a user cannot forge a marker)."""
    return [m.content.replace(_OPEN, "").replace(_CLOSE, "") for m in messages]


def _candidates(roles: Sequence[str], n_system: int) -> list[int]:
    """Where the kept history may start, oldest first: the first history message, then each later
    message that is not the assistant's (whole exchanges are dropped, so a kept history starts
    with a user turn), then the newest alone (all history dropped)."""
    newest = len(roles) - 1
    return [n_system, *(i for i in range(n_system + 1, newest) if roles[i] != "assistant"),
            *([newest] if newest > n_system else [])]
