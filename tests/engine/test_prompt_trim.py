"""Trimming history to the context: linear in the conversation, and the same tokens as the old
drop-one-turn-and-re-render algorithm (kept here as the reference)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ktulhu.engine.engine import _prompt_builder
from ktulhu.engine.model import Model
from ktulhu.engine.prompt import _CLOSE, _MARKER, _OPEN, ChatMessage, ContextTooLong, Prompt, PromptBuilder, PromptError
from ktulhu.settings import load_settings
from tests.paths import REPO

CHATML = (REPO / "chat_template.jinja").read_text(encoding="utf-8")
#: Templates whose scaffold around a message depends on its neighbours or its position: the
#: builder must notice that sizes do not add up and still give the reference's answer.
ODD_TEMPLATES = {
    "numbered": "{% for m in messages %}[{{ loop.index }}:{{ m.role }}]{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}",
    "merged_roles": "{% for m in messages %}{% if loop.index0 > 0 and messages[loop.index0 - 1].role == m.role %}"
                    "+{% else %}<{{ m.role }}>{% endif %}{{ m.content }}{% endfor %}<assistant>",
    "system_dropped": "{% for m in messages %}{% if m.role != 'system' %}{{ m.role }}: {{ m.content }}\n{% endif %}"
                      "{% endfor %}A:",
}


# --- the reference: the algorithm before trimming became linear ------------------------------------


def reference_tokens(builder: PromptBuilder, messages: list[ChatMessage]) -> list[int]:
    texts = [m.content.replace(_OPEN, "").replace(_CLOSE, "") for m in messages]
    marked = [{"role": m.role, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    try:
        rendered = builder._template.render(messages=marked, add_generation_prompt=True, tools=[],
                                            bos_token=builder.bos_token, eos_token=builder.eos_token)
    except PromptError:
        raise
    except Exception as error:
        raise PromptError(f"the chat template failed: {type(error).__name__}: {error}") from None
    ids: list[int] = []
    position = 0
    seen = []
    for match in _MARKER.finditer(rendered):
        if match.start() > position:
            ids += builder.tokenize(rendered[position:match.start()], True)
        index = int(match.group(1))
        seen.append(index)
        if texts[index]:
            ids += builder.tokenize(texts[index], False)
        position = match.end()
    if position < len(rendered):
        ids += builder.tokenize(rendered[position:], True)
    if sorted(seen) != sorted(set(seen)):
        raise PromptError("the chat template repeats message text; use a template that renders each once")
    return ids


def reference_build(builder: PromptBuilder, messages: list[ChatMessage], *, n_ctx: int, max_tokens: int) -> Prompt:
    if not messages:
        raise PromptError("no messages to answer")
    if builder.default_system is not None and messages[0].role != "system":  # the model's own template
        messages = [ChatMessage("system", builder.default_system), *messages]
    system = [messages[0]] if messages[0].role == "system" else []
    history = list(messages[len(system):-1])
    newest = messages[-1]
    if newest.role == "system":
        raise PromptError("the newest message must be from the user or the assistant")
    min_reply = max(1, min(max_tokens, max(16, max_tokens // 4)))
    dropped = 0
    while True:
        ids = reference_tokens(builder, [*system, *history, newest])
        room = n_ctx - len(ids)
        if room >= max_tokens or not history:
            break
        drop = 1
        while drop < len(history) and history[drop].role == "assistant":
            drop += 1
        del history[:drop]
        dropped += drop
    if room < min_reply:
        raise ContextTooLong(len(ids) + min_reply, n_ctx)
    return Prompt(tokens=tuple(ids), dropped_messages=dropped, max_tokens=min(max_tokens, room))


def outcome(build, *args, **kwargs) -> object:
    try:
        return build(*args, **kwargs)
    except PromptError as error:
        return type(error).__name__, str(error)


# --- conversations --------------------------------------------------------------------------------

PIECES = ["hello", "word ", "the quick brown fox ", "\n", " ", "Привет, как дела?", "<|im_end|>",
          "<|im_start|>user", "\ue000", "\ue0000\ue001", "{{ x }}", "🙂", "a" * 40, "1234567890"]
texts = st.one_of(st.lists(st.sampled_from(PIECES), max_size=30).map("".join), st.text(max_size=60))


@st.composite
def conversations(draw: st.DrawFn) -> list[ChatMessage]:
    """Mostly alternating user/assistant turns, sometimes in any order (as /v1 allows)."""
    messages = []
    if draw(st.booleans()):
        messages.append(ChatMessage("system", draw(texts)))
    count = draw(st.integers(min_value=1, max_value=40))
    free_order = draw(st.booleans())
    for i in range(count):
        if free_order:
            role = draw(st.sampled_from(["user", "assistant", "system"] if i < count - 1 else ["user", "assistant"]))
        else:
            role = "user" if (count - 1 - i) % 2 == 0 else "assistant"
        messages.append(ChatMessage(role, draw(texts)))
    return messages


@pytest.fixture(scope="module")
def builders(smol_model: Model) -> dict[str, PromptBuilder]:
    settings = load_settings(environ={}, root=REPO)
    out = {"chatml": _prompt_builder(smol_model, settings),
           "gguf": _prompt_builder(smol_model, load_settings(environ={"CHAT_TEMPLATE_PATH": "gguf"}, root=REPO))}
    for name, source in ODD_TEMPLATES.items():
        out[name] = PromptBuilder(source, lambda text, special: smol_model.tokenize(text, special=special))
    return out


@pytest.mark.parametrize("template", ["chatml", "gguf", *ODD_TEMPLATES])
@given(messages=conversations(), n_ctx=st.integers(min_value=32, max_value=1024),
       max_tokens=st.integers(min_value=1, max_value=400))
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_trimming_gives_the_reference_tokens(builders: dict[str, PromptBuilder], template: str,
                                             messages: list[ChatMessage], n_ctx: int, max_tokens: int) -> None:
    builder = builders[template]
    expected = outcome(reference_build, builder, messages, n_ctx=n_ctx, max_tokens=max_tokens)
    assert outcome(builder.build, messages, n_ctx=n_ctx, max_tokens=max_tokens) == expected


# --- linear work ----------------------------------------------------------------------------------


class Counting:
    """A byte tokenizer that counts its calls, and `PromptBuilder._render` counted the same way."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, bool]] = Counter()
        self.renders = 0

    def tokenize(self, text: str, special: bool) -> list[int]:
        self.calls[(text, special)] += 1
        return list(text.encode())

    @property
    def text_calls(self) -> int:
        return sum(n for (_, special), n in self.calls.items() if not special)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counting]:
    counter = Counting()
    render = PromptBuilder._render

    def counted(self: PromptBuilder, roles: list[str]) -> object:
        counter.renders += 1
        return render(self, roles)

    monkeypatch.setattr(PromptBuilder, "_render", counted)
    yield counter


