"""`python -m bench.engine`: side-by-side engine benchmark in one run, on one model and thread count.

Systems: our engine (in-process, batched slots, prefix reuse), llama-server built from the same
llama.cpp sources (`-np N`, continuous batching, over loopback HTTP), and a baseline that copies the
original's design (a pool of single-sequence contexts, cache cleared per request). Scenarios: a
concurrency sweep, a 10-turn chat replay with a warm vs a cold prefix cache, and cancel latency.
Results go to bench/results/engine.json, docs/benchmarks.md and docs/benchmarks-engine.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import trio

from bench.paths import REPO
from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.sampling import SamplingParams
from ktulhu.engine.worker import physical_cores
from ktulhu.ports import free_port
from ktulhu.settings import load_settings

from . import baseline, llama_server, report
from .workload import Record, chat_prompt, percentile, show, summarise_rounds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per slot")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions per level")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--cancels", type=int, default=40)
    parser.add_argument("--no-llama-server", action="store_true", help="skip the llama-server comparison")
    parser.add_argument("--docs", type=Path, default=REPO / "docs",
                        help="where benchmarks.md and its plot are written")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engine.json")
    return parser.parse_args()


def engine_settings(args: argparse.Namespace, slots: int):
    return load_settings(environ={"KTULHU_SLOTS": str(slots), "LLAMA_CLI_CTX": str(args.ctx),
                                  "LLAMA_CLI_THREADS": str(args.threads), "KTULHU_QUEUE": "256"}, root=REPO)


async def with_engine(model: Model, args: argparse.Namespace, slots: int, body):
    engine = Engine(model, engine_settings(args, slots))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        try:
            return await body(engine)
        finally:
            nursery.cancel_scope.cancel()


async def ours_streams(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[list[Record], float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    records: list[Record] = []
    started = time.perf_counter()

    async def stream(tokens: list[int]) -> None:
        t0 = time.perf_counter()
        first = None
        with engine.generate(tokens, params) as gen:
            async for _ in gen:
                first = first or time.perf_counter()  # client-side arrival of the first text
        m = gen.metrics
        records.append(Record(ttft=(first or time.perf_counter()) - t0, gaps=m.gaps,
                              tokens=m.generated_tokens, seconds=m.finished - t0))

    async with trio.open_nursery() as nursery:
        for tokens in prompts:
            nursery.start_soon(stream, tokens)
    return records, time.perf_counter() - started


def prompt_tokens(engine: Engine, indices: range) -> list[list[int]]:
    return [list(engine.prompts.build([ChatMessage(**m) for m in chat_prompt(i)], n_ctx=engine.n_ctx_seq,
                                      max_tokens=64).tokens) for i in indices]


async def sweep(model: Model, args: argparse.Namespace, levels: list[int], server_binary: Path | None) -> dict:
    """Per level, the systems run in turn, `--rounds` times (interleaved, so drift hits all alike);
    tokens/s is the median round, latencies pool every round's requests."""
    results: dict[str, dict[int, Any]] = {"ours": {}, "llama_server": {}, "baseline": {}}
    for level in levels:
        engine = Engine(model, engine_settings(args, level))
        server = None
        if server_binary is not None:
            server = llama_server.LlamaServer(server_binary, Path(model.info.path), slots=level,
                                              n_ctx_seq=args.ctx, threads=args.threads, port=free_port(),
                                              gpu_layers=999 if model.info.n_gpu_layers < 0 else model.info.n_gpu_layers)
        pool = await trio.to_thread.run_sync(functools.partial(
            baseline.BaselinePool, model, contexts=level, n_ctx=args.ctx, threads=args.threads))
        runs: dict[str, list[tuple[list[Record], float]]] = {"ours": [], "llama_server": [], "baseline": []}
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                if server is not None:
                    await trio.to_thread.run_sync(server.wait_ready)
                for round_ in range(args.rounds):
                    warmup = prompt_tokens(engine, range(1000 * (round_ + 1), 1000 * (round_ + 1) + level))
                    prompts = prompt_tokens(engine, range(100 * round_, 100 * round_ + level))
                    await ours_streams(engine, warmup, 4)
                    runs["ours"].append(await ours_streams(engine, prompts, args.max_tokens))
                    if server is not None:
                        await llama_server.run_streams(server.base, warmup, 4)
                        runs["llama_server"].append(await llama_server.run_streams(server.base, prompts,
                                                                                   args.max_tokens))
                    runs["baseline"].append(await baseline.run_streams(pool, prompts, args.max_tokens))
                bookkeeping = engine.stats().workers[0].bookkeeping_share
                nursery.cancel_scope.cancel()
        finally:
            pool.close()
            if server is not None:
                server.close()
        for system, measured in runs.items():
            if measured:
                results[system][level] = summarise_rounds(measured)
                show(level, system, results[system][level])
        results["ours"][level]["python_bookkeeping_share"] = round(bookkeeping, 4)
    return results


