"""Chat prompts: template rendering, safe tokenisation and the token budget.

The template's scaffold (role markers, BOS, end-of-turn) is tokenised with special-token parsing;
every message's text is tokenised without it, so a user who types `<|im_end|>` gets those
characters, not a control token. History is trimmed by tokens, oldest turns first, keeping the
system prompt and the newest message, so prompt + reply always fit the slot's context.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ATTACHMENTS_HEADER",
    "ChatMessage",
    "ContextTooLong",
    "Prompt",
    "PromptBuilder",
    "PromptError",
    "render_content",
]

ROLES = ("system", "user", "assistant")
ATTACHMENTS_HEADER = "[Attachments]\nUse the information below when it helps answer the user\u2019s message.\n"
# Private-use characters delimit message text in the rendered template; they are removed from text.
_OPEN, _CLOSE = "\ue000", "\ue001"
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


def render_content(body: str | None, notes: Sequence[str] = ()) -> str:
    """A message's text with its attachment notes, in the original's layout (original §4.3)."""
    body = (body or "").strip()
    if not notes:
        return body
    block = ATTACHMENTS_HEADER + "".join(f"\n- {note}\n" for note in notes)
    return (body + "\n\n\n\n" + block if body else block).strip()


@attrs.frozen
class Prompt:
    tokens: tuple[int, ...]
    #: Messages of the history left out to fit the budget (oldest first).
    dropped_messages: int
    max_tokens: int


Tokenize = Callable[[str, bool], list[int]]  # (text, parse_special) -> ids


@attrs.define
class PromptBuilder:
    """Renders a Jinja chat template and tokenises it safely for one model."""

    template_source: str
    tokenize: Tokenize
    bos_token: str = ""
    eos_token: str = ""
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

    def tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of `messages` rendered with the generation prompt."""
        texts = [m.content.replace(_OPEN, "").replace(_CLOSE, "") for m in messages]
        marked = [{"role": m.role, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
        try:
            rendered = self._template.render(
                messages=marked, add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token, tools=[],
            )
        except PromptError:
            raise
        except Exception as error:  # a template may fail in any way: report, never crash the caller
            raise PromptError(f"the chat template failed: {type(error).__name__}: {error}") from None
        ids: list[int] = []
        position = 0
        seen = []
        for match in _MARKER.finditer(rendered):
            if match.start() > position:
                ids += self.tokenize(rendered[position:match.start()], True)
            index = int(match.group(1))
            seen.append(index)
            if texts[index]:
                ids += self.tokenize(texts[index], False)
            position = match.end()
        if position < len(rendered):
            ids += self.tokenize(rendered[position:], True)
        if sorted(seen) != sorted(set(seen)):
            raise PromptError("the chat template repeats message text; use a template that renders each once")
        return ids

    def build(self, messages: Sequence[ChatMessage], *, n_ctx: int, max_tokens: int) -> Prompt:
        """Fit `messages` (optional system first, newest last) into `n_ctx` with room for the reply.

        Whole turns are dropped from the oldest until prompt + `max_tokens` fits. When the system
        prompt and the newest message alone leave less than `max_tokens`, the reply gets what is
        left, but never less than a quarter of `max_tokens` (then `ContextTooLong`).
        """
        if not messages:
            raise PromptError("no messages to answer")
        system = [messages[0]] if messages[0].role == "system" else []
        history = list(messages[len(system):-1])
        newest = messages[-1]
        if newest.role == "system":
            raise PromptError("the newest message must be from the user or the assistant")
        min_reply = max(1, min(max_tokens, max(16, max_tokens // 4)))
        dropped = 0
        while True:
            ids = self.tokens([*system, *history, newest])
            room = n_ctx - len(ids)
            if room >= max_tokens or not history:
                break
            drop = 1
            # drop a whole exchange: keep the history starting with a user turn
            while drop < len(history) and history[drop].role == "assistant":
                drop += 1
            del history[:drop]
            dropped += drop
        if room < min_reply:
            raise ContextTooLong(len(ids) + min_reply, n_ctx)
        return Prompt(tokens=tuple(ids), dropped_messages=dropped, max_tokens=min(max_tokens, room))
