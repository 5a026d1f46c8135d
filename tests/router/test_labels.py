"""Label sets and head decoding (original §5.3)."""

from __future__ import annotations

import math

import pytest

from ktulhu.router.labels import HEADS, Head, decode_head, softmax


def test_label_order_is_the_contract():
    assert HEADS["speech_act"] == ("SOCIAL", "ASKING", "DIRECTING", "EXPRESSING", "SHARING")
    assert HEADS["domain"] == ("technical", "general", "personal", "professional", "social", "legal", "other")
    assert HEADS["expectation"] == ("NONE", "INFO", "ADVICE", "ACTION", "OTHER")
    assert HEADS["phatic"] == ("SMALL_TALK", "CONTENTFUL")
    assert HEADS["support"] == ("NO_SUPPORT", "SUPPORT")


def test_decode_picks_argmax_with_its_probability():
    head = decode_head([0.0, 2.0, 1.0, -1.0, 0.5], HEADS["speech_act"])
    assert head.label == "ASKING"
    assert head.score == pytest.approx(max(softmax([0.0, 2.0, 1.0, -1.0, 0.5])))
    assert sum(head.distribution) == pytest.approx(1.0)
    assert len(head.distribution) == 5


def test_argmax_beyond_labels_decodes_to_unknown():
    assert decode_head([0.0, 0.0, 9.0], ("A", "B")).label == "unknown"


def test_softmax_is_stable_for_large_logits():
    probs = softmax([1000.0, 1000.0])
    assert probs == [0.5, 0.5]
    assert all(math.isfinite(p) for p in softmax([-1e6, 1e6]))


def test_head_json_omits_empty_distribution():
    assert Head("SOCIAL", 1.0).to_json() == {"label": "SOCIAL", "score": 1.0}
    assert Head("X", 0.5, (0.5, 0.5)).to_json() == {"label": "X", "score": 0.5, "distribution": [0.5, 0.5]}
