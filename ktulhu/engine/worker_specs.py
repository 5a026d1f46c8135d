"""`KTULHU_WORKERS`: the OpenAI-compatible inference servers a remote-mode front-end sends prompts to.

Syntax: workers separated by commas, each a base URL followed by `|name=value` options::

    http://10.0.0.5:8080|slots=4|key=env:W1_KEY,https://gpu2.internal/llm|slots=8|model=qwen2.5-7b

- the URL: `http://` or `https://`, a host, an optional port and path prefix (a trailing `/v1` is
  dropped: requests go to `<url>/v1/chat/completions`); no user name, password, query or fragment.
- `slots=N`: requests sent to this worker at once (its `--parallel`); default `KTULHU_SLOTS`.
- `key=env:VAR` (read from the environment or the env files), `key=file:PATH` (the file's first
  line) or `key=VALUE`: sent as `Authorization: Bearer ...`. Keys are never printed.
- `model=NAME`: the `model` field of requests (vLLM, SGLang and Ollama need the served name);
  default: the first model the worker lists at `/v1/models`.

This module parses only; it imports nothing of the engine so `ktulhu.settings` can use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import attrs

__all__ = ["MAX_WORKERS", "WorkerSpec", "WorkerSpecError", "parse_workers", "resolve_keys", "show_workers"]

MAX_WORKERS = 64
MAX_SLOTS = 1024
EXAMPLE = "http://10.0.0.5:8080|slots=4|key=env:W1_KEY,http://10.0.0.6:8080"
_OPTIONS = ("slots", "key", "model")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class WorkerSpecError(ValueError):
    """`reason` says what is wrong with the value, `fix` what to write instead."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


@attrs.frozen
class WorkerSpec:
    """One worker as configured. `url` carries no credentials (it is the metrics label)."""

    url: str
    slots: int | None = None
    #: How the key was given, safe to show: "env:VAR", "file:PATH", "literal" or "" (none).
    key_source: str = ""
    #: The key itself once resolved (`resolve_keys`); never shown.
    key: str | None = attrs.field(default=None, repr=False)
    model: str | None = None

    def show(self) -> str:
        parts = [self.url]
        if self.slots is not None:
            parts.append(f"slots={self.slots}")
        if self.key_source:
            parts.append("key=***" if self.key_source == "literal" else f"key={self.key_source}")
        if self.model:
            parts.append(f"model={self.model}")
        return "|".join(parts)


def show_workers(value: object) -> str:
    """A `KTULHU_WORKERS` value (raw text or parsed) with literal keys masked."""
    if isinstance(value, str):
        try:
            value = parse_workers(value)
        except WorkerSpecError:
            masked = re.sub(r"(key=)(?!env:|file:)[^|,]*", r"\1***", value)
            return re.sub(r"://[^/@,|]*@", "://***@", masked)
    if isinstance(value, tuple):
        return ",".join(spec.show() if isinstance(spec, WorkerSpec) else str(spec) for spec in value)
    return "" if value is None else str(value)


def parse_workers(raw: str) -> tuple[WorkerSpec, ...]:
    """Parse the list; raise `WorkerSpecError` naming the first bad entry. Keys stay unresolved."""
    if "\x00" in raw:
        raise WorkerSpecError("contains a NUL byte", f"list worker URLs, e.g. {EXAMPLE}")
    specs: list[WorkerSpec] = []
    for number, entry in enumerate((part.strip() for part in raw.split(",")), start=1):
        if not entry:
            continue
        specs.append(_parse_entry(entry, number))
    if len(specs) > MAX_WORKERS:
        raise WorkerSpecError(f"{len(specs)} workers", f"list at most {MAX_WORKERS}")
    seen: set[str] = set()
    for spec in specs:
        if spec.url in seen:
            raise WorkerSpecError(f"{spec.url} is listed twice", "list each worker once")
        seen.add(spec.url)
    return tuple(specs)


