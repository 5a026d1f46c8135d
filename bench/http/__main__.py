"""`python -m bench.http`: Ktulhu's local engine against llama-server, end to end over HTTP.

Both servers run the default model on this machine with the same slots, context per slot and
threads; both stay up, and only one is driven at a time (they would share the CPUs). The same greedy
streaming `/v1/chat/completions` requests (an explicit system prompt, so both render identical
ChatML; `--max-tokens` each) go to each at 1/4/8/16 concurrent streams, in interleaved rounds:
`unique` prompts are new to both servers, `repeated` ones are the previous round's prompts sent
again (what a prefix cache serves). Per system and level: aggregate generated tokens/s (median
round), time to first token p50 and inter-token gap p99, as the client sees them.

A third system in the same rounds is Ktulhu's own `/ws` on the same server: the same user messages
as `/ws` prompts, one registered socket per stream, each prompt a new chat (so `repeated` is the
same text again in a new chat, served by the prefix cache across slots). `/ws` prompts get
Ktulhu's routed system prompt, not the explicit one, so they are longer than the `/v1` ones; the
server runs greedy with `--max-tokens` as its reply cap, so the replies match in length. Each chat's
title (made after its first exchange, when the engine is idle) is awaited after the batch's clock
has stopped, and then an idle engine on `/metrics`, so no title runs in another system's round.
Then `returning chats`: more chats than slots (`--chats`, twice the slots by default), each sending
`--turns` turns with its whole history as OpenAI clients do, one request at a time, the chats in
turn, so every chat comes back after the others have taken its slot; both servers keep such caches
in host memory (llama-server's `--cache-ram`, Ktulhu's `KTULHU_PREFIX_STORE_MB`). Per turn and
system, interleaved: time to first token p50 and the prompt tokens served from a cache.
Last, `after embeddings`: Ktulhu's inter-token mean at one stream before and after one
`/v1/embeddings` request, whose context computes on another thread than the chat context's (with
an OpenMP build of llama.cpp that made every later decode step 2.5x slower).
Results: bench/results/http.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import open_websocket_url

from bench.engine.llama_server import LlamaServer, ensure_built
from bench.engine.workload import Record, TokenClock, summarise_rounds
from bench.paths import REPO
from bench.ws_client import Checker, ask, register, wait_title
from ktulhu.chat.summaries import GENERATION_TIMEOUT_S, PATIENCE_S
from ktulhu.local_cluster import Member, http_ok
from ktulhu.ports import free_port
from ktulhu.settings import load_settings

SYSTEM = "You are a helpful assistant. Answer in detail."
TOPICS = ["the sea", "mountains", "a city at night", "an old library", "the desert", "a rainy forest",
          "a space station", "a small village", "the northern lights", "a busy market", "a lighthouse",
          "a train journey", "a winter garden", "a river delta", "a volcano", "a coral reef"]
KEY = "bench-" + "k" * 40
#: Rounds of the `after embeddings` requests: prompts no other scenario sends.
EMBEDDINGS_ROUND = 1000
#: An engine idle this long after a `/ws` batch has no title left to make (the worker starts the next
#: one within milliseconds of the engine going idle).
QUIET_S = 2.0
IDLE_POLL_S = 0.1
#: Longest a title takes by the title worker's own limits (an idle engine, then the generation).
TITLE_LIMIT_S = PATIENCE_S + GENERATION_TIMEOUT_S

#: One batch: the requests as the client saw them, and the batch's wall seconds.
Batch = tuple[list[Record], float]


@attrs.define
class System:
    """A surface under test: `run(level, round)` sends one batch; `prompt_tokens` collects each
    request's prompt length (the `/ws` ones carry the routed system prompt)."""

    name: str
    run: Callable[[int, int, list[int]], Awaitable[Batch]]
    prompt_tokens: list[int] = attrs.field(factory=list)

    async def batch(self, level: int, round_: int) -> Batch:
        return await self.run(level, round_, self.prompt_tokens)


