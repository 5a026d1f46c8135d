"""Checks `load_settings` runs once every value has parsed: rules across variables (production needs
JWT_SECRET, KTULHU_WORKERS implies remote mode, KTULHU_MODELS names) and the files variables name
(the generated JWT secret, worker keys, KTULHU_API_KEYS_FILE). Each takes the parsed `values` and
their `sources`, may complete `values`, and returns problem lines, so that all are reported together.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.model_specs import default_name, parse_models
from ..engine.worker_specs import resolve_keys
from .schema import default_model_path
from .secret import GENERATED, MIN_JWT_SECRET_BYTES, stored_jwt_secret
from .show import mask

__all__ = ["check_models", "check_secret", "check_workers", "read_api_keys"]


def check_secret(values: dict[str, Any], sources: dict[str, str], root: Path) -> list[str]:
    """Production needs JWT_SECRET; a set one must be long enough; else a generated one is used."""
    secret = values.get("jwt_secret", "")
    if values["env"] == "production" and not secret:
        return [("JWT_SECRET is not set: KTULHU_ENV=production requires it; set JWT_SECRET to a random "
                 f"string of at least {MIN_JWT_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)")]
    if secret and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        return [(f"JWT_SECRET={mask(secret)} (from {sources['JWT_SECRET']}): shorter than "
                 f"{MIN_JWT_SECRET_BYTES} bytes; set a random string of at least {MIN_JWT_SECRET_BYTES} "
                 "bytes (e.g. `openssl rand -hex 32`)")]
    if not secret:
        stored = stored_jwt_secret(root)
        if stored is not None:
            values["jwt_secret"] = stored
            sources["JWT_SECRET"] = GENERATED
    return []


def check_workers(values: dict[str, Any], sources: dict[str, str],
                  lookup: Callable[[str], str | None], root: Path) -> list[str]:
    """KTULHU_WORKERS alone implies remote mode; remote mode needs workers; keys are read here
    (`lookup` finds a `key=env:VAR` variable in the environment and env files)."""
    workers = values.get("workers", ())
    if "engine_mode" not in values and workers:
        values["engine_mode"] = "remote"
        sources["KTULHU_ENGINE"] = "implied by KTULHU_WORKERS"
    if values.get("engine_mode") != "remote":
        return []
    if not workers:
        return [("KTULHU_ENGINE=remote but KTULHU_WORKERS is not set; list the inference servers, e.g. "
                 "KTULHU_WORKERS=http://10.0.0.5:8080|slots=4,http://10.0.0.6:8080 (or set KTULHU_ENGINE=local)")]
    values["workers"], problems = resolve_keys(workers, lookup, root)
    return problems


def check_models(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """One line per fault of KTULHU_MODELS (syntax, names); missing files are `check_runtime`'s."""
    raw = values.get("models", "")
    if not raw:
        return []
    name = default_name(values.get("model_path", default_model_path()))
    source = sources.get("KTULHU_MODELS", "command line")
    return [f"KTULHU_MODELS (from {source}): {problem}" for problem in parse_models(raw, default_name=name)[1]]


def read_api_keys(values: dict[str, Any], sources: dict[str, str], root: Path) -> list[str]:
    """Read KTULHU_API_KEYS_FILE into `static_keys`; one problem line per fault of the file."""
    name = values.get("api_keys_file", "")
    if not name:
        return []
    from ..auth.key_file import KeyFileError, load_key_file

    path = Path(name).expanduser()
    try:
        values["static_keys"] = load_key_file(path if path.is_absolute() else root / path)
    except KeyFileError as error:
        source = sources.get("KTULHU_API_KEYS_FILE", "command line")
        return [f"KTULHU_API_KEYS_FILE={name!r} (from {source}): {problem}" for problem in error.problems]
    return []
