"""Held-out evaluation: per-head accuracy and macro-F1, and prompt-key accuracy.

`evaluate(samples, predict)` takes any batch predictor (`IntentModel.predict` or the trainer's torch
model), so the figures written to `metrics.json` at training time and those printed by
`ktulhu router eval` are computed the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .dataset import Sample, gold_route
from .labels import HEADS, HeadSet
from .routing import decide, prepare

__all__ = ["evaluate", "format_report", "macro_f1"]


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean F1 over the labels that occur in `gold`."""
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        if tp + fn == 0:
            continue
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def evaluate(samples: Sequence[Sample], predict: Callable[[list[str]], list[HeadSet]],
             batch_size: int = 256) -> dict[str, Any]:
    """Metrics of `predict` on `samples` (the model sees each sample's first utterance)."""
    predictions: list[HeadSet] = []
    utterances = [s.utterance for s in samples]
    for start in range(0, len(samples), batch_size):
        predictions += predict(utterances[start:start + batch_size])
    heads: dict[str, Any] = {}
    for head, labels in HEADS.items():
        gold = [s.labels[head] for s in samples]
        pred = [getattr(p, head).label if getattr(p, head) is not None else "" for p in predictions]
        if not any(pred):
            continue
        heads[head] = {
            "accuracy": round(sum(g == p for g, p in zip(gold, pred)) / len(samples), 4),
            "macro_f1": round(macro_f1(gold, pred, labels), 4),
        }
    key_hits = 0
    by_language: dict[str, list[int]] = {}
    confusions: dict[str, int] = {}
    for sample, heads_pred in zip(samples, predictions):
        prepared = prepare(sample.text, sample.language)
        got = decide(prepared, heads_pred).prompt_key  # type: ignore[arg-type]
        want = gold_route(sample).prompt_key
        hit = got == want
        key_hits += hit
        by_language.setdefault(sample.language, [0, 0])
        by_language[sample.language][0] += hit
        by_language[sample.language][1] += 1
        if not hit:
            confusions[f"{want} -> {got}"] = confusions.get(f"{want} -> {got}", 0) + 1
    return {
        "samples": len(samples),
        "heads": heads,
        "prompt_key_accuracy": round(key_hits / len(samples), 4),
        "prompt_key_accuracy_by_language": {k: round(h / n, 4) for k, (h, n) in sorted(by_language.items())},
        "top_prompt_key_confusions": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:8]),
    }


def format_report(metrics: dict[str, Any]) -> str:
    """A small human-readable table of `evaluate`'s output."""
    lines = [f"samples: {metrics['samples']}", f"{'head':<12} {'accuracy':>9} {'macro-F1':>9}"]
    for head, m in metrics["heads"].items():
        lines.append(f"{head:<12} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f}")
    lines.append(f"prompt-key accuracy: {metrics['prompt_key_accuracy']:.4f}")
    by_lang = ", ".join(f"{k} {v:.4f}" for k, v in metrics["prompt_key_accuracy_by_language"].items())
    lines.append(f"  by language: {by_lang}")
    if metrics.get("top_prompt_key_confusions"):
        lines.append("  most frequent misroutes (gold -> predicted):")
        lines += [f"    {k}: {v}" for k, v in metrics["top_prompt_key_confusions"].items()]
    return "\n".join(lines)
