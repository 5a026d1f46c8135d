"""`ktulhu router ...`: train the default model, classify messages, evaluate on the held-out split.

- `ktulhu router train [--data DIR] [--output DIR] [--epochs N]`: rebuild `models/intent_router/`
  from `data/intents/` (needs the `train` extra; CPU only, deterministic).
- `ktulhu router classify [--json] [--dir DIR]`: one message per stdin line. With `--json` each line
  is `{"text": ..., "language": ...}` and each output line is that message's `IntentRoutingResult`
  JSON, in input order (a bad line yields `{"error": ...}` in its place). Without `--json` each line is
  plain text and the output is a one-line summary.
- `ktulhu router eval [--dir DIR] [--data DIR] [--split NAME] [--json]`: per-head accuracy and
  macro-F1, and prompt-key accuracy.

The model directory is `--dir`, else INTENT_ROUTER_DIR / PHATIC_MODEL_DIR, else models/intent_router.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `router` command and its actions to a `ktulhu` sub-parser collection."""
    router = subparsers.add_parser("router", help="intent router: train, classify, eval")
    actions = router.add_subparsers(dest="router_command", required=True, metavar="ACTION")

    train = actions.add_parser("train", help="build models/intent_router from data/intents (needs the train extra)")
    train.add_argument("--data", type=Path, default=Path("data/intents"), help="dataset directory")
    train.add_argument("--output", type=Path, default=Path("models/intent_router"), help="model directory to write")
    train.add_argument("--epochs", type=int, help="override the number of epochs (the default builds the committed model)")

    classify = actions.add_parser("classify", help="route messages read from stdin, one per line")
    classify.add_argument("--json", action="store_true",
                          help='input lines are {"text", "language"}; output lines are IntentRoutingResult JSON')
    classify.add_argument("--dir", type=Path, help="router directory (default: INTENT_ROUTER_DIR or models/intent_router)")
    classify.add_argument("--language", help="language hint for plain-text lines")

    evaluate = actions.add_parser("eval", help="accuracy, macro-F1 and prompt-key accuracy on the held-out split")
    evaluate.add_argument("--dir", type=Path, help="router directory (default: INTENT_ROUTER_DIR or models/intent_router)")
    evaluate.add_argument("--data", type=Path, default=Path("data/intents"), help="dataset directory")
    evaluate.add_argument("--split", default="heldout", help="dataset split (default: heldout)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return router


def run(args: argparse.Namespace, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Execute a parsed `router` command; returns the process exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if args.router_command == "train":
        return _train(args, stdout)
    from .service import Router, RouterLoadError

    try:
        router = _load(args.dir, Router)
    except RouterLoadError as error:
        print(f"ktulhu router: {error}", file=sys.stderr)
        return EXIT_FAILED
    except _ConfigError as error:
        print(f"ktulhu router: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.router_command == "classify":
        return _classify(router, args, stdin, stdout)
    return _eval(router, args, stdout)


class _ConfigError(Exception):
    pass


def _load(directory: Path | None, router_cls: Any) -> Any:
    if directory is not None:
        return router_cls.load(directory)
    from ..settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as error:
        raise _ConfigError(str(error)) from None
    return router_cls.from_settings(settings)


def _train(args: argparse.Namespace, stdout: TextIO) -> int:
    import attrs

    from .train import TrainConfig, train

    config = TrainConfig() if args.epochs is None else attrs.evolve(TrainConfig(), epochs=args.epochs)
    metrics = train(data_dir=args.data, output=args.output, config=config,
                    log=lambda line: print(line, file=stdout, flush=True))
    from .evaluate import format_report

    print(format_report(metrics["heldout"]), file=stdout)
    return EXIT_OK


def _classify(router: Any, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    for number, line in enumerate(stdin, 1):
        line = line.rstrip("\n")
        if args.json:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                text, language = request["text"], request.get("language")
                if not isinstance(text, str) or not (language is None or isinstance(language, str)):
                    raise TypeError("text must be a string and language a string or null")
            except (ValueError, KeyError, TypeError) as error:
                out: dict[str, Any] = {"error": f"line {number}: {type(error).__name__}: {error}"}
            else:
                out = router.classify_sync(text, language).to_json()
            stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        else:
            result = router.classify_sync(line, args.language)
            heads = f"{result.speech_act.label}/{result.domain.label}/{result.expectation.label}"
            support = " support" if result.support_intent else ""
            stdout.write(f"{result.prompt_key:<26} {result.routing_path:<10} {heads:<32}{support} {line}\n")
        stdout.flush()
    return EXIT_OK


def _eval(router: Any, args: argparse.Namespace, stdout: TextIO) -> int:
    from .dataset import load_split
    from .evaluate import evaluate, format_report

    if router.model is None:
        print("ktulhu router: no model to evaluate", file=sys.stderr)
        return EXIT_FAILED
    samples = load_split(args.split, args.data)
    metrics = evaluate(samples, router.model.predict)
    if args.json:
        stdout.write(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    else:
        stdout.write(f"router: {router.model.directory} ({router.model.device}), split: {args.split}\n")
        stdout.write(format_report(metrics) + "\n")
    return EXIT_OK
