"""The labelled intent dataset in `data/intents/` (JSONL, one sample a line).

A sample: `{"text", "language", "speech_act", "domain", "expectation", "phatic", "support", ...}`.
Its *gold route* is what `decide` makes of the gold labels (support head present, scores 1.0),
so prompt-key accuracy compares the whole routing decision, not just the heads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import attrs

from .labels import HEADS, Head, HeadSet
from .result import IntentRoutingResult
from .routing import decide, prepare

__all__ = ["DATA_DIR", "Sample", "gold_route", "load_split"]

DATA_DIR = Path("data/intents")
SPLITS = ("train", "heldout")


@attrs.frozen
class Sample:
    """One labelled message; `labels` maps each head to its gold label."""

    text: str
    language: str
    labels: dict[str, str]

    @property
    def utterance(self) -> str:
        """What the router's model sees for this message (its first utterance)."""
        prepared = prepare(self.text, self.language)
        return self.text.strip() if isinstance(prepared, IntentRoutingResult) else prepared.utterance


def load_split(split: str, data_dir: Path = DATA_DIR) -> list[Sample]:
    """Samples of `split` (`train` or `heldout`); raises ValueError naming a bad line."""
    path = Path(data_dir) / f"{split}.jsonl"
    return list(_read(path))


def _read(path: Path) -> Iterator[Sample]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            labels = {}
            for head, names in HEADS.items():
                value = row.get(head)
                if value not in names:
                    raise ValueError(f"{path}:{number}: {head}={value!r} is not one of {names}")
                labels[head] = value
            yield Sample(text=row["text"], language=row.get("language") or "en", labels=labels)


def gold_heads(sample: Sample) -> HeadSet:
    return HeadSet(**{head: Head(label, 1.0) for head, label in sample.labels.items()})


def gold_route(sample: Sample) -> IntentRoutingResult:
    """The routing decision the gold labels imply."""
    prepared = prepare(sample.text, sample.language)
    if isinstance(prepared, IntentRoutingResult):
        return prepared
    return decide(prepared, gold_heads(sample))
