"""Prompt files in four languages, the prompt plan (§5.6) and rendering (§5.7)."""

from __future__ import annotations

import pytest

from ktulhu.prompts import LANGUAGES, PROMPT_KEYS, PromptPlan, build_prompt_plan, prompt_set, render_prompt, system_prompt
from ktulhu.router.labels import Head, HeadSet
from ktulhu.router.result import default_result
from ktulhu.router.routing import route_intent

REFUSAL = {
    "en": "You cannot create documents, files or images",
    "es": "No puedes crear documentos, archivos ni imágenes",
    "pt": "Você não pode criar documentos, arquivos nem imagens",
    "ru": "Ты не можешь создавать документы, файлы или изображения",
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_key_in_every_language(language):
    prompts = prompt_set(language)
    assert prompts.language == language
    assert set(prompts.prompts) == set(PROMPT_KEYS)
    for key in PROMPT_KEYS:
        text = prompts.prompts[key]
        assert text.strip() and REFUSAL[language] in text, key
    assert REFUSAL[language] in prompts.default


def test_languages_differ():
    texts = {lang: prompt_set(lang).get("chat_casual") for lang in LANGUAGES}
    assert len(set(texts.values())) == 4


@pytest.mark.parametrize(("hint", "want"), [("pt-BR", "pt"), ("ES", "es"), ("ru_RU", "ru"), ("de", "en"),
                                            (None, "en"), ("", "en"), ("xx-yy", "en")])
def test_unknown_language_falls_back_to_english(hint, want):
    assert prompt_set(hint).language == want


def test_unknown_key_falls_back_to_chat_casual():
    assert prompt_set("es").get("no_such_key") == prompt_set("es").get("chat_casual")


def _result(speech, domain, expectation):
    hs = HeadSet(Head(speech, 0.9), Head(domain, 0.9), Head(expectation, 0.9), None, Head("NO_SUPPORT", 0.9))
    return route_intent("x", "en", lambda _: hs)


def test_worked_example_technical_question():
    plan = build_prompt_plan(_result("ASKING", "technical", "INFO"))
    assert plan == PromptPlan("reasoning", "Neutral", "Deep", "Reactive", ("ExplainSteps",))
    text = render_prompt(plan, "en")
    assert text == prompt_set("en").get("reasoning") + (
        "\nMaintain an even, balanced tone.\nProvide detailed reasoning and context."
        "\nRespond directly to the user input.\nExplain your reasoning step by step.")


def test_worked_example_default():
    plan = build_prompt_plan(default_result("en"))
    assert plan == PromptPlan("chat_casual", "Casual", "Shallow", "Reactive", ())


def test_style_lines_stay_english():
    text = system_prompt(_result("DIRECTING", "legal", "INFO"), "ru")
    assert text.startswith(prompt_set("ru").get("advice_practical"))
    assert text.endswith("\nBe supportive and encouraging.\nOffer a moderate level of detail.\nSuggest next steps when it helps.")


@pytest.mark.parametrize(("speech", "expectation", "tone"), [
    ("DIRECTING", "NONE", "Casual"), ("DIRECTING", "INFO", "Supportive"), ("ASKING", "NONE", "Neutral"),
    ("SOCIAL", "INFO", "Casual"), ("SHARING", "NONE", "Casual"),
])
def test_tone(speech, expectation, tone):
    assert build_prompt_plan(_result(speech, "general", expectation)).tone == tone


@pytest.mark.parametrize(("domain", "expectation", "depth"), [
    ("technical", "NONE", "Deep"), ("general", "ADVICE", "Medium"), ("general", "INFO", "Medium"),
    ("personal", "NONE", "Shallow"), ("social", "ACTION", "Shallow"),
])
def test_depth(domain, expectation, depth):
    assert build_prompt_plan(_result("SHARING", domain, expectation)).depth == depth
