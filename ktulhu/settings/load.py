"""Layered loading: each variable's first non-empty value among the process environment and the env
files (`ENV_FILES`, earlier wins), else the field's default; command-line overrides win over all.
Every value is parsed, then `checks` run, and every problem is raised at once in a `SettingsError`;
`Settings.sources` records where each value came from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from dotenv import dotenv_values

from .checks import check_models, check_secret, check_workers, read_api_keys
from .parse import InvalidValue, SettingsError
from .schema import Settings, setting_fields
from .show import quoted

__all__ = ["ENV_FILES", "load_settings"]

#: Env files in precedence order (earlier wins), relative to the server's root directory.
ENV_FILES = (".env", "config/payment.env", "config/llamacpp.env")
#: Older variables read when the newer one is unset anywhere.
_FALLBACKS = {"KTULHU_LOG": "RUST_LOG", "KTULHU_STORE": "KTULHU_DB_PATH"}

#: (source name, its variables), highest precedence first.
Layers = list[tuple[str, Mapping[str, str | None]]]


def load_settings(
    *, environ: Mapping[str, str] | None = None, root: Path | None = None, **overrides: Any
) -> Settings:
    """Build `Settings` from the environment and env files; raise `SettingsError` listing every problem.

    `overrides` (attribute name -> value) come from command-line options and win over everything.
    """
    environ = os.environ if environ is None else environ
    root = Path.cwd() if root is None else Path(root)
    layers = _layers(root, environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for f in setting_fields():
        env = f.metadata["env"]
        raw, source = _lookup(layers, env)
        if raw is None and env in _FALLBACKS:
            raw, source = _lookup(layers, _FALLBACKS[env])
            source = f"{source} ({_FALLBACKS[env]})" if raw is not None else source
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except InvalidValue as bad:
            problems.append(f"{env}={quoted(f, raw)} (from {source}): {bad.reason}; {bad.fix}")
            continue
        sources[env] = source
    for name, value in overrides.items():
        if value is None:
            continue
        field = attrs.fields_dict(Settings)[name]
        values[name] = value
        sources[field.metadata["env"]] = "command line"
    values.setdefault("env", "development")
    problems += check_secret(values, sources, root)
    problems += check_workers(values, sources, lambda name: _lookup(layers, name)[0], root)
    problems += read_api_keys(values, sources, root)
    problems += check_models(values, sources)
    if problems:
        raise SettingsError(problems)
    return Settings(root=root, sources=sources, **values)


def _layers(root: Path, environ: Mapping[str, str]) -> Layers:
    layers: Layers = [("environment", environ)]
    for name in ENV_FILES:
        file = root / name
        if file.is_file():
            layers.append((name, dotenv_values(file, interpolate=False)))
    return layers


def _lookup(layers: Layers, env: str) -> tuple[str | None, str]:
    """The first non-empty value of `env` in precedence order; empty strings count as unset."""
    for source, layer in layers:
        raw = layer.get(env)
        if raw is not None and raw.strip() != "":
            return raw, source
    return None, "default"
