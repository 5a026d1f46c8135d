"""The classifier's heads, their labels in logit order (original §5.3), and decoding logits.

A head's logits decode to a `Head`: the argmax label, its softmax probability and the whole
distribution. Label order is part of the model contract: index *i* of a head's logits is
`HEADS[name][i]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

__all__ = [
    "HEADS",
    "OPTIONAL_HEADS",
    "REQUIRED_HEADS",
    "SUPPORT_INTENT_THRESHOLD",
    "Head",
    "HeadSet",
    "decode_head",
    "softmax",
]

#: Head name -> labels in logit order. Speech acts and expectations are upper-case, domains lower-case.
HEADS: dict[str, tuple[str, ...]] = {
    "speech_act": ("SOCIAL", "ASKING", "DIRECTING", "EXPRESSING", "SHARING"),
    "domain": ("technical", "general", "personal", "professional", "social", "legal", "other"),
    "expectation": ("NONE", "INFO", "ADVICE", "ACTION", "OTHER"),
    "phatic": ("SMALL_TALK", "CONTENTFUL"),
    "support": ("NO_SUPPORT", "SUPPORT"),
}
REQUIRED_HEADS = ("speech_act", "domain", "expectation")
OPTIONAL_HEADS = ("phatic", "support")
#: `support_intent` is on when the support head's argmax is SUPPORT with at least this probability.
SUPPORT_INTENT_THRESHOLD = 0.3


@attrs.frozen
class Head:
    """One decoded head: `label`, its probability `score`, and the full softmax (may be empty)."""

    label: str
    score: float
    distribution: tuple[float, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The §5.8 `Head` object; `distribution` is omitted when empty."""
        out: dict[str, object] = {"label": self.label, "score": self.score}
        if self.distribution:
            out["distribution"] = list(self.distribution)
        return out


@attrs.frozen
class HeadSet:
    """The decoded heads of one text; `phatic`/`support` are None when the model lacks them."""

    speech_act: Head
    domain: Head
    expectation: Head
    phatic: Head | None = None
    support: Head | None = None


def softmax(logits: Sequence[float]) -> list[float]:
    """Numerically stable softmax of a row of logits (empty in, empty out)."""
    if not logits:
        return []
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def decode_head(logits: Sequence[float], labels: Sequence[str]) -> Head:
    """Argmax decoding; an argmax index beyond `labels` decodes to `"unknown"` (as the original)."""
    probs = softmax([float(x) for x in logits])
    if not probs:
        return Head("unknown", 0.0, ())
    best = max(range(len(probs)), key=probs.__getitem__)
    label = labels[best] if best < len(labels) else "unknown"
    return Head(label, probs[best], tuple(probs))
