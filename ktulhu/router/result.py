"""`IntentRoutingResult`: what the router decided for one message (original §5.8).

`to_json()` is the `intent_result` of the `classifier_debug` frame; `message_meta()` is the `meta`
stored with the user message (original §3.5 step 10).
"""

from __future__ import annotations

from typing import Any

import attrs

from .labels import Head

__all__ = [
    "INTENT_KINDS",
    "REASONING_PROFILES",
    "ROUTING_PATHS",
    "IntentRoutingResult",
    "default_result",
]

INTENT_KINDS = ("ChatCasual", "Task", "Reasoning")
ROUTING_PATHS = ("EmptyInput", "ChatLayer", "TaskLayer")
REASONING_PROFILES = (
    "General", "ReflectiveAnalysis", "RegulatedTaxLegal", "FormalLogic", "ConstraintPuzzle",
    "MathWordProblem", "AlgorithmicCode", "Planning", "ArgumentCritique", "RiddleMetaphor",
)


@attrs.frozen(kw_only=True)
class IntentRoutingResult:
    """The routing decision. Optional parts (`phatic`, `support`, `reasoning_profile`) are None when absent."""

    language: str
    speech_act: Head
    domain: Head
    expectation: Head
    phatic: Head | None = None
    final_intent_kind: str = "ChatCasual"
    routing_path: str = "ChatLayer"
    reasoning_profile: str | None = None
    prompt_key: str = "chat_casual"
    notes: tuple[str, ...] = ()
    support: Head | None = None
    support_intent: bool = False

    def to_json(self) -> dict[str, Any]:
        """The §5.8 object, keys in the original's order; absent optional keys are omitted."""
        out: dict[str, Any] = {
            "language": self.language,
            "speech_act": self.speech_act.to_json(),
            "domain": self.domain.to_json(),
            "expectation": self.expectation.to_json(),
        }
        if self.phatic is not None:
            out["phatic"] = self.phatic.to_json()
        out["final_intent_kind"] = self.final_intent_kind
        out["routing_path"] = self.routing_path
        if self.reasoning_profile is not None:
            out["reasoning_profile"] = self.reasoning_profile
        out["prompt_key"] = self.prompt_key
        out["notes"] = list(self.notes)
        if self.support is not None:
            out["support"] = self.support.to_json()
        out["support_intent"] = self.support_intent
        return out

    def message_meta(self) -> dict[str, Any]:
        """The `meta` of the stored user message: classifier heads plus the routing decision."""
        return {
            "classifier": {
                "speech_act": self.speech_act.to_json(),
                "domain": self.domain.to_json(),
                "expectation": self.expectation.to_json(),
                "phatic": None if self.phatic is None else self.phatic.to_json(),
                "support": None if self.support is None else self.support.to_json(),
            },
            "intent": {
                "language": self.language,
                "prompt_key": self.prompt_key,
                "routing_path": self.routing_path,
                "final_intent_kind": self.final_intent_kind,
                "support_intent": self.support_intent,
            },
        }


def default_result(language: str = "en", *, notes: tuple[str, ...] = ("default routing result",),
                   routing_path: str = "ChatLayer") -> IntentRoutingResult:
    """The fallback route: SOCIAL / `chat` / NONE -> `chat_casual`.

    Used for empty input (with `routing_path="EmptyInput"`), a missing model, a failure or a timeout.
    Unlike the original (always `"en"`), callers pass the normalised hinted language.
    """
    return IntentRoutingResult(
        language=language,
        speech_act=Head("SOCIAL", 1.0),
        domain=Head("chat", 1.0),
        expectation=Head("NONE", 1.0),
        routing_path=routing_path,
        notes=notes,
    )
