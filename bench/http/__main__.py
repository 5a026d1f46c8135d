"""`python -m bench.http`: Ktulhu's local engine against llama-server, end to end over HTTP.

Both servers run the default model on this machine with the same slots, context per slot and
threads; both stay up, and only one is driven at a time (they would share the CPUs). The same greedy
streaming `/v1/chat/completions` requests (an explicit system prompt, so both render identical
ChatML; `--max-tokens` each) go to each at 1/4/8/16 concurrent streams, in interleaved rounds:
`unique` prompts are new to both servers, `repeated` ones are the previous round's prompts sent
again (what a prefix cache serves). Per system and level: aggregate generated tokens/s (median
round), time to first token p50 and inter-token gap p99, as the client sees them.
Results: bench/results/http.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.engine.llama_server import LlamaServer, ensure_built
from bench.engine.workload import Record, TokenClock, summarise_rounds
from bench.paths import REPO
from ktulhu.local_cluster import Member, http_ok
from ktulhu.ports import free_port
from ktulhu.settings import load_settings

SYSTEM = "You are a helpful assistant. Answer in detail."
TOPICS = ["the sea", "mountains", "a city at night", "an old library", "the desert", "a rainy forest",
          "a space station", "a small village", "the northern lights", "a busy market", "a lighthouse",
          "a train journey", "a winter garden", "a river delta", "a volcano", "a coral reef"]
KEY = "bench-" + "k" * 40


def messages(i: int, round_: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Round {round_}, request {i}: describe {TOPICS[i % len(TOPICS)]}."}]


async def stream(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Record:
    clock = TokenClock(time.perf_counter())
    tokens = 0
    async with http.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                clock.tick()
    return clock.record(tokens or len(clock.gaps) + (clock.first is not None))


async def batch(base: str, level: int, round_: int, max_tokens: int) -> tuple[list[Record], float]:
    records: list[Record] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=level + 2)) as http:
        async def one(i: int) -> None:
            body = {"model": "default", "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0.0, "max_tokens": max_tokens, "messages": messages(i, round_)}
            records.append(await stream(http, f"{base}/v1/chat/completions", body))

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(level):
                nursery.start_soon(one, i)
        return records, time.perf_counter() - started


async def compare(systems: dict[str, str], levels: list[int], rounds: int, max_tokens: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for level in levels:
        runs: dict[str, dict[str, list]] = {name: {"unique": [], "repeated": []} for name in systems}
        for round_ in range(rounds):
            for name, base in systems.items():  # interleaved: each round runs both systems in turn
                tag = level * 1000 + round_
                runs[name]["unique"].append(await batch(base, level, tag, max_tokens))
                runs[name]["repeated"].append(await batch(base, level, tag, max_tokens))
        results[str(level)] = {name: {kind: summarise_rounds(rs) for kind, rs in kinds.items()}
                               for name, kinds in runs.items()}
        for kind in ("unique", "repeated"):
            ours, theirs = (results[str(level)][name][kind] for name in systems)
            print(f"[{level:>2} streams, {kind:>8}] ktulhu {ours['tokens_per_s']} tok/s, ttft p50 "
                  f"{ours['ttft_p50_ms']} ms, itl p99 {ours['itl_p99_ms']} ms | llama-server "
                  f"{theirs['tokens_per_s']} tok/s, ttft p50 {theirs['ttft_p50_ms']} ms, itl p99 "
                  f"{theirs['itl_p99_ms']} ms", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "http.json")
    args = parser.parse_args()
    model = load_settings().model_file
    levels = [int(level) for level in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="ktulhu-http-") as tmp:
        root = Path(tmp)
        keys = root / "keys"
        keys.write_text(f"bench paid {KEY}\n")
        keys.chmod(0o600)
        port = free_port()
        ours = Member("ktulhu", [sys.executable, "-m", "ktulhu", "serve", "--host", "127.0.0.1", "--port", str(port)],
                      root / "ktulhu.log", http_ok(f"http://127.0.0.1:{port}/readyz"), url=f"http://127.0.0.1:{port}",
                      cwd=REPO, env={"KTULHU_STORE": str(root / "chatdb"), "KTULHU_SLOTS": str(args.slots),
                                     "LLAMA_CLI_CTX": str(args.ctx), "LLAMA_CLI_THREADS": str(args.threads),
                                     "KTULHU_API_KEYS_FILE": str(keys), "KTULHU_QUEUE": "1024",
                                     "KTULHU_LOG": "warning"})
        theirs = LlamaServer(ensure_built(), model, slots=args.slots, n_ctx_seq=args.ctx, threads=args.threads,
                             port=free_port())
        try:
            ours.start()
            ours.wait_ready()
            theirs.wait_ready()
            results = trio.run(compare, {"ktulhu": ours.url, "llama-server": theirs.base}, levels, args.rounds,
                               args.max_tokens)
        finally:
            ours.stop()
            theirs.close()
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "model": model.name},
              "slots": args.slots, "ctx": args.ctx, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "levels": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
