"""Label sets and head decoding (original §5.3)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from ktulhu.router.labels import HEADS, SUPPORT_INTENT_THRESHOLD, Head, decode_head, softmax


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


# --- the support threshold binds (original §8 item 30, fixed as PRODUCT.md fixes every §8 defect) -------

def _support_logits(p_support: float) -> list[float]:
    """Two logits whose softmax gives P(SUPPORT) = `p_support`."""
    return [0.0, math.log(p_support / (1.0 - p_support))]


@pytest.mark.parametrize("p_support", [0.3, 0.31, 0.35, 0.4, 0.45, 0.49])
def test_support_between_threshold_and_half_decodes_as_support(p_support):
    """The original took the argmax (NO_SUPPORT here) and compared its score with 0.3: never binding."""
    head = decode_head(_support_logits(p_support), HEADS["support"])
    assert head.label == "SUPPORT"
    assert head.score == pytest.approx(p_support)
    assert head.distribution == pytest.approx((1.0 - p_support, p_support))


@pytest.mark.parametrize("p_support", [0.0001, 0.1, 0.29, 0.2999])
def test_support_below_threshold_decodes_as_no_support(p_support):
    head = decode_head(_support_logits(p_support), HEADS["support"])
    assert head.label == "NO_SUPPORT" and head.score == pytest.approx(1.0 - p_support)


@given(st.floats(min_value=-30, max_value=30), st.floats(min_value=-30, max_value=30))
def test_support_label_is_exactly_the_threshold_on_p_support(no, yes):
    head = decode_head([no, yes], HEADS["support"])
    p_support = softmax([no, yes])[1]
    assert head.label == ("SUPPORT" if p_support >= SUPPORT_INTENT_THRESHOLD else "NO_SUPPORT")
    assert head.score == pytest.approx(p_support if head.label == "SUPPORT" else 1.0 - p_support)


def test_other_two_class_heads_keep_argmax():
    head = decode_head(_support_logits(0.4), HEADS["phatic"])
    assert head.label == "SMALL_TALK" and head.score == pytest.approx(0.6)
