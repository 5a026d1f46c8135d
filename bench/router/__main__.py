"""Router benchmark: single-message latency and batched throughput.

    python -m bench.router [--dir models/intent_router] [--out bench/results/router.json]

Measures, on held-out messages:
- `single_sync`: latency of one `route_intent` call (tokenise + ONNX + rules) on the calling thread;
- `single_service`: latency of one awaited `Router.classify` (adds the worker-thread hop), one at a time;
- `batched_model`: classifications/s of `IntentModel.predict` on batches of 32;
- `batched_service`: classifications/s of many concurrent `Router.classify` calls, micro-batched.
Targets (issue 5): p50 <= 3 ms and p99 <= 15 ms single; >= 500 classifications/s batched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import trio

from ktulhu.router.dataset import load_split
from ktulhu.router.service import Router


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 3), "p99_ms": round(percentile(ms, 0.99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "max_ms": round(max(ms), 3)}


def bench_single_sync(router: Router, texts: list[tuple[str, str]], n: int) -> dict[str, float]:
    for text, lang in texts[:50]:
        router.classify_sync(text, lang)
    times = []
    for i in range(n):
        text, lang = texts[i % len(texts)]
        start = time.perf_counter()
        router.classify_sync(text, lang)
        times.append(time.perf_counter() - start)
    return summary_ms(times)


async def bench_single_service(router: Router, texts: list[tuple[str, str]], n: int) -> dict[str, float]:
    times = []
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        for i in range(n):
            text, lang = texts[i % len(texts)]
            start = time.perf_counter()
            await router.classify(text, lang)
            times.append(time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return summary_ms(times)


def bench_batched_model(router: Router, texts: list[tuple[str, str]], batch: int, rounds: int) -> dict[str, float]:
    assert router.model is not None
    plain = [t for t, _ in texts]
    total, start = 0, time.perf_counter()
    for r in range(rounds):
        chunk = [plain[(r * batch + i) % len(plain)] for i in range(batch)]
        router.model.predict(chunk)
        total += batch
    elapsed = time.perf_counter() - start
    return {"batch": batch, "classifications": total, "seconds": round(elapsed, 3),
            "per_second": round(total / elapsed, 1)}


async def bench_batched_service(router: Router, texts: list[tuple[str, str]], n: int, concurrency: int) -> dict[str, float]:
    done = 0
    send, receive = trio.open_memory_channel(n)
    for i in range(n):
        send.send_nowait(texts[i % len(texts)])
    send.close()

    async def worker():
        nonlocal done
        async for text, lang in receive:
            await router.classify(text, lang)
            done += 1

    async with trio.open_nursery() as outer:
        await outer.start(router.run)
        start = time.perf_counter()
        async with trio.open_nursery() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        elapsed = time.perf_counter() - start
        outer.cancel_scope.cancel()
    stats = router.statistics()
    return {"concurrency": concurrency, "classifications": done, "seconds": round(elapsed, 3),
            "per_second": round(done / elapsed, 1), "max_batch_seen": stats.max_batch_seen,
            "timeouts": stats.timeouts, "failures": stats.failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("models/intent_router"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/router.json"))
    parser.add_argument("--single", type=int, default=2000)
    parser.add_argument("--batched", type=int, default=8000)
    parser.add_argument("--parallel", type=int, default=2, help="concurrent batches (CapacityLimiter tokens)")
    args = parser.parse_args()

    texts = [(s.text, s.language) for s in load_split("heldout")]
    router = Router.load(args.dir, device="cpu", parallel=args.parallel)
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": {"dir": str(args.dir), "bytes": (args.dir / "model.onnx").stat().st_size},
        "single_sync": bench_single_sync(router, texts, args.single),
        "single_service": trio.run(bench_single_service, router, texts, args.single // 2),
        "batched_model": bench_batched_model(router, texts, 32, args.batched // 32),
        "batched_service": trio.run(bench_batched_service, Router.load(args.dir, device="cpu", parallel=args.parallel),
                                    texts, args.batched, 256),
        "targets": {"p50_ms": 3.0, "p99_ms": 15.0, "batched_per_second": 500},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