async def chat_replay(model: Model, args: argparse.Namespace) -> dict:
    """TTFT of each turn of one conversation, with the prefix cache kept (warm) or dropped (cold)."""
    questions = [f"Turn {i}: tell me one more fact about the ocean, and keep it short." for i in range(args.turns)]

    async def replay(engine: Engine, cold: bool) -> list[dict]:
        history: list[ChatMessage] = []
        turns = []
        for question in questions:
            history.append(ChatMessage("user", question))
            if cold:
                engine.drop_cache()
            params = SamplingParams(temperature=0.0, max_tokens=32)
            started = time.perf_counter()
            first = None
            with await engine.chat(history, params, chat_id="replay") as gen:
                pieces = []
                async for piece in gen:
                    first = first or time.perf_counter()
                    pieces.append(piece)
            history.append(ChatMessage("assistant", "".join(pieces)))
            turns.append({"ttft_ms": round(((first or time.perf_counter()) - started) * 1000, 2),
                          "prompt_tokens": gen.metrics.prompt_tokens, "cached_tokens": gen.metrics.cached_tokens})
        return turns

    warm = await with_engine(model, args, 4, lambda engine: replay(engine, cold=False))
    cold = await with_engine(model, args, 4, lambda engine: replay(engine, cold=True))
    last = len(questions) - 1
    ratio = warm[last]["ttft_ms"] / cold[last]["ttft_ms"] if cold[last]["ttft_ms"] else None
    print(f"[replay] turn {last + 1} TTFT warm {warm[last]['ttft_ms']} ms, cold {cold[last]['ttft_ms']} ms "
          f"(ratio {ratio:.3f})", flush=True)
    return {"warm": warm, "cold": cold, "last_turn_ratio": round(ratio, 4) if ratio else None}


async def cancel_latency(model: Model, args: argparse.Namespace) -> dict:
    """Cancel at random points (during prefill and during decode) with 4 streams busy."""
    rng = random.Random(7)

    async def run(engine: Engine) -> dict:
        latencies: dict[str, list[float]] = {"decode": [], "prefill": []}
        long_prompt = [ChatMessage("user", "Summarise this: " + "the tide rises and falls twice a day. " * 60)]

        async def one(i: int) -> None:
            in_prefill = i % 4 == 0
            messages = long_prompt if in_prefill else [ChatMessage(**m) for m in chat_prompt(i)]
            with await engine.chat(messages, SamplingParams(max_tokens=400, ignore_eos=True)) as gen:
                if in_prefill:
                    while gen.metrics.admitted is None:
                        await trio.sleep(0.001)
                else:
                    wanted = rng.randrange(1, 12)
                    async for _ in gen:
                        wanted -= 1
                        if wanted <= 0:
                            break
            ended = trio.Event()
            gen.when_finished(ended.set)  # leaving `with` asked for the cancel; the slot frees at the next step
            await ended.wait()
            if gen.metrics.cancel_latency is not None:
                latencies["prefill" if in_prefill else "decode"].append(gen.metrics.cancel_latency)

        limiter = trio.Semaphore(4)

        async def limited(i: int) -> None:
            async with limiter:
                await one(i)

        async with trio.open_nursery() as nursery:
            for i in range(args.cancels):
                nursery.start_soon(limited, i)
        stats = engine.stats().workers[0]
        step_ms = stats.step_seconds / max(stats.steps, 1) * 1000
        every = latencies["decode"] + latencies["prefill"]
        return {
            "cancels": len(every),
            "p50_ms": round(percentile(every, 50) * 1000, 2),
            "p99_ms": round(percentile(every, 99) * 1000, 2),
            "decode_p99_ms": round(percentile(latencies["decode"], 99) * 1000, 2),
            "prefill_p99_ms": round(percentile(latencies["prefill"], 99) * 1000, 2),
            "mean_step_ms": round(step_ms, 2),
        }

    result = await with_engine(model, args, 4, run)
    print(f"[cancel] p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms (mean step {result['mean_step_ms']} ms)",
          flush=True)
    return result


async def main(args: argparse.Namespace) -> dict:
    levels = [int(x) for x in args.levels.split(",")]
    settings = load_settings(environ={}, root=REPO)
    model = await trio.to_thread.run_sync(Model.load, settings)
    server_binary = None
    server_note = "skipped (--no-llama-server)"
    if not args.no_llama_server:
        try:
            print("building llama-server from the pinned llama-cpp-python sources (once)...", flush=True)
            server_binary = await trio.to_thread.run_sync(llama_server.ensure_built)
            server_note = f"built from the llama.cpp sources of {llama_server.LLAMA_CPP_PYTHON}"
        except Exception as error:  # report and continue with the other systems
            server_note = f"unavailable: {error}"
            print(f"llama-server {server_note}", flush=True)
    try:
        results = {
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "threads": args.threads},
            "model": model.info.path.rsplit("/", 1)[-1],
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "ctx_per_slot": args.ctx,
            "llama_server": server_note,
            "sweep": await sweep(model, args, levels, server_binary),
            "chat_replay": await chat_replay(model, args),
            "cancel": await cancel_latency(model, args),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        model.close()
    return results


if __name__ == "__main__":
    arguments = parse_args()
    outcome = trio.run(main, arguments)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(outcome, indent=2) + "\n")
    arguments.docs.mkdir(parents=True, exist_ok=True)
    report.write(outcome, arguments.docs)
    print(f"wrote {arguments.out} and {arguments.docs / 'benchmarks.md'}")
