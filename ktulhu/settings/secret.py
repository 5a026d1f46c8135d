"""The development JWT secret: generated once into a git-ignored, mode-600 file under the server's
root, and picked up from there by later runs, so that app JWTs survive a restart without anyone
having to set JWT_SECRET (production must set it; `checks` enforces that)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import attrs

from .schema import Settings

__all__ = ["GENERATED", "JWT_SECRET_FILE", "MIN_JWT_SECRET_BYTES", "ensure_jwt_secret", "stored_jwt_secret"]

#: Where a development run keeps its generated JWT secret (git-ignored).
JWT_SECRET_FILE = ".ktulhu/jwt_secret"
#: The source `ktulhu config` shows for a generated secret.
GENERATED = f"generated ({JWT_SECRET_FILE})"
MIN_JWT_SECRET_BYTES = 32


def stored_jwt_secret(root: Path) -> str | None:
    """The secret an earlier development run generated under `root`, if any."""
    file = root / JWT_SECRET_FILE
    return file.read_text().strip() if file.is_file() else None


def ensure_jwt_secret(settings: Settings) -> tuple[Settings, bool]:
    """In development, generate the JWT secret once into a git-ignored file.

    Returns the settings to use and whether a new secret was written (the caller warns).
    """
    if settings.jwt_secret:
        return settings, False
    file = settings.root / JWT_SECRET_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it first: use theirs
        secret, created = file.read_text().strip(), False
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
        created = True
    sources = {**settings.sources, "JWT_SECRET": GENERATED}
    return attrs.evolve(settings, jwt_secret=secret, sources=sources), created
