"""Route llama.cpp's own log lines into Python logging (`ktulhu.llama`), at DEBUG except errors.

A decode that our own abort callback may stop makes llama.cpp log warnings and errors about the
aborted step; inside `expected_failures()` (per thread) those go to DEBUG, and the caller reports
real failures itself from the return code.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp

__all__ = ["expected_failures", "install"]

log = logging.getLogger("ktulhu.llama")
_GGML_LOG_LEVEL_WARN = 3
_GGML_LOG_LEVEL_ERROR = 4  # 5 is GGML_LOG_LEVEL_CONT: the rest of a progress line, kept at DEBUG
_installed: list[object] = []  # keeps the ctypes callback alive for the life of the process
_local = threading.local()


@contextmanager
def expected_failures() -> Iterator[None]:
    """llama.cpp's warnings and errors logged by this thread meanwhile are logged at DEBUG."""
    _local.quiet = True
    try:
        yield
    finally:
        _local.quiet = False


def install() -> None:
    if _installed:
        return

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace").rstrip()
        if not line:
            return
        if getattr(_local, "quiet", False):
            log.debug("%s", line)
        elif level == _GGML_LOG_LEVEL_ERROR:
            log.error("%s", line)
        elif level == _GGML_LOG_LEVEL_WARN:
            log.warning("%s", line)
        else:
            log.debug("%s", line)

    _installed.append(_callback)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
