"""`route_intent`: from a message and a language hint to an `IntentRoutingResult` (original §5.4).

The pipeline is split so that the model call can be batched and run off the event loop:

- `prepare(text, hint)` normalises the language, handles empty input (no model call) and picks the
  first utterance, the only part the model sees;
- the caller classifies `Prepared.utterance` into a `HeadSet`;
- `decide(prepared, heads)` applies the rules: re-interpretation, support escalation, preference
  hint, the first-match routing table, reasoning profile and the technical override.

`route_intent(text, hint, classify)` chains the three for synchronous callers (CLI, eval, tests).
Everything here is pure and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from .labels import SUPPORT_INTENT_THRESHOLD, Head, HeadSet
from .lexicon import mentions_preference
from .result import IntentRoutingResult, default_result

__all__ = [
    "DOMAIN_PROMPTS",
    "Prepared",
    "decide",
    "normalise_language",
    "prepare",
    "route_intent",
    "split_utterances",
]

#: Prompt stub of each domain when no rule picks a more specific one.
DOMAIN_PROMPTS = {
    "technical": "reasoning",
    "legal": "advice_practical",
    "personal": "opinion_reflective",
}
_SIGNIFICANT_CHARS = 40


def normalise_language(hint: str | None) -> str:
    """`"pt-BR"` -> `"pt"`, `"ES_mx"` -> `"es"`; None or blank -> `"en"`. Any other code passes through."""
    if hint is None:
        return "en"
    first = hint.replace("_", "-").split("-", 1)[0].strip()
    return first.lower() if first else "en"


def split_utterances(text: str) -> list[str]:
    """Cut after every `?` or `!` and after every blank line (two `\\n` in a row); trim; drop empties."""
    segments: list[str] = []
    current: list[str] = []
    newlines = 0
    for ch in text:
        current.append(ch)
        cut = False
        if ch in "?!":
            cut = True
        if ch == "\n":
            newlines += 1
            if newlines == 2:
                cut, newlines = True, 0
        else:
            newlines = 0
        if cut:
            segments.append("".join(current))
            current = []
    segments.append("".join(current))
    return [s for s in (seg.strip() for seg in segments) if s]


@attrs.frozen
class Prepared:
    """A non-empty message ready for the model: only `utterance` is classified."""

    language: str
    text: str
    utterance: str
    notes: tuple[str, ...] = ()


def prepare(text: str, hint: str | None) -> Prepared | IntentRoutingResult:
    """Steps 1-3: the final result for empty input, else what to classify."""
    language = normalise_language(hint)
    trimmed = text.strip()
    if not trimmed:
        return default_result(language, routing_path="EmptyInput",
                              notes=("empty input → default chat behavior",))
    utterances = split_utterances(trimmed)
    notes: tuple[str, ...] = ()
    if sum(len(u) >= _SIGNIFICANT_CHARS for u in utterances) >= 2:
        notes = ("multiple significant utterances detected",)
    return Prepared(language=language, text=trimmed, utterance=utterances[0], notes=notes)


def _note(name: str, head: Head) -> str:
    return f"{name}={head.label} ({head.score:.2f})"


def decide(prepared: Prepared, heads: HeadSet) -> IntentRoutingResult:
    """Steps 4-14 on the model's heads for `prepared.utterance`."""
    notes = list(prepared.notes)
    speech, domain, expectation = heads.speech_act, heads.domain, heads.expectation
    support = heads.support
    support_intent = (support is not None and support.label == "SUPPORT"
                      and support.score >= SUPPORT_INTENT_THRESHOLD)
    if support_intent:
        assert support is not None
        notes.append(f"support_intent=ON ({support.score:.2f})")
    D, E = domain.label, expectation.label
    if speech.label == "DIRECTING" and E == "ADVICE" and D in ("personal", "social"):
        speech = attrs.evolve(speech, label="EXPRESSING")
        notes.append("DIRECTING+ADVICE in personal/social → reinterpreting as EXPRESSING")
    S = speech.label
    notes += [_note("speech_act", speech), _note("domain", domain), _note("expectation", expectation)]
    common = dict(language=prepared.language, speech_act=speech, domain=domain, expectation=expectation,
                  phatic=heads.phatic, support=support, support_intent=support_intent)
    if support_intent:
        notes.append("support intent override → support_reflective prompt")
        return IntentRoutingResult(**common, final_intent_kind="ChatCasual", routing_path="ChatLayer",
                                   prompt_key="support_reflective", notes=tuple(notes))

    preference = S == "EXPRESSING" and D == "personal" and mentions_preference(prepared.text)
    no_support = support is not None and support.label == "NO_SUPPORT"
    domain_stub = DOMAIN_PROMPTS.get(D, "chat_casual")
    path, stub = "ChatLayer", domain_stub
    if S == "EXPRESSING" and D == "personal" and E == "ADVICE" and no_support:
        stub = "chat_narrative"
        notes.append("personal advice request phrased as a story → narrative chat")
    elif S == "EXPRESSING" and D == "personal" and preference:
        stub = "opinion_casual"
        notes.append("personal preference detected → casual opinion")
    elif E == "NONE" and D == "personal" and S in ("DIRECTING", "EXPRESSING"):
        stub = "chat_narrative"
        notes.append("personal sharing without an ask → narrative chat")
    elif S == "EXPRESSING":
        stub = "chat_technical_reflective" if (E == "NONE" and D == "technical") else domain_stub
        notes.append("expressive message → chat layer")
    elif S == "DIRECTING" and E in ("INFO", "ADVICE") and D in ("technical", "legal"):
        path = "TaskLayer"
        notes.append(f"directive for {E.lower()} in {D} domain → task layer")
    elif S == "ASKING" and D != "social":
        path = "TaskLayer"
        notes.append(f"question in {D} domain → task layer")
    elif S == "DIRECTING" and E != "ADVICE" and D == "technical":
        stub = "reasoning"
        notes.append("technical directive → reasoning prompt in chat layer")
    elif S == "COLLABORATIVE":  # never produced by the label set; kept for parity with the original
        notes.append("collaborative message → chat layer")
    else:
        notes.append("chat-first routing applied")

    profile: str | None = None
    kind = "ChatCasual"
    if path == "TaskLayer":
        kind = "Reasoning" if stub == "reasoning" else "Task"
        profile = {"reasoning": "General", "opinion_reflective": "ReflectiveAnalysis",
                   "regulated_tax_legal": "RegulatedTaxLegal"}.get(stub, "General")
    key = "reasoning" if profile in ("RegulatedTaxLegal", "RiddleMetaphor", "FormalLogic",
                                     "ReflectiveAnalysis") else stub
    if D == "technical" and key not in ("reasoning", "advice_practical") and E in ("INFO", "ADVICE", "ACTION"):
        key = "reasoning"
        notes.append("domain=technical → forcing reasoning prompt")
    return IntentRoutingResult(**common, final_intent_kind=kind, routing_path=path,
                               reasoning_profile=profile, prompt_key=key, notes=tuple(notes))


def route_intent(text: str, hint: str | None, classify: Callable[[str], HeadSet]) -> IntentRoutingResult:
    """The whole of §5.4 for one message; `classify` maps the first utterance to its heads."""
    prepared = prepare(text, hint)
    if isinstance(prepared, IntentRoutingResult):
        return prepared
    return decide(prepared, classify(prepared.utterance))
