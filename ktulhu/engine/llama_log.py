"""Route llama.cpp's own log lines into Python logging (`ktulhu.llama`), at DEBUG except errors."""

from __future__ import annotations

import ctypes
import logging

import llama_cpp

__all__ = ["install"]

log = logging.getLogger("ktulhu.llama")
_GGML_LOG_LEVEL_WARN = 3
_GGML_LOG_LEVEL_ERROR = 4  # 5 is GGML_LOG_LEVEL_CONT: the rest of a progress line, kept at DEBUG
_installed: list[object] = []  # keeps the ctypes callback alive for the life of the process


def install() -> None:
    if _installed:
        return

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace").rstrip()
        if not line:
            return
        if level == _GGML_LOG_LEVEL_ERROR:
            log.error("%s", line)
        elif level == _GGML_LOG_LEVEL_WARN:
            log.warning("%s", line)
        else:
            log.debug("%s", line)

    _installed.append(_callback)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