def _parse_entry(entry: str, number: int) -> WorkerSpec:
    url_text, *options = (part.strip() for part in entry.split("|"))
    where = f"worker {number}"
    url = _base_url(url_text, where)
    fields: dict[str, object] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or name not in _OPTIONS:
            raise WorkerSpecError(f"{where} ({url}): unknown option {option[:40]!r}",
                                  "use |slots=N, |key=env:VAR (or file:PATH) and |model=NAME")
        if name in fields or (name == "key" and "key_source" in fields):
            raise WorkerSpecError(f"{where} ({url}): {name} given twice", f"give {name} once")
        if name == "slots":
            if not value.isdigit() or not 1 <= int(value) <= MAX_SLOTS:
                raise WorkerSpecError(f"{where} ({url}): slots={value[:20]!r} is not a whole number from 1 "
                                      f"to {MAX_SLOTS}", "set slots to the worker's --parallel, e.g. slots=4")
            fields["slots"] = int(value)
        elif name == "key":
            fields.update(_key(value, where, url))
        else:
            if not value or not value.isprintable():
                raise WorkerSpecError(f"{where} ({url}): empty model name", "set model=NAME or leave it out")
            fields["model"] = value
    return WorkerSpec(url, **fields)  # type: ignore[arg-type]


def _base_url(text: str, where: str) -> str:
    fix = f"write a base URL such as http://10.0.0.5:8080; e.g. {EXAMPLE}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise WorkerSpecError(f"{where}: {text[:80]!r} is not a URL", fix) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WorkerSpecError(f"{where}: {text[:80]!r} is not an http(s) URL", fix)
    if parts.username is not None or parts.password is not None:
        raise WorkerSpecError(f"{where}: the URL carries credentials",
                              "remove them from the URL and give the key as |key=env:VAR")
    if parts.query or parts.fragment or "#" in text:
        raise WorkerSpecError(f"{where}: {text[:80]!r} has a query or fragment", fix)
    if any(c.isspace() for c in text) or not text.isascii():
        raise WorkerSpecError(f"{where}: {text[:80]!r} contains spaces or non-ASCII characters", fix)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{path}"


def _key(value: str, where: str, url: str) -> dict[str, object]:
    if value.startswith("env:"):
        name = value[4:]
        if not _ENV_NAME.fullmatch(name):
            raise WorkerSpecError(f"{where} ({url}): key=env:{name[:40]!r} is not a variable name",
                                  "write key=env:NAME, e.g. key=env:W1_KEY")
        return {"key_source": value}
    if value.startswith("file:"):
        if not value[5:]:
            raise WorkerSpecError(f"{where} ({url}): key=file: without a path", "write key=file:/path/to/key")
        return {"key_source": value}
    if not value or not value.isprintable():
        raise WorkerSpecError(f"{where} ({url}): empty key", "write key=env:VAR, key=file:PATH or leave it out")
    return {"key_source": "literal", "key": value}


def resolve_keys(specs: Iterable[WorkerSpec], lookup: Callable[[str], str | None],
                 root: Path) -> tuple[tuple[WorkerSpec, ...], list[str]]:
    """Read `env:`/`file:` keys (`lookup` finds a variable in the environment and env files; files
    are relative to `root`). Returns the resolved specs and one problem line per key not found."""
    resolved: list[WorkerSpec] = []
    problems: list[str] = []
    for spec in specs:
        source = spec.key_source
        key = spec.key
        if source.startswith("env:"):
            key = (lookup(source[4:]) or "").strip() or None
            if key is None:
                problems.append(f"KTULHU_WORKERS: the key of {spec.url} is read from {source[4:]}, which is not "
                                f"set; set {source[4:]} or change key=")
        elif source.startswith("file:"):
            path = Path(source[5:]).expanduser()
            path = path if path.is_absolute() else root / path
            try:
                lines = path.read_text().strip().splitlines()
                key = lines[0].strip() if lines else None
            except (OSError, UnicodeDecodeError) as error:
                problems.append(f"KTULHU_WORKERS: the key of {spec.url} cannot be read from {path}: "
                                f"{error.strerror if isinstance(error, OSError) else error}; fix the file or key=")
                key = None
            else:
                if not key:
                    problems.append(f"KTULHU_WORKERS: the key file of {spec.url} ({path}) is empty; write the key "
                                    "into it")
        resolved.append(attrs.evolve(spec, key=key))
    return tuple(resolved), problems
