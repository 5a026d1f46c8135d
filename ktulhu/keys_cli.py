"""`ktulhu keys create|list|revoke`: API keys an operator issues for tools configured with a static
key (Open WebUI, the `openai` CLI), without an HTTP sign-up.

Each key is owned by a service account of its name and stored exactly as keys made over HTTP
(`ktulhu.auth.operator_keys`). The command opens the store `KTULHU_STORE` names, as the server does:
a PostgreSQL store at any time, a RocksDB directory only while no server holds it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from .settings import Settings, load_settings

__all__ = ["add_parser", "run"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    keys = subparsers.add_parser("keys", help="API keys for /v1 and /external/api, issued by the operator")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="make a key (the secret is printed once)",
        description="Makes an API key owned by a service account named NAME (created if needed) and prints it "
                    "once, on standard output (everything else goes to standard error). The store keeps only a "
                    "hash of it.",
    )
    create.add_argument("--name", required=True, help="the key's name: 1-64 of A-Z a-z 0-9 . _ -")
    create.add_argument("--role", default="paid", help="free, paid or admin (default: paid)")
    create.add_argument("--limit", type=int, metavar="N",
                        help="at most N generations for this key's account (default: the role's limit; "
                             "paid and admin are unlimited)")
    listing = actions.add_parser("list", help="show the keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = actions.add_parser("revoke", help="revoke a key: it is refused from the next request on")
    revoke.add_argument("key", metavar="ID_OR_NAME", help="the key's id (as `list` shows it) or its name")
    return keys


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"ktulhu keys: {message}", file=sys.stderr)
    return code


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _open(settings: Settings, *, create: bool) -> Any:
    """The store as the server opens it, or a message (str) saying why it cannot be opened. Only
    `create` makes a RocksDB store that is not there yet (elsewhere a missing one is a wrong directory)."""
    from pathlib import Path

    from .store import Store, StoreError, StoreLockedError

    location = settings.store_location
    if isinstance(location, Path) and not create and not (location / "CURRENT").is_file():
        return (f"there is no store at {location}; run the command in the server's directory, or set "
                "KTULHU_STORE as the server has it")
    try:
        return Store.open(settings.store_location, sync=settings.db_sync)
    except StoreLockedError:
        return (f"the store at {location} is held by another process, likely a running server (a RocksDB store "
                "admits one): stop the server to manage keys, or keep the store in PostgreSQL "
                "(KTULHU_STORE=postgresql://...) to manage them while it serves")
    except (StoreError, OSError) as error:
        return str(error)


def run(args: argparse.Namespace) -> int:
    from .auth.operator_keys import (OperatorKeyError, check_request, create_operator_key, list_operator_keys,
                                     revoke_operator_key)

    settings = load_settings()
    file_names = {key.name for key in settings.static_keys}
    if args.keys_command == "create":  # what can be checked is, before the store is touched
        try:
            check_request(args.name, args.role, args.limit)
        except OperatorKeyError as error:
            return _fail(f"{error}; nothing was changed", EXIT_USAGE)
        if args.name in file_names:
            return _fail(f"{args.name!r} is already a key of KTULHU_API_KEYS_FILE; choose another name; "
                         "nothing was changed", EXIT_USAGE)
    store = _open(settings, create=args.keys_command == "create")
    if isinstance(store, str):
        return _fail(store)
    try:
        if args.keys_command == "create":
            try:
                key, secret = create_operator_key(store, args.name, args.role, args.limit)
            except OperatorKeyError as error:
                return _fail(f"{error}; nothing was changed", EXIT_USAGE)
            limit = "no generation limit" if key.limit is None else f"at most {key.limit} generations"
            print(f"Created key {key.record.name!r} (id {key.record.id}, role {key.account.role}, {limit}) "
                  f"in the store at {store.where}:", file=sys.stderr)
            print(secret, flush=True)
            print("This is the only time the key is shown: copy it now (it is stored only as a hash).",
                  file=sys.stderr)
            return EXIT_OK
        if args.keys_command == "list":
            return _list(settings, list_operator_keys(store), args.json)
        if args.keys_command == "revoke":
            if args.key in file_names:
                return _fail(f"{args.key!r} is a key of KTULHU_API_KEYS_FILE: delete its line from "
                             f"{settings.path(settings.api_keys_file)} and restart the server")
            try:
                records, revoked = revoke_operator_key(store, args.key)
            except OperatorKeyError as error:
                return _fail(str(error))
            for record in records:
                print(f"Revoked key {record.name!r} (id {record.id})" if revoked else
                      f"Key {record.name!r} (id {record.id}) was already revoked")
            return EXIT_OK
        return EXIT_USAGE  # argparse enforces the choice
    finally:
        store.close()


def _list(settings: Settings, keys: list[Any], as_json: bool) -> int:
    """Stored keys, then the file's; `limit` is the account's effective cap (None: unlimited)."""
    from .auth.quota import generation_limit
    from .store.records import User

    rows = [{"name": k.record.name, "id": k.record.id, "role": k.account.role,
             "limit": generation_limit(settings, k.account), "used": k.account.generation_count,
             "created": _when(k.record.created_ts), "status": "revoked" if k.record.revoked else "live",
             "source": "store"} for k in keys]
    rows += [{"name": k.name, "id": None, "role": k.role,
              "limit": generation_limit(settings, User(id="-", created_ts=0, role=k.role)), "used": None,
              "created": None, "status": "live", "source": "file"} for k in settings.static_keys]
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("No keys. Make one with `ktulhu keys create --name NAME`.")
        return EXIT_OK
    header = ("NAME", "ID", "ROLE", "LIMIT", "USED", "CREATED", "STATUS")
    table = [header] + [(r["name"] or "-", r["id"] or "(KTULHU_API_KEYS_FILE)", r["role"],
                         "unlimited" if r["limit"] is None else str(r["limit"]),
                         "-" if r["used"] is None else str(r["used"]), r["created"] or "-", r["status"])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK
