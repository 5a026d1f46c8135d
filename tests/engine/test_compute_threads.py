"""llama.cpp's compute threads belong to a context, not to the thread that asks it for a graph.

Built with OpenMP, every thread that computed a graph kept a team of OpenMP threads for the rest of
its life; once the process held more of them than the CPU has cores, libgomp slept at every barrier
instead of spinning, and the chat context's decode steps became 2.5x slower after one embeddings
request. The build leaves OpenMP out (`native_build.NO_OPENMP`) and each context gets its own ggml
thread pool (`engine.threadpool`), freed with it: checked on two contexts computing on two threads.
"""

from __future__ import annotations

import os
import threading

import llama_cpp

from ktulhu.engine import embeddings
from ktulhu.engine.model import Model
from ktulhu.engine.sampling import SamplingParams


def _foreign_threads() -> set[int]:
    """This process's OS threads that Python did not start (native libraries' own threads)."""
    return {int(tid) for tid in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()}


def test_the_build_has_no_openmp() -> None:
    assert b"OPENMP = 1" not in llama_cpp.llama_print_system_info()


async def test_compute_threads_end_with_their_contexts(smol_model: Model, running_engine) -> None:
    before = _foreign_threads()
    async with running_engine(smol_model, KTULHU_SLOTS="1", LLAMA_CLI_THREADS="2") as engine, \
            embeddings.serving(engine, engine.settings) as embedder:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        prompt = engine.model.tokenize("Say hello.", special=False, add_bos=True)
        for _ in range(2):  # the decode thread, then another thread's context, then the decode thread again
            with engine.generate(prompt, params) as gen:
                async for _ in gen:
                    pass
            assert gen.metrics.generated_tokens == 4
            await embedder.embed(["hello there"])
        # each context's pool: the thread that asks for a graph computes too, beside one more
        assert len(_foreign_threads() - before) == 2
    assert _foreign_threads() <= before
