"""A ggml CPU thread pool per llama.cpp context, as llama-server attaches to its own.

Without one, llama.cpp (built without OpenMP, `native_build.NO_OPENMP`) starts its compute threads
for every graph, so every decode step, and joins them at its end. An attached pool keeps them:
between graphs they poll for the next one for a while (`POLL`), then sleep until it comes.
llama-cpp-python does not bind these functions, so they are called through ctypes.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import llama_cpp

__all__ = ["ThreadPool"]

#: ggml's GGML_MAX_N_THREADS: the length of a pool's CPU mask.
_MAX_THREADS = 512
#: ggml's polling level between graphs (0-100), llama-server's default.
POLL = 50


class _Params(ctypes.Structure):
    """ggml's `struct ggml_threadpool_params`."""

    _fields_ = [("cpumask", ctypes.c_bool * _MAX_THREADS), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


@functools.cache
def _functions():
    """ggml's and llama.cpp's pool functions, typed once per process."""
    libs = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(libs / "libggml-base.so"))
    cpu = ctypes.CDLL(str(libs / "libggml-cpu.so"))
    llama = ctypes.CDLL(str(libs / "libllama.so"))
    base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
    base.ggml_threadpool_params_default.restype = _Params
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_Params)]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_threadpool_free.restype = None
    llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    llama.llama_attach_threadpool.restype = None
    llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
    llama.llama_detach_threadpool.restype = None
    return base.ggml_threadpool_params_default, cpu.ggml_threadpool_new, cpu.ggml_threadpool_free, \
        llama.llama_attach_threadpool, llama.llama_detach_threadpool


class ThreadPool:
    """`n_threads` compute threads attached to `ctx` (decode and batch alike) until `close`, which
    must come before the context is freed."""

    def __init__(self, ctx: llama_cpp.llama_context_p, n_threads: int) -> None:
        defaults, new, self._free, attach, self._detach = _functions()
        params = defaults(n_threads)
        params.poll = POLL
        self._ctx = ctx
        self._pool = new(ctypes.byref(params))
        if not self._pool:
            raise MemoryError(f"ggml could not start a pool of {n_threads} threads")
        attach(ctx, self._pool, self._pool)

    def close(self) -> None:
        if self._pool:
            self._detach(self._ctx)
            self._free(self._pool)
            self._pool = None
