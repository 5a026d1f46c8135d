"""The GBNF grammar sampler on the real model: it constrains output, refuses bad grammars up front,
and a grammar that allows nothing fails its own request without harming the engine."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.agent.actions import ACTIONS, Action, action_grammar, field_limits, parse_action
from ktulhu.engine.engine import Engine
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.request import EngineError
from ktulhu.engine.sampling import GRAMMAR_MAX_CHARS, SamplingParams, check_grammar

YES_NO = 'root ::= "yes" | "no"'
ASK = [ChatMessage("system", "You answer questions."), ChatMessage("user", "Is the sky green? Answer yes or no.")]


async def test_grammar_constrains_the_text(engine: Engine) -> None:
    for seed in (1, 2, 3):
        params = SamplingParams(max_tokens=8, temperature=1.5, top_k=0, top_p=1.0, seed=seed, grammar=YES_NO)
        gen = await engine.chat(ASK, params)
        with gen:
            text = await gen.text()
        assert text in ("yes", "no")
        assert gen.finished.reason == "eos"  # the grammar ends, then only end-of-turn is allowed


async def test_without_grammar_the_same_request_is_free_text(engine: Engine) -> None:
    gen = await engine.chat(ASK, SamplingParams(max_tokens=8, temperature=0.0))
    with gen:
        text = await gen.text()
    assert text not in ("yes", "no")  # so the test above shows the grammar, not the model's habit


async def test_grammar_with_repetition_bounds(engine: Engine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, grammar='root ::= "n=" [0-9]{3}')
    gen = await engine.chat(ASK, params)
    with gen:
        text = await gen.text()
    assert text.startswith("n=") and len(text) == 5 and text[2:].isdigit()


@pytest.mark.parametrize("grammar", [
    "",
    "   ",
    'rooot ::= "x"',  # no root rule
    "root ::= root \"a\"",  # left recursion
    'root ::= "unterminated',
    "root ::= undefined-rule",
    "root ::= <|im_end|>",  # token references need a vocabulary
    'root ::= "a"{0,99999999}',
    'root ::= "x"\x00',
    "root ::= " + "\"a\" " * (GRAMMAR_MAX_CHARS // 4),
    "root ::= \"\ud800\"",
])
def test_invalid_grammar_is_a_clear_value_error(grammar: str) -> None:
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(grammar=grammar)


def test_non_string_grammar_is_refused() -> None:
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(grammar=42)  # type: ignore[arg-type]


@given(st.text(max_size=80))
@hsettings(max_examples=150, deadline=None)
def test_arbitrary_text_as_grammar_never_crashes(text: str) -> None:
    try:
        check_grammar(text)
    except ValueError as error:
        assert "grammar" in str(error)


async def test_grammar_that_allows_nothing_fails_only_its_request(engine: Engine) -> None:
    # valid GBNF, but a NUL byte is never a token: llama.cpp would abort the process if asked to accept one
    stuck = SamplingParams(max_tokens=8, temperature=0.7, seed=3, grammar='root ::= "\\x00"')
    gen = await engine.chat(ASK, stuck)
    with gen, pytest.raises(EngineError, match="grammar allows no further text"):
        await gen.text()
    greedy_stuck = SamplingParams(max_tokens=8, temperature=0.0, grammar='root ::= "a" "\\x00"')
    gen = await engine.chat(ASK, greedy_stuck)
    with gen, pytest.raises(EngineError, match="grammar"):
        await gen.text()
    gen = await engine.chat(ASK, SamplingParams(max_tokens=8, temperature=0.0, grammar=YES_NO))
    with gen:
        assert await gen.text() in ("yes", "no")


@given(st.integers(min_value=64, max_value=4096))
@hsettings(max_examples=40, deadline=None)
def test_action_grammar_is_valid_for_every_budget(max_tokens: int) -> None:
    check_grammar(action_grammar(max_tokens))
    for name in ACTIONS:
        limits = field_limits(name, max_tokens)
        assert limits is not None
        longest = Action(name, {field: "\\" * limit for field, limit in limits.items()}).to_json()
        assert len(longest.encode()) < max_tokens  # the worst case fits: a token is at least one byte


@given(st.sampled_from(list(ACTIONS)), st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126)
                                                        | st.sampled_from("\n\t"), min_size=1, max_size=40),
                                                min_size=2, max_size=2))
def test_actions_round_trip(name: str, values: list[str]) -> None:
    fields = [field for field, _ in ACTIONS[name]]
    action = Action(name, dict(zip(fields, values)))
    assert parse_action(action.to_json()) == action
    assert parse_action(action.to_json()).args == action.args


@pytest.mark.parametrize("text", [
    "", "[]", "null", '{"action": "rm_rf", "path": "/"}', '{"action": "run_cmd"}',
    '{"action": "run_cmd", "cmd": ""}', '{"action": "run_cmd", "cmd": 5}',
    '{"action": "run_cmd", "cmd": "ls", "extra": "x"}', '{"action": "final", "answer": "a"} trailing',
])
def test_parse_action_refuses_malformed_output(text: str) -> None:
    with pytest.raises(ValueError):
        parse_action(text)


def test_parse_action_honours_the_tool_set() -> None:
    with pytest.raises(ValueError, match="unknown action"):
        parse_action('{"action": "run_cmd", "cmd": "ls"}', tools=("read_file", "final"))
    assert "run-cmd" not in action_grammar(128, ("read_file", "final"))


async def test_every_step_parses_under_the_action_grammar(engine: Engine) -> None:
    from ktulhu.agent.loop import system_prompt

    goals = ["List the files here.", "Write hello to hello.txt", "Run the tests", "What is 2+2?"]
    for index, goal in enumerate(goals):
        messages = [ChatMessage("system", system_prompt(goal, tuple(ACTIONS), 30)),
                    ChatMessage("user", f"Goal: {goal}\nWhat is your first action?")]
        prompt = await engine.build_prompt(messages, 96)
        params = SamplingParams(max_tokens=prompt.max_tokens, temperature=1.0, seed=index,
                                grammar=action_grammar(prompt.max_tokens))
        gen = engine.generate(prompt.tokens, params)
        with gen:
            text = await gen.text()
        action = parse_action(text)
        assert json.loads(text)["action"] == action.name
