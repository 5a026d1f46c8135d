"""`ktulhu router classify --json` and `ktulhu router eval`."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from ktulhu.router import cli
from tests.paths import REPO

DEFAULT_DIR = REPO / "models" / "intent_router"
pytestmark = pytest.mark.skipif(not (DEFAULT_DIR / "model.onnx").is_file(), reason="models/intent_router not built")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ktulhu")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_classify_json_keeps_order_and_reports_bad_lines():
    lines = [
        {"text": "how do I reverse a linked list in Python?", "language": "en"},
        {"text": "", "language": "es-ES"},
        "not json",
        {"text": "me siento muy solo y a nadie le importo", "language": "es"},
        {"language": "ru"},
        {"text": "привет!", "language": None},
    ]
    stdin = io.StringIO("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    stdout = io.StringIO()
    assert cli.run(parse("router", "classify", "--json", "--dir", str(DEFAULT_DIR)), stdin=stdin, stdout=stdout) == 0
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert len(out) == 6
    assert out[0]["prompt_key"] == "reasoning" and out[0]["language"] == "en"
    assert out[1]["routing_path"] == "EmptyInput" and out[1]["language"] == "es"
    assert "error" in out[2] and "line 3" in out[2]["error"]
    assert out[3]["language"] == "es" and set(out[3]) >= {"speech_act", "domain", "expectation", "notes", "support_intent"}
    assert "error" in out[4]
    assert out[5]["language"] == "en"


def test_classify_plain_text():
    stdout = io.StringIO()
    assert cli.run(parse("router", "classify", "--dir", str(DEFAULT_DIR)), stdin=io.StringIO("what is DNS?\n"),
                   stdout=stdout) == 0
    assert stdout.getvalue().startswith("reasoning")


def test_eval_reproduces_the_committed_metrics():
    """The runtime (onnxruntime + tokenizers) scores the held-out split as training recorded it, at target."""
    stdout = io.StringIO()
    args = parse("router", "eval", "--dir", str(DEFAULT_DIR), "--data", str(REPO / "data" / "intents"), "--json")
    assert cli.run(args, stdout=stdout) == 0
    metrics = json.loads(stdout.getvalue())
    recorded = json.loads((DEFAULT_DIR / "metrics.json").read_text())["heldout"]
    assert set(metrics["heads"]) == {"speech_act", "domain", "expectation", "phatic", "support"}
    assert metrics["samples"] == recorded["samples"] == 4031
    for head, scores in recorded["heads"].items():
        assert metrics["heads"][head]["accuracy"] == pytest.approx(scores["accuracy"], abs=2e-3)
    assert metrics["prompt_key_accuracy"] == pytest.approx(recorded["prompt_key_accuracy"], abs=2e-3)
    # 0.9018 with argmax decoding; the support head's P(SUPPORT) >= 0.3 rule (recall of people who need
    # support over agreement with the held-out labels) costs 8 of 4,031 routes: 0.8998
    assert metrics["prompt_key_accuracy"] >= 0.895
    assert min(metrics["prompt_key_accuracy_by_language"].values()) >= 0.85


def test_missing_directory_fails_cleanly(tmp_path, capsys):
    assert cli.run(parse("router", "classify", "--dir", str(tmp_path / "none")), stdin=io.StringIO("")) == 1
    assert "is not a directory" in capsys.readouterr().err
