"""Training is deterministic: two runs on the same data write byte-identical artifacts.

Needs the `train` extra (torch, onnx); skipped without it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ktulhu.router.train import TrainConfig, train
from tests.paths import REPO

TINY = TrainConfig(vocab_size=400, max_length=32, embedding=16, channels=16, hidden=16, epochs=2, batch_size=32)


def _subset(source: Path, target: Path) -> None:
    target.mkdir()
    for split, n in (("train", 400), ("heldout", 80)):
        with open(source / f"{split}.jsonl", encoding="utf-8") as f:
            lines = f.readlines()
        step = max(1, len(lines) // n)
        (target / f"{split}.jsonl").write_text("".join(itertools.islice(lines, 0, None, step)), encoding="utf-8")


def test_training_is_deterministic(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    data = tmp_path / "data"
    _subset(REPO / "data" / "intents", data)
    first = train(data_dir=data, output=tmp_path / "a", config=TINY, log=lambda _: None)
    second = train(data_dir=data, output=tmp_path / "b", config=TINY, log=lambda _: None)
    for name in ("model.onnx", "tokenizer.json", "labels.json", "metrics.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first == second
    assert first["onnx_max_abs_logit_diff"] < 1e-3
