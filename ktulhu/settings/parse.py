"""Value parsers: one variable's text to a typed value, or `InvalidValue` saying what is wrong and
what to write instead. `SettingsError` carries those lines, one per variable, for the whole
configuration, so a misconfigured server never starts half-way.

Each parser is named for what it accepts; `schema` pairs them with variables.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable

from ..engine.worker_specs import WorkerSpec, WorkerSpecError, parse_workers

__all__ = [
    "InvalidValue",
    "SettingsError",
    "chat_store",
    "decimal",
    "device_name",
    "flag",
    "host_name",
    "http_url",
    "integer",
    "ip_networks",
    "log_spec",
    "one_of",
    "text",
    "worker_list",
]

_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


class SettingsError(Exception):
    """The configuration cannot be used; `problems` holds one human-readable line per variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class InvalidValue(ValueError):
    """Raised by a parser: `reason` says what is wrong, `fix` what to write instead."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    bounds = _bounds_text(lo, hi)

    def parse(raw: str) -> int:
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise InvalidValue("not a whole number", f"set a whole number{bounds}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InvalidValue(f"out of range{bounds}", f"set a whole number{bounds}")
        return value

    return parse


def decimal(lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    bounds = _bounds_text(lo, hi)

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise InvalidValue("not a number", f"set a decimal number{bounds}, e.g. 0.7") from None
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InvalidValue(f"out of range{bounds}", f"set a decimal number{bounds}")
        return value

    return parse


def _bounds_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" of at least {lo}"
    if hi is not None:
        return f" of at most {hi}"
    return ""


def one_of(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise InvalidValue("not one of the accepted values", "set one of: " + ", ".join(allowed))
        return value

    return parse


def flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidValue("not a yes/no value", "set 1 or 0")


def text(raw: str) -> str:
    if "\x00" in raw:
        raise InvalidValue("contains a NUL byte", "remove control characters")
    return raw.strip()


def http_url(raw: str) -> str:
    value = text(raw)
    if not re.match(r"^https?://[^\s/]+", value):
        raise InvalidValue("not an http(s) URL", "set a full URL such as https://example.com/payment/success")
    return value


def host_name(raw: str) -> str:
    value = text(raw)
    if not value or not re.fullmatch(r"[A-Za-z0-9_.:\-\[\]]+", value):
        raise InvalidValue("not a host name or IP address", "set e.g. 0.0.0.0, 127.0.0.1 or ::")
    return value


def device_name(raw: str) -> str:
    value = raw.strip().lower()
    if not re.fullmatch(r"auto|cpu|(cuda|gpu)(:\d+)?", value):
        raise InvalidValue("not a device name", "set auto, cpu, cuda or cuda:N")
    return value


def ip_networks(raw: str) -> str:
    """Comma-separated addresses or CIDR networks, normalised (`10.0.0.0/8,::1/128`); empty = none."""
    networks = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        if "%" in entry or not entry.isascii():
            raise InvalidValue(f"{entry[:60]!r} is not an IP address or CIDR network",
                               "list addresses or networks without zone ids, e.g. 127.0.0.1,10.0.0.0/8,fd00::/8")
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise InvalidValue(f"{entry[:60]!r} is not an IP address or CIDR network",
                                   "set comma-separated addresses or networks of your reverse proxies, "
                                   "e.g. 127.0.0.1,10.0.0.0/8,fd00::/8") from None
            raise InvalidValue(f"{entry[:60]!r} has bits set after the /{loose.prefixlen} prefix",
                               f"write the network as {loose} (or the proxy's single address)") from None
    return ",".join(str(n) for n in networks)


def worker_list(raw: str) -> tuple[WorkerSpec, ...]:
    try:
        return parse_workers(raw)
    except WorkerSpecError as bad:
        raise InvalidValue(bad.reason, bad.fix) from None


def chat_store(raw: str) -> str:
    """A RocksDB directory, or a postgresql:// (postgres://) URL whose shape is checked here (the
    server is reached when the store opens). Messages never show the password."""
    value = text(raw)
    fix = "set a directory (e.g. chatdb) or postgresql://USER:PASSWORD@HOST:5432/DATABASE"
    # imported here: the `ktulhu.store` package loads its database drivers
    from ..store.location import InvalidStoreUrl, PgUrl, is_postgres_url, looks_like_url

    if is_postgres_url(value):
        try:
            PgUrl.parse(value)
        except InvalidStoreUrl as error:
            raise InvalidValue(f"not a usable PostgreSQL URL: {error}",
                               fix + " (percent-encode special characters of the password, e.g. %40 for @)") from None
    elif looks_like_url(value):
        raise InvalidValue("a URL of an unknown kind: the store is a directory or a postgresql:// URL", fix)
    return value


def log_spec(raw: str) -> str:
    """`level[,logger=level...]`, e.g. `info,ktulhu.engine=debug` (RUST_LOG-like)."""
    value = raw.strip().lower()
    for part in filter(None, (p.strip() for p in value.split(","))):
        level = part.split("=", 1)[-1]
        if level not in _LOG_LEVELS:
            raise InvalidValue(
                f"unknown log level {level!r}",
                "use level[,logger=level], levels: " + "/".join(_LOG_LEVELS),
            )
    return value or "info"
