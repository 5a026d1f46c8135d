"""Static API keys from `KTULHU_API_KEYS_FILE`, for tools configured with a fixed key (Open WebUI,
the `openai` CLI) on a server where nobody signs up over HTTP.

The file holds one key per line, `NAME ROLE SECRET` separated by spaces or tabs; blank lines and
lines starting with `#` are ignored. It is read once, when the settings load, so a bad file stops
the server before it serves: a file other users may read or write, a malformed line, an unknown
role, a secret shorter than `MIN_SECRET_CHARS`, a repeated name or secret are all refused, each
problem naming its line (never the secret).

Only a SHA-256 of each secret is kept in memory. A presented credential is hashed and compared with
every entry with `hmac.compare_digest`, without stopping at a match, so the time taken says nothing
about which key (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import attrs

__all__ = ["MAX_NAME_CHARS", "MIN_SECRET_CHARS", "ROLES", "KeyFileError", "StaticKey", "check_name",
           "load_key_file", "match_static_key", "parse_keys"]

MIN_SECRET_CHARS = 32
MAX_SECRET_CHARS = 512
MAX_NAME_CHARS = 64
#: A keys file is a short list; anything bigger is a mistake (or not the file meant).
MAX_FILE_BYTES = 1 << 20
#: The accepted roles (as `store.records.ROLES`; kept here so settings can load without the store).
ROLES = ("free", "paid", "admin")
#: Stored API keys start so (`auth.api_keys.KEY_PREFIX`): such a secret would never be looked up here.
_STORED_PREFIX = "ktk_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FIELDS = re.compile(r"[ \t]+")


class KeyFileError(Exception):
    """The keys file cannot be used; `problems` holds one line per problem (no secrets in them)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@attrs.frozen
class StaticKey:
    """One key of the file: its name (the service account it acts as), role and secret's SHA-256."""

    name: str
    role: str
    digest: str = attrs.field(repr=False)


def check_name(name: str) -> str | None:
    """Why `name` cannot name a key (None: it can). Names are short ASCII words, so that they are
    safe in the file format, in listings and in logs."""
    shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
    if not name:
        return "the name is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"the name {shown} is longer than {MAX_NAME_CHARS} characters"
    if not _NAME.fullmatch(name):
        return (f"the name {shown} is not allowed: use letters A-Z a-z, digits and . _ - "
                "(starting with a letter or digit)")
    return None


def _digest(secret: str) -> str:
    # surrogatepass: a credential from a query string may hold lone surrogates; it must hash, not raise
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _check_secret(secret: str) -> str | None:
    if len(secret) < MIN_SECRET_CHARS:
        return (f"the secret has {len(secret)} characters, fewer than {MIN_SECRET_CHARS}; "
                "generate one with `openssl rand -hex 32`")
    if len(secret) > MAX_SECRET_CHARS:
        return f"the secret is longer than {MAX_SECRET_CHARS} characters"
    if not (secret.isascii() and secret.isprintable()):
        return "the secret has characters other than printable ASCII"
    if secret.startswith(_STORED_PREFIX):
        return f"the secret starts with {_STORED_PREFIX!r}, which marks keys made by the server; choose another"
    return None


def _read(path: Path) -> str:
    """The file's text; refused unless it is a regular file only its owner (and group) can read."""
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang the start-up
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise KeyFileError([f"cannot open {path}: {error.strerror}"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError([f"{path} is not a regular file"])
        mode = stat.S_IMODE(info.st_mode)
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise KeyFileError([f"{path} can be read or written by every user (mode {mode:04o}); "
                                f"run `chmod 600 {path}`"])
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
        raw = b"".join(chunks)
    except OSError as error:
        raise KeyFileError([f"cannot read {path}: {error.strerror}"]) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise KeyFileError([f"{path} is larger than {MAX_FILE_BYTES} bytes; it should hold one short line per key"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError([f"{path} is not UTF-8 text"]) from None


def parse_keys(text: str, where: str = "the keys file") -> tuple[StaticKey, ...]:
    """The keys of a file's `text`; raises `KeyFileError` listing every bad line."""
    keys: list[StaticKey] = []
    problems: list[str] = []
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        fields = _FIELDS.split(line)
        if len(fields) != 3:
            problems.append(f"{where} line {number}: expected `NAME ROLE SECRET`, found {len(fields)} "
                            f"field{'s' if len(fields) != 1 else ''}")
            continue
        name, role, secret = fields
        bad = check_name(name)
        if bad is not None:
            problems.append(f"{where} line {number}: {bad}")
            continue
        if role not in ROLES:
            shown = repr(role[:20]) + ("..." if len(role) > 20 else "")
            problems.append(f"{where} line {number} ({name}): unknown role {shown}; use one of {', '.join(ROLES)}")
            continue
        bad = _check_secret(secret)
        if bad is not None:
            problems.append(f"{where} line {number} ({name}): {bad}")
            continue
        digest = _digest(secret)
        if name in names:
            problems.append(f"{where} line {number}: the name {name!r} is already used on line {names[name]}")
            continue
        if digest in digests:
            problems.append(f"{where} line {number} ({name}): the same secret as line {digests[digest]}; "
                            "give every key its own secret")
            continue
        names[name] = digests[digest] = number
        keys.append(StaticKey(name=name, role=role, digest=digest))
    if problems:
        raise KeyFileError(problems)
    return tuple(keys)


def load_key_file(path: Path) -> tuple[StaticKey, ...]:
    """Read and check the keys file at `path`; raises `KeyFileError`."""
    return parse_keys(_read(path), str(path))


def match_static_key(keys: Iterable[StaticKey], credential: str) -> StaticKey | None:
    """The key whose secret is `credential`, or None; every key is compared, in constant time."""
    digest = _digest(credential)
    found: StaticKey | None = None
    for key in keys:
        if hmac.compare_digest(key.digest, digest) and found is None:
            found = key
    return found