def user_text(i: int, round_: int) -> str:
    return f"Round {round_}, request {i}: describe {TOPICS[i % len(TOPICS)]}."


def messages(i: int, round_: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text(i, round_)}]


async def sse_chunks(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of one streamed `/v1/chat/completions` request."""
    async with http.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                yield json.loads(line[6:])


async def stream(http: httpx.AsyncClient, url: str, body: dict[str, Any], prompt_tokens: list[int]) -> Record:
    clock = TokenClock(time.perf_counter())
    tokens = 0
    async for chunk in sse_chunks(http, url, body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            prompt_tokens.append(chunk["usage"]["prompt_tokens"])
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
            clock.tick()
    return clock.record(tokens or len(clock.gaps) + (clock.first is not None))


async def v1_batch(base: str, max_tokens: int, level: int, round_: int, prompt_tokens: list[int]) -> Batch:
    """`level` streaming `/v1/chat/completions` requests at once, greedy, `max_tokens` each."""
    records: list[Record] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=level + 2)) as http:
        async def one(i: int) -> None:
            body = {"model": "default", "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0.0, "max_tokens": max_tokens, "messages": messages(i, round_)}
            records.append(await stream(http, f"{base}/v1/chat/completions", body, prompt_tokens))

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(level):
                nursery.start_soon(one, i)
        return records, time.perf_counter() - started


async def ws_batch(base: str, level: int, round_: int, prompt_tokens: list[int]) -> Batch:
    """`level` sockets, opened and registered first (a chat page's socket is open before the user
    types), send the same user messages at once, each in a new chat; the clock stops at the last
    `done`. Then, outside the clock, the sockets wait for their chats' titles until the server has
    settled, so no title runs in the next batch."""
    checker = Checker()
    records: list[Record] = []
    opened = titled = 0
    go, finished = trio.Event(), trio.Event()
    started = ended = 0.0

    async def one(i: int) -> None:
        nonlocal opened, titled, started, ended
        async with open_websocket_url(base.replace("http", "ws", 1) + "/ws") as ws:
            await register(ws, f"bench-{round_}-{i}")
            opened += 1
            if opened == level:  # every socket is open: all prompts leave together
                started = time.perf_counter()
                go.set()
            await go.wait()
            clock = TokenClock(time.perf_counter())
            _, tokens, _ = await ask(ws, checker, user_text(i, round_), "", clock)
            ended = max(ended, time.perf_counter())
            records.append(clock.record(tokens))
            if len(records) == level:
                finished.set()
            await wait_title(ws)
            titled += 1

    async def settle(nursery: trio.Nursery) -> None:
        await finished.wait()
        await wait_settled(base, lambda: titled == level, level * TITLE_LIMIT_S)
        nursery.cancel_scope.cancel()  # the sockets still waiting for a title that will not come

    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle, nursery)
        for i in range(level):
            nursery.start_soon(one, i)
    if checker.dones != level or checker.bad_frames:
        raise RuntimeError(f"/ws: {checker.dones} of {level} prompts done, frames for other prompts: "
                           f"{checker.bad_frames[:3]}")
    prompt_tokens.extend(usage.get("prompt_tokens", 0) for usage in checker.usages)
    if titled != level:
        print(f"  /ws: {level - titled} of {level} chats got no title", flush=True)
    return records, ended - started


async def wait_settled(base: str, all_titled: Callable[[], bool], limit: float) -> None:
    """Until `/metrics` shows an idle engine (nothing generating, nothing queued) once every title
    has come, or for `QUIET_S` on end: the title worker starts its next title as soon as the engine
    is idle, so a quiet engine has no title left to make."""
    quiet_since: float | None = None
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        with trio.fail_after(limit):  # titles are made one at a time
            while True:
                gauges = dict(line.split()[:2] for line in (await http.get("/metrics")).text.splitlines()
                              if line.startswith(("ktulhu_engine_busy_slots ", "ktulhu_engine_queue_depth ")))
                idle = len(gauges) == 2 and all(float(v) == 0 for v in gauges.values())
                now = time.perf_counter()
                quiet_since = (quiet_since or now) if idle else None
                if idle and (all_titled() or now - quiet_since >= QUIET_S):
                    return
                await trio.sleep(IDLE_POLL_S)


async def chat_turn(http: httpx.AsyncClient, url: str, history: list[dict[str, str]],
                    max_tokens: int) -> tuple[float, str, int]:
    """One streamed greedy turn: seconds to the first text, the reply, and the prompt tokens the
    server says it served from a cache."""
    body = {"model": "default", "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0, "max_tokens": max_tokens, "messages": history}
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    cached = 0
    async for chunk in sse_chunks(http, url, body):
        if chunk.get("usage"):
            cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        for choice in chunk.get("choices", ()):
            if text := choice.get("delta", {}).get("content"):
                first = first or time.perf_counter()
                parts.append(text)
    return (first or time.perf_counter()) - started, "".join(parts), cached


async def returning_chats(bases: dict[str, str], chats: int, turns: int, max_tokens: int) -> dict[str, Any]:
    """`chats` conversations of `turns` turns, one request at a time, each chat's turn after every
    other chat's: per system and turn, TTFT p50 and mean cached prompt tokens. The systems take
    each turn in turn (interleaved)."""
    histories = {name: [[{"role": "system", "content": SYSTEM}] for _ in range(chats)] for name in bases}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in bases}
    # a connection per request: llama-server may close a kept-alive one as the next request leaves
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        for turn in range(turns):
            for name, base in bases.items():
                ttfts, cached = [], []
                for i, history in enumerate(histories[name]):
                    history.append({"role": "user", "content": f"Turn {turn + 1}: tell me more about "
                                                              f"{TOPICS[i % len(TOPICS)]}."})
                    ttft, reply, hit = await chat_turn(http, f"{base}/v1/chat/completions", history, max_tokens)
                    history.append({"role": "assistant", "content": reply})
                    ttfts.append(ttft)
                    cached.append(hit)
                results[name].append({"ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
                                      "cached_tokens_mean": round(statistics.fmean(cached), 1)})
            print(f"[returning chats, turn {turn + 1}] " + " | ".join(
                f"{name} ttft p50 {rows[-1]['ttft_p50_ms']} ms, cached {rows[-1]['cached_tokens_mean']}"
                for name, rows in results.items()), flush=True)
    return results


def figures(name: str, summary: dict[str, Any]) -> str:
    return (f"{name} {summary['tokens_per_s']} tok/s, ttft p50 {summary['ttft_p50_ms']} ms "
            f"(mean {summary['ttft_mean_ms']}), itl p99 {summary['itl_p99_ms']} ms")


async def compare(systems: list[System], levels: list[int], rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for level in levels:
        runs: dict[str, dict[str, list]] = {s.name: {"unique": [], "repeated": []} for s in systems}
        for round_ in range(rounds):
            for system in systems:  # interleaved: each round runs every system in turn
                tag = level * 1000 + round_
                runs[system.name]["unique"].append(await system.batch(level, tag))
                runs[system.name]["repeated"].append(await system.batch(level, tag))
        results[str(level)] = {name: {kind: summarise_rounds(rs) for kind, rs in kinds.items()}
                               for name, kinds in runs.items()}
        for kind in ("unique", "repeated"):
            print(f"[{level:>2} streams, {kind:>8}] "
                  + " | ".join(figures(s.name, results[str(level)][s.name][kind]) for s in systems), flush=True)
    return results


async def after_embeddings(base: str, max_tokens: int, rounds: int) -> dict[str, float]:
    """Inter-token mean (ms) of `rounds` sequential one-stream requests, before and after one
    `/v1/embeddings` request."""
    async def itl_mean(first_round: int) -> float:
        gaps: list[float] = []
        for round_ in range(first_round, first_round + rounds):
            records, _ = await v1_batch(base, max_tokens, 1, round_, [])
            gaps += records[0].gaps
        return round(1e3 * statistics.fmean(gaps), 2)

    before = await itl_mean(EMBEDDINGS_ROUND)
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(f"{base}/v1/embeddings", json={"input": "a short text to embed"},
                                   headers={"Authorization": f"Bearer {KEY}"})
        response.raise_for_status()
    after = await itl_mean(EMBEDDINGS_ROUND + rounds)
    print(f"[after embeddings] ktulhu inter-token mean at 1 stream {before} ms before, {after} ms after", flush=True)
    return {"itl_mean_ms_before": before, "itl_mean_ms_after": after}


def prompt_lengths(systems: list[System]) -> dict[str, float]:
    """Mean prompt tokens per system: `/ws` is longer (the routed system prompt), and says so."""
    lengths = {s.name: round(statistics.fmean(s.prompt_tokens), 1) for s in systems if s.prompt_tokens}
    print("prompt tokens (mean): " + ", ".join(f"{name} {n}" for name, n in lengths.items())
          + "; /ws prompts carry Ktulhu's routed system prompt instead of the bench's", flush=True)
    return lengths


def server_env(args: argparse.Namespace, root: Path, keys: Path) -> dict[str, str]:
    """`ktulhu serve`'s settings: the same slots, context and threads as llama-server; greedy `/ws`
    replies capped at `--max-tokens` (`/v1` requests say so themselves); no anonymous rate limit."""
    return {"KTULHU_STORE": str(root / "chatdb"), "KTULHU_SLOTS": str(args.slots), "LLAMA_CLI_CTX": str(args.ctx),
            "LLAMA_CLI_THREADS": str(args.threads), "KTULHU_API_KEYS_FILE": str(keys), "KTULHU_QUEUE": "1024",
            "KTULHU_LOG": "warning", "LLAMA_CLI_TEMP": "0", "LLAMA_CLI_MAX_TOKENS": str(args.max_tokens),
            "KTULHU_ANON_RATE": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--chats", type=int, help="returning chats, at least 1 (default: twice the slots)")
    parser.add_argument("--turns", type=int, default=3, help="turns of each returning chat (0: none)")
    parser.add_argument("--chat-tokens", type=int, default=32, help="tokens of each returning chat's reply")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "http.json")
    args = parser.parse_args()
    if (args.chats is not None and args.chats < 1) or args.turns < 0 or args.chat_tokens < 1:
        parser.error("--chats and --chat-tokens must be at least 1, --turns at least 0")
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
                      cwd=REPO, env=server_env(args, root, keys))
        theirs = LlamaServer(ensure_built(), model, slots=args.slots, n_ctx_seq=args.ctx, threads=args.threads,
                             port=free_port())
        try:
            ours.start()
            ours.wait_ready()
            theirs.wait_ready()
            systems = [System("ktulhu", partial(v1_batch, ours.url, args.max_tokens)),
                       System("ktulhu-ws", partial(ws_batch, ours.url)),
                       System("llama-server", partial(v1_batch, theirs.base, args.max_tokens))]
            results = trio.run(compare, systems, levels, args.rounds)
            lengths = prompt_lengths(systems)
            returning = trio.run(returning_chats, {"ktulhu": ours.url, "llama-server": theirs.base},
                                 args.chats or 2 * args.slots, args.turns, args.chat_tokens)
            embedded = trio.run(after_embeddings, ours.url, args.max_tokens, args.rounds)
        finally:
            ours.stop()
            theirs.close()
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "model": model.name},
              "slots": args.slots, "ctx": args.ctx, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "prompt_tokens_mean": lengths,
              "ktulhu-ws": "/ws prompts with the same user messages: Ktulhu's routed system prompt (longer "
                           "prompts), a new chat each, titles awaited outside the clock", "levels": results,
              "returning_chats": {"chats": args.chats or 2 * args.slots, "reply_tokens": args.chat_tokens,
                                  "turns": returning},
              "after_embeddings": embedded}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
