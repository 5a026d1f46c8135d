"""`ktulhu admin set-password`: write the admin credentials file (an argon2 hash, mode 600)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from .auth.admin import write_admin_credentials
from .settings import load_settings

__all__ = ["add_parser", "run"]

#: Admin passwords guard every user's data: never shorter than this, whatever KTULHU_MIN_PASSWORD says.
MIN_ADMIN_PASSWORD = 12
MAX_PASSWORD = 1024


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    admin = subparsers.add_parser("admin", help="admin credentials for /internal/* pages and routes")
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    setpw = actions.add_parser(
        "set-password", help="set the admin user name and password (stored as an argon2 hash)",
        description="Writes KTULHU_ADMIN_AUTH_FILE (default config/internal_admin_auth.json) with mode 600. "
                    "The running server reads it on every sign-in, so no restart is needed.",
    )
    setpw.add_argument("--user", default="admin", help="admin user name (default: admin)")
    setpw.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input instead of prompting")
    return admin


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    try:
        first = getpass.getpass("New admin password: ")
        second = getpass.getpass("Repeat the password: ")
    except (EOFError, KeyboardInterrupt):
        print("\nktulhu admin: cancelled; nothing was written", file=sys.stderr)
        return None
    if first != second:
        print("ktulhu admin: the two passwords differ; nothing was written", file=sys.stderr)
        return None
    return first


def run(args: argparse.Namespace) -> int:
    if args.admin_command != "set-password":  # argparse enforces the choice; kept for clarity
        return 2
    user = args.user.strip()
    if not user or ":" in user or len(user) > 128 or not user.isprintable():
        print("ktulhu admin: --user must be 1-128 printable characters without ':'", file=sys.stderr)
        return 2
    settings = load_settings()
    password = _read_password(args)
    if password is None:
        return 1
    minimum = max(MIN_ADMIN_PASSWORD, settings.min_password)
    if len(password) < minimum:
        print(f"ktulhu admin: the password must have at least {minimum} characters; nothing was written",
              file=sys.stderr)
        return 2
    if len(password) > MAX_PASSWORD:
        print(f"ktulhu admin: the password must have at most {MAX_PASSWORD} characters", file=sys.stderr)
        return 2
    path = settings.path(settings.admin_auth_file)
    try:
        write_admin_credentials(path, user, password)
    except OSError as exc:
        print(f"ktulhu admin: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"Admin credentials for {user!r} written to {path} (argon2 hash, mode 600). "
          "Sign in at /internal/admin.")
    return 0
