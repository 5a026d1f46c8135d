"""llama.cpp's `llama-server`, built from the llama.cpp sources inside the pinned llama-cpp-python
sdist (so both sides run the same llama.cpp), started on loopback and driven over HTTP."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import trio

from ktulhu import native_build

from .workload import Record, TokenClock

LLAMA_CPP_PYTHON = native_build.LLAMA_CPP_PYTHON


def ensure_built() -> Path:
    """Path of a built `llama-server`: same sources, flags and GPU variant as this environment's
    llama-cpp-python (built once per machine into the build cache)."""
    return native_build.llama_server((native_build.read_marker() or {}).get("gpu", "cpu"))


class LlamaServer:
    """One llama-server process with `slots` parallel slots (continuous batching on)."""

    def __init__(self, binary: Path, model: Path, *, slots: int, n_ctx_seq: int, threads: int, port: int,
                 gpu_layers: int = 0) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
             "-c", str(slots * n_ctx_seq), "-t", str(threads), "-tb", str(threads), "-b", "512", "-ub", "512",
             "--no-webui", "-ngl", str(gpu_layers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("llama-server did not become ready")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def complete(client: httpx.AsyncClient, base: str, tokens: list[int], max_tokens: int) -> Record:
    """One streamed greedy completion of exactly `max_tokens` tokens."""
    body = {"prompt": tokens, "n_predict": max_tokens, "temperature": 0.0, "stream": True,
            "cache_prompt": True, "ignore_eos": True}
    clock = TokenClock(time.perf_counter())
    count = 0
    async with client.stream("POST", f"{base}/completion", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("stop"):
                count = chunk.get("timings", {}).get("predicted_n", count)
                break
            clock.tick()
            count += 1
    return clock.record(count)


async def run_streams(base: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[Record], float]:
    records: list[Record] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(prompts) + 4)) as client:
        started = time.perf_counter()

        async def stream(i: int) -> None:
            records.append(await complete(client, base, prompts[i], max_tokens))

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(stream, i)
        return records, time.perf_counter() - started