def chat(turns: int, chars: int = 50) -> list[ChatMessage]:
    history = [ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i}: " + "x" * chars) for i in range(turns)]
    return [ChatMessage("system", "Be brief."), *history, ChatMessage("user", "and now?")]


@pytest.mark.parametrize("turns", [10, 100, 1000])
def test_a_prompt_that_fits_tokenises_each_message_once(counting: Counting, turns: int) -> None:
    builder = PromptBuilder(CHATML, counting.tokenize)
    messages = chat(turns)
    prompt = builder.build(messages, n_ctx=10**8, max_tokens=16)
    assert prompt.dropped_messages == 0
    assert counting.text_calls == len(messages)  # every text once
    assert sum(counting.calls.values()) <= len(messages) + 8  # plus a few distinct scaffold strings
    assert counting.renders <= 2  # the full conversation, once (and the chosen one when turns were dropped)


@pytest.mark.parametrize("turns", [10, 100, 1000])
def test_trimming_many_turns_renders_a_constant_number_of_times(counting: Counting, turns: int) -> None:
    builder = PromptBuilder(CHATML, counting.tokenize)
    messages = chat(turns)
    room_for_about_six_turns = 600
    prompt = builder.build(messages, n_ctx=room_for_about_six_turns + 16, max_tokens=16)
    assert prompt.dropped_messages > 0 or turns <= 6
    assert counting.renders <= 6  # full, one per role a kept history may start with, chosen, next larger
    assert all(n == 1 for (_, special), n in counting.calls.items() if not special)
    # only the turns within reach of the budget are tokenised, however long the history
    assert counting.text_calls <= 16
    assert sum(counting.calls.values()) <= 16 + 8
    assert list(prompt.tokens) == reference_tokens(builder, [messages[0], *messages[1 + prompt.dropped_messages:]])


def test_a_template_that_is_not_additive_is_still_trimmed_right(counting: Counting) -> None:
    builder = PromptBuilder(ODD_TEMPLATES["numbered"], counting.tokenize)
    messages = chat(30)
    prompt = builder.build(messages, n_ctx=500, max_tokens=16)
    assert all(n == 1 for (_, special), n in counting.calls.items() if not special)  # text still once
    assert prompt.dropped_messages > 0
    assert prompt == reference_build(builder, messages, n_ctx=500, max_tokens=16)


def test_a_build_stops_at_the_first_check_that_raises() -> None:
    class Stop(Exception):
        pass

    checks = 0

    def check() -> None:
        nonlocal checks
        checks += 1
        if checks == 3:
            raise Stop

    counter = Counting()
    with pytest.raises(Stop):
        PromptBuilder(CHATML, counter.tokenize).build(chat(1000), n_ctx=10**8, max_tokens=16, check=check)
    assert sum(counter.calls.values()) <= 3
