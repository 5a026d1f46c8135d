"""The classifier's heads, their labels in logit order (original §5.3), and decoding logits.

A head's logits decode to a `Head`: the argmax label, its softmax probability and the whole
distribution. Label order is part of the model contract: index *i* of a head's logits is
`HEADS[name][i]`.

The support head is the exception: it decodes to SUPPORT when P(SUPPORT) reaches
`SUPPORT_INTENT_THRESHOLD` (0.3), not when SUPPORT is the argmax. The original compared the argmax's
probability with 0.3, which for two classes is always at least 0.5, so its threshold could never bind
(original-behaviour §8 item 30; PRODUCT.md fixes every §8 defect). Routing's `support_intent` (label
SUPPORT with score >= the threshold) therefore means P(SUPPORT) >= 0.3, as the constant intends, and
`NO_SUPPORT` means P(SUPPORT) < 0.3.
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
    "THRESHOLD_LABELS",
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
#: `support_intent` is on when P(SUPPORT) is at least this (the support head decodes by it, see above).
SUPPORT_INTENT_THRESHOLD = 0.3
#: Heads decoded by a threshold instead of argmax: labels -> (label chosen at or above it, threshold).
THRESHOLD_LABELS: dict[tuple[str, ...], tuple[str, float]] = {
    HEADS["support"]: ("SUPPORT", SUPPORT_INTENT_THRESHOLD),
}


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
    """Argmax decoding; an argmax index beyond `labels` decodes to `"unknown"` (as the original).

    A head in `THRESHOLD_LABELS` (the support head) decodes to its label when that label's probability
    reaches the threshold, and otherwise to the argmax of the other labels.
    """
    probs = softmax([float(x) for x in logits])
    if not probs:
        return Head("unknown", 0.0, ())
    rule = THRESHOLD_LABELS.get(tuple(labels))
    if rule is not None and len(probs) == len(labels):
        positive = labels.index(rule[0])
        if probs[positive] >= rule[1]:
            return Head(rule[0], probs[positive], tuple(probs))
        best = max((i for i in range(len(probs)) if i != positive), key=probs.__getitem__)
        return Head(labels[best], probs[best], tuple(probs))
    best = max(range(len(probs)), key=probs.__getitem__)
    label = labels[best] if best < len(labels) else "unknown"
    return Head(label, probs[best], tuple(probs))
