"""`ktulhu store backup|restore|copy`: point-in-time copies of a RocksDB store (safe while serving),
and copies between any two stores, RocksDB or PostgreSQL, in either direction.

The logic lives in `ktulhu.store.backup` and `ktulhu.store.copy`; this module is the argument
parsing and the report. Also runnable without the main command: ``python -m ktulhu.store_cli backup DEST``.
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
EXIT_INTERRUPTED = 130


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    store = subparsers.add_parser("store", help="back up, restore and copy the chat store")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    backup = actions.add_parser(
        "backup", help="copy the store to a new directory, consistent at one point in time",
        description="Copies the store through a RocksDB secondary instance, so it works while a server "
                    "is serving and writing: the copy is the store at one moment, every write whole or "
                    "absent. It is written under a hidden temporary name next to DEST, verified (key "
                    "count and digest, opens as a store) and then renamed to DEST.",
    )
    backup.add_argument("dest", type=Path, metavar="DEST", help="new directory (must not exist, or be empty)")
    backup.add_argument("--db", metavar="PATH",
                        help="the store to back up (default: KTULHU_STORE, i.e. chatdb)")
    restore = actions.add_parser(
        "restore", help="put a backup in place as the store (the server must be stopped)",
        description="Copies the backup SRC (left unchanged) to the store path and verifies it. Refused while "
                    "a server holds the store. A non-empty store path is replaced only with --force, and "
                    "is then renamed to <path>.before-restore-<UTC time>, never deleted.",
    )
    restore.add_argument("src", type=Path, metavar="SRC", help="a directory made by `ktulhu store backup`")
    restore.add_argument("--db", metavar="PATH",
                         help="where to restore (default: KTULHU_STORE, i.e. chatdb)")
    restore.add_argument("--force", action="store_true",
                         help="replace a non-empty store path (it is moved aside, not deleted)")
    copy = actions.add_parser(
        "copy", help="copy every key between two stores (RocksDB directory or postgresql:// URL)",
        description="Copies every key and value, byte for byte, in key order and in batches, from SRC to "
                    "DST; each may be a RocksDB directory or a postgresql://user:password@host:port/db URL. "
                    "Resumable (run the same command again after an interruption), idempotent, and verified "
                    "at the end (both key counts printed; exit 1 on any difference). A RocksDB side must not "
                    "be open in a server; a PostgreSQL destination must not be either (a PostgreSQL source "
                    "may be: it is read at one snapshot).",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="SRC", help="the store to copy")
    copy.add_argument("--to", dest="dest", required=True, metavar="DST",
                      help="where to copy it (created if missing; empty, or an earlier copy of SRC)")
    return store


def run(args: argparse.Namespace) -> int:
    from .store.backup import BackupError, backup, restore
    from .store.copy import CopyError, copy_store
    from .store.location import PgUrl, is_postgres_url

    command = f"ktulhu store {args.store_command}"
    if args.store_command == "copy":
        try:
            report = copy_store(args.source, args.dest)
        except CopyError as error:
            print(f"{command}: {error}", file=sys.stderr)
            return EXIT_FAILED
        except OSError as error:
            print(f"{command}: {error}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print(f"{command}: interrupted; run the same command again to continue where it stopped",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        print("\n".join(report.lines()))
        return EXIT_OK if report.verified else EXIT_FAILED
    if args.db is not None:
        location: Path | str = args.db if is_postgres_url(args.db) else Path(args.db)
    else:
        location = load_settings().store_location
    if isinstance(location, str):
        try:
            shown = str(PgUrl.parse(location))
        except ValueError:
            shown = "a PostgreSQL database"
        verb = "back up" if args.store_command == "backup" else "restore"
        print(f"{command}: the store is PostgreSQL ({shown}); {verb} it with pg_dump -Fc / pg_restore, "
              "or copy it to and from a RocksDB directory with `ktulhu store copy --from SRC --to DST`",
              file=sys.stderr)
        return EXIT_FAILED
    db: Path = location
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
    parser = argparse.ArgumentParser(prog="ktulhu", description="Back up, restore and copy the chat store.")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["store", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except SettingsError as error:
        print(f"ktulhu: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
