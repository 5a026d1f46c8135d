"""`KTULHU_MODELS`: the GGUFs served besides the default one (`LLAMA_CLI_MODEL`).

Syntax: comma-separated `NAME=PATH[|ctx=N][|slots=N]`, e.g.
`qwen=models/qwen2.5-0.5b.gguf|ctx=4096,tiny=/srv/tiny.gguf|slots=1`. NAME is 1-64 characters from
`A-Z a-z 0-9 . _ : -`; it is what a request's `model` field says to pick that model.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

__all__ = ["ModelSpec", "parse_models"]

NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_OPTIONS = {"ctx": (128, 1 << 20), "slots": (1, 256)}


@attrs.frozen
class ModelSpec:
    """One configured model: its name, its GGUF (relative paths against the server root), and the
    context per slot and slots per context when they differ from `LLAMA_CLI_CTX` / `KTULHU_SLOTS`."""

    name: str
    path: str
    ctx: int | None = None
    slots: int | None = None


def parse_models(raw: str, *, default_name: str) -> tuple[tuple[ModelSpec, ...], list[str]]:
    """The specs of `raw` and one problem line per fault (bad syntax, bad name, duplicate name, a
    name that is the default model's)."""
    specs: list[ModelSpec] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(raw.split(",")):
        item = item.strip()
        if not item:
            continue
        where = f"entry {index + 1} ({item[:80]!r})"
        head, *options = item.split("|")
        name, sep, path = head.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            problems.append(f"{where}: not NAME=PATH; write e.g. tiny=models/tiny.gguf|ctx=2048")
            continue
        if not NAME.fullmatch(name):
            problems.append(f"{where}: the name {name[:80]!r} is not 1-64 characters from A-Z a-z 0-9 . _ : -")
            continue
        if name in seen:
            problems.append(f"{where}: the name {name!r} is used twice; give every model its own name")
            continue
        if name == default_name:
            problems.append(f"{where}: {name!r} is already the default model's name (the stem of "
                            "LLAMA_CLI_MODEL); choose another")
            continue
        seen.add(name)
        values: dict[str, int] = {}
        for option in options:
            key, sep, value = option.partition("=")
            key = key.strip()
            if key not in _OPTIONS or not sep:
                problems.append(f"{where}: unknown option {option.strip()[:40]!r}; use ctx=N or slots=N")
                continue
            lo, hi = _OPTIONS[key]
            try:
                number = int(value.strip(), 10)
            except ValueError:
                number = lo - 1
            if not lo <= number <= hi:
                problems.append(f"{where}: {key} must be a whole number from {lo} to {hi}")
                continue
            values[key] = number
        specs.append(ModelSpec(name, path, values.get("ctx"), values.get("slots")))
    return tuple(specs), problems


def default_name(model_path: str) -> str:
    """The default model's name: its file's stem (what `/v1/models` has always listed)."""
    return Path(model_path).stem
