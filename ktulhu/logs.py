"""Logging set-up from `KTULHU_LOG` (`level[,logger=level...]`) in text or JSON lines.

User text never goes to INFO: modules log ids, sizes and timings at INFO and keep message content
for DEBUG of their own logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["configure_logging"]

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
# Chatty third-party loggers are quieter than ours unless named explicitly.
_QUIET = {"hypercorn.access": logging.WARNING, "httpx": logging.WARNING, "httpcore": logging.WARNING}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and `extra` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD:
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(spec: str, fmt: str = "text") -> None:
    """Apply a parsed `KTULHU_LOG` spec (already validated by settings) to the root logger."""
    root_level = logging.INFO
    per_logger: dict[str, int] = dict(_QUIET)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            name, level = part.split("=", 1)
            per_logger[name.strip()] = _LEVELS[level.strip()]
        else:
            root_level = _LEVELS[part]
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    for name, level in per_logger.items():
        logging.getLogger(name).setLevel(level)
