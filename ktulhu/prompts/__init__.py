"""System prompts per language and the prompt plan that turns a routing result into one (original §5.6-5.7).

The wording lives in `<lang>.json` beside this module (`{"default": str, "prompts": {key: str}}`) for
en, es, pt and ru; any other language renders in English. `system_prompt(result, language)` is what
the WebSocket layer calls; `build_prompt_plan` and `render_prompt` are its two halves.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import attrs

from ..router.result import IntentRoutingResult
from ..router.routing import normalise_language

__all__ = [
    "LANGUAGES",
    "PROMPT_KEYS",
    "PromptPlan",
    "PromptSet",
    "build_prompt_plan",
    "prompt_set",
    "render_prompt",
    "system_prompt",
]

LANGUAGES = ("en", "es", "pt", "ru")
#: Every key each language file provides. Routing selects all but `task_short`, `culture_context`
#: and the `reasoning_*` variants, which are kept for parity with the original's files.
PROMPT_KEYS = (
    "chat_casual", "chat_narrative", "chat_technical_reflective", "task_short", "advice_practical",
    "opinion_reflective", "opinion_casual", "culture_context", "reasoning", "support_reflective",
    "reasoning_formal_logic", "reasoning_riddle", "reasoning_reflective_metaphor", "reasoning_regulated",
)

_TONE = {
    "Supportive": "Be supportive and encouraging.",
    "Formal": "Use precise, professional language.",
    "Neutral": "Maintain an even, balanced tone.",
    "Casual": "Keep the tone relaxed and friendly.",
}
_DEPTH = {
    "Deep": "Provide detailed reasoning and context.",
    "Medium": "Offer a moderate level of detail.",
    "Shallow": "Keep responses concise.",
}
_INITIATIVE = {
    "Proactive": "Offer proactive suggestions when appropriate.",
    "Suggestive": "Suggest next steps when it helps.",
    "Reactive": "Respond directly to the user input.",
}
_CONSTRAINTS = {"ExplainSteps": "Explain your reasoning step by step."}


@attrs.frozen
class PromptSet:
    """One language's prompts: `prompts[key]`, with `default` as the last resort."""

    language: str
    default: str
    prompts: dict[str, str]

    def get(self, key: str) -> str:
        """The prompt for `key`, else `chat_casual`, else `default`."""
        return self.prompts.get(key) or self.prompts.get("chat_casual") or self.default


@functools.cache
def prompt_set(language: str | None) -> PromptSet:
    """The prompts of a language hint (`"pt-BR"` -> pt); languages without a file get English."""
    lang = normalise_language(language)
    if lang not in LANGUAGES:
        lang = "en"
    data = json.loads(resources.files(__package__).joinpath(f"{lang}.json").read_text(encoding="utf-8"))
    return PromptSet(language=lang, default=data["default"], prompts=dict(data["prompts"]))


@attrs.frozen
class PromptPlan:
    """Which prompt to use and the style lines appended to it."""

    base: str
    tone: str
    depth: str
    initiative: str
    constraints: tuple[str, ...] = ()


def build_prompt_plan(result: IntentRoutingResult) -> PromptPlan:
    """§5.6: support wins; otherwise the prompt key with domain overrides, tone, depth and initiative."""
    if result.support_intent:
        return PromptPlan(base=result.prompt_key, tone="Supportive", depth="Shallow", initiative="Suggestive")
    S, D, E = result.speech_act.label, result.domain.label, result.expectation.label
    base = result.prompt_key
    if D == "technical" and E in ("INFO", "ADVICE", "ACTION"):
        base = "reasoning"
    elif D == "legal":
        base = "advice_practical"
    if E == "NONE" and S == "DIRECTING":
        tone = "Casual"
    elif S == "DIRECTING":
        tone = "Supportive"
    elif S == "ASKING":
        tone = "Neutral"
    else:
        tone = "Casual"
    depth = "Deep" if D == "technical" else "Medium" if E in ("ADVICE", "INFO") else "Shallow"
    initiative = {"DIRECTING": "Suggestive", "COLLABORATIVE": "Proactive"}.get(S, "Reactive")
    explain = D == "technical" or base == "reasoning" or result.final_intent_kind == "Reasoning"
    return PromptPlan(base=base, tone=tone, depth=depth, initiative=initiative,
                      constraints=("ExplainSteps",) if explain else ())


def render_prompt(plan: PromptPlan, language: str | None) -> str:
    """§5.7: the language's prompt for `plan.base`, then one English style line per plan element."""
    text = prompt_set(language).get(plan.base)
    lines = [_TONE[plan.tone], _DEPTH[plan.depth], _INITIATIVE[plan.initiative]]
    lines += [_CONSTRAINTS[c] for c in plan.constraints]
    return text + "".join("\n" + line for line in lines)


def system_prompt(result: IntentRoutingResult, language: str | None) -> str:
    """The rendered system prompt for a routed message; `language` is the client's raw hint."""
    return render_prompt(build_prompt_plan(result), language)
