"""`ktulhu store backup|restore`: point-in-time copies of the chat store, safe while serving.

The logic lives in `ktulhu.store.backup`; this module is the argument parsing and the one-line
report. Also runnable without the main command: ``python -m ktulhu.store_cli backup DEST``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .settings import SettingsError, load_settings

__all__ = ["add_parser", "main", "run"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    store = subparsers.add_parser("store", help="back up and restore the chat store (RocksDB)")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    backup = actions.add_parser(
        "backup", help="copy the store to a new directory, consistent at one point in time",
        description="Copies the store through a RocksDB secondary instance, so it works while a server "
                    "is serving and writing: the copy is the store at one moment, every write whole or "
                    "absent. It is written under a hidden temporary name next to DEST, verified (key "
                    "count and digest, opens as a store) and then renamed to DEST.",
    )
    backup.add_argument("dest", type=Path, metavar="DEST", help="new directory (must not exist, or be empty)")
    backup.add_argument("--db", type=Path, metavar="PATH",
                        help="the store to back up (default: KTULHU_DB_PATH, i.e. chatdb)")
    restore = actions.add_parser(
        "restore", help="put a backup in place as the store (the server must be stopped)",
        description="Copies the backup SRC (left unchanged) to the store path and verifies it. Refused while "
                    "a server holds the store. A non-empty store path is replaced only with --force, and "
                    "is then renamed to <path>.before-restore-<UTC time>, never deleted.",
    )
    restore.add_argument("src", type=Path, metavar="SRC", help="a directory made by `ktulhu store backup`")
    restore.add_argument("--db", type=Path, metavar="PATH",
                         help="where to restore (default: KTULHU_DB_PATH, i.e. chatdb)")
    restore.add_argument("--force", action="store_true",
                         help="replace a non-empty store path (it is moved aside, not deleted)")
    return store


def run(args: argparse.Namespace) -> int:
    from .store.backup import BackupError, backup, restore

    command = f"ktulhu store {args.store_command}"
    db: Path = args.db if args.db is not None else load_settings().db_dir
    try:
        if args.store_command == "backup":
            print(backup(db, args.dest).line("backed up"))
        elif args.store_command == "restore":
            print(restore(args.src, db, force=args.force).line())
        else:  # argparse enforces the choice
            return EXIT_CONFIG
    except BackupError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ktulhu", description="Back up and restore the chat store.")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["store", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except SettingsError as error:
        print(f"ktulhu: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
