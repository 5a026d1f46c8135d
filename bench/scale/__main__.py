"""`python -m bench.scale`: the scale-out topology measured side by side in one run.

1. Remote-mode overhead: one llama-server (`--streams` slots) and one front-end in remote mode on a
   PostgreSQL store. In interleaved rounds, `--streams` concurrent streaming requests go (a) straight
   to the llama-server's `/v1/chat/completions`, (b) through the front-end's `/v1`, (c) through the
   front-end's `/ws` (new chats), (d) straight to the llama-server with the messages the front-end
   sends for (c): the system prompt the router picks for each text, then the text. Aggregate
   generated tokens/s of each; ratios b/a and c/d (the same inference work on both sides of each
   ratio; c/a is reported too). The front-end's CPU time per generated token is read from /proc.
   With `--pin`, the llama-server runs on CPU 0 with one thread and everything else (front-end,
   PostgreSQL, nginx, this client) on the other CPUs, as on separate hosts: the front-end's work
   then no longer takes CPU from the inference it relays.
2. Affinity: two llama-servers, two front-ends. `--chats` chats, their turns interleaved, each
   chat's turns alternating between the front-ends; TTFT of turn `--turns` (as the `/ws` client sees
   it) with chat affinity on, and with the front-ends restarted with KTULHU_WORKER_AFFINITY=0 (round
   robin over workers). With two workers a round robin still lands where the chat's prefix is by
   chance about half the time, so the turns that missed it are also reported apart (the cost a
   balancer without affinity pays on a miss; with N workers it misses (N-1)/N of the time).

The store figures (PostgreSQL vs RocksDB) come from `python -m bench.store`.
Results: bench/results/scale.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from bench.paths import REPO
from ktulhu.ports import free_port
from ktulhu.local_cluster import LocalCluster
from ktulhu.prompts import system_prompt
from ktulhu.router.service import Router
from ktulhu.settings import load_settings

TOPICS = ["the sea", "mountains", "a city at night", "an old library", "the desert", "a rainy forest",
          "a space station", "a small village", "the northern lights", "a busy market", "a lighthouse",
          "a train journey", "a winter garden", "a river delta", "a volcano", "a coral reef"]
TIMEOUT_S = 600.0


def _prompt(i: int) -> str:
    return f"Write a detailed description of {TOPICS[i % len(TOPICS)]}."


async def _stream_v1(http: httpx.AsyncClient, url: str, text: str, max_tokens: int,
                     headers: dict[str, str], system: str | None = None) -> int:
    messages = [{"role": "system", "content": system}] if system else []
    body = {"model": "default", "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0, "max_tokens": max_tokens,
            "messages": [*messages, {"role": "user", "content": text}]}
    generated = 0
    async with http.stream("POST", url, json=body, headers=headers, timeout=TIMEOUT_S) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    generated = usage["completion_tokens"]
    return generated


async def _ws_turn(base: str, text: str, chat_id: str) -> tuple[int, float, str, dict[str, int]]:
    """(generated tokens, seconds to the first token, chat id, usage) of one /ws prompt."""
    async with open_websocket_url(base.replace("http://", "ws://") + "/ws") as ws:
        request = str(uuid.uuid4())
        started = time.perf_counter()
        await ws.send_message(json.dumps({"msg_type": "prompt", "request_id": request, "chat_id": chat_id,
                                          "session_id": "bench", "device_hash": "bench", "text": text,
                                          "language": "en"}))
        first = None
        with trio.fail_after(TIMEOUT_S):
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("request_id") != request:
                    continue
                if first is None and frame.get("type") == "assistant" and frame.get("token"):
                    first = time.perf_counter() - started
                if frame.get("done") is True:
                    usage = frame.get("usage") or {}
                    return usage.get("generated_tokens", 0), first or float("nan"), frame["chat_id"], usage


async def _batch(run_one: Any, streams: int) -> tuple[int, float]:
    """(generated tokens, seconds) of `streams` concurrent calls of run_one(i) -> tokens."""
    counts: list[int] = []

    async def one(i: int) -> None:
        counts.append(await run_one(i))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(one, i)
    return sum(counts), time.perf_counter() - started


def _session_pids(leader: int) -> list[int]:
    """The processes of the session `leader` started (a member and the children it forked)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == leader:
            pids.append(int(stat.parent.name))
    return pids


def _pin(cluster: LocalCluster) -> None:
    """Workers on CPU 0, every other member and this process on the rest (all their threads)."""
    rest = sorted(os.sched_getaffinity(0) - {0})
    if not rest:
        raise SystemExit("--pin needs at least two CPUs")
    for name, member in cluster.members.items():
        assert member.process is not None
        cpus = "0" if name.startswith("worker-") else ",".join(map(str, rest))
        for pid in _session_pids(member.process.pid):
            subprocess.run(["taskset", "-a", "-cp", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)
    os.sched_setaffinity(0, rest)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _until_idle(http: httpx.AsyncClient, worker: str) -> None:
    """Until no slot of the llama-server at `worker` is processing (bounded)."""
    with trio.fail_after(TIMEOUT_S):
        while any(slot.get("is_processing") for slot in (await http.get(f"{worker}/slots")).json()):
            await trio.sleep(0.2)


async def _api_key(base: str) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        registered = await http.post("/api/auth/register", json={
            "email": f"bench-{uuid.uuid4().hex[:8]}@example.com", "password": "bench passphrase 1234"})
        registered.raise_for_status()
        jwt = registered.json()["jwt"]
        created = await http.post("/external/api/keys", headers={"Authorization": f"Bearer {jwt}"}, json={})
        created.raise_for_status()
        return created.json()["key"]


async def overhead(cluster: LocalCluster, streams: int, rounds: int, max_tokens: int,
                   systems: list[str]) -> dict[str, Any]:
    """`systems[i]`: the system prompt the front-end's router gives `_prompt(i)`."""
    worker, front = cluster.worker_url(1), cluster.frontend_url(1)
    process = cluster.members["frontend-1"].process
    assert process is not None
    key = await _api_key(front)
    results: dict[str, list[float]] = {"direct": [], "v1": [], "direct_ws": [], "ws": []}
    cpu_ms_per_token: dict[str, list[float]] = {"v1": [], "ws": []}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams * 2)) as http:
        async def direct(i: int) -> int:
            return await _stream_v1(http, f"{worker}/v1/chat/completions", _prompt(i), max_tokens, {})

        async def via_v1(i: int) -> int:
            return await _stream_v1(http, f"{front}/v1/chat/completions", _prompt(i), max_tokens,
                                    {"Authorization": f"Bearer {key}"})

        async def direct_ws(i: int) -> int:
            return await _stream_v1(http, f"{worker}/v1/chat/completions", _prompt(i), max_tokens, {}, systems[i])

        async def via_ws(i: int) -> int:
            return (await _ws_turn(front, _prompt(i), ""))[0]

        await _batch(direct, streams)  # warm-up: model pages, caches
        for _ in range(rounds):
            for name, run_one in (("direct", direct), ("v1", via_v1), ("direct_ws", direct_ws), ("ws", via_ws)):
                cpu = _cpu_s(process.pid)
                tokens, seconds = await _batch(run_one, streams)
                results[name].append(tokens / seconds)
                await _until_idle(http, worker)  # the titles of new /ws chats finish before the next batch
                if name in cpu_ms_per_token:  # the front-end's work per generated token, titles included
                    cpu_ms_per_token[name].append((_cpu_s(process.pid) - cpu) * 1000 / max(tokens, 1))
    median = {name: statistics.median(values) for name, values in results.items()}
    return {"streams": streams, "rounds": rounds, "tokens_per_s": results, "median": median,
            "ratio_v1": median["v1"] / median["direct"], "ratio_ws": median["ws"] / median["direct_ws"],
            "ratio_ws_to_plain": median["ws"] / median["direct"],
            "frontend_cpu_ms_per_token": {name: statistics.median(v) for name, v in cpu_ms_per_token.items()}}


async def affinity_ttft(cluster: LocalCluster, chats: int, turns: int) -> list[dict[str, Any]]:
    """The last turn of `chats` chats (TTFT, prompt and cached tokens), their turns interleaved and
    alternating between the two front-ends."""
    fronts = [cluster.frontend_url(1), cluster.frontend_url(2)]
    chat_ids = [""] * chats
    last: list[dict[str, Any]] = []
    for t in range(turns):
        for c in range(chats):
            _tokens, ttft, chat_ids[c], usage = await _ws_turn(fronts[t % 2], f"{_prompt(c + t)} Part {t + 1}.",
                                                               chat_ids[c])
            if t == turns - 1:
                last.append({"ttft_s": ttft, "prompt_tokens": usage.get("prompt_tokens", 0),
                             "cached_tokens": usage.get("cached_tokens", 0)})
    return last


def _median_ttft(turns: list[dict[str, Any]]) -> float:
    return statistics.median(t["ttft_s"] for t in turns) if turns else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--chats", type=int, default=7,
                        help="chats per affinity mode (odd: an even count keeps a round robin in step with each chat)")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads per llama-server")
    parser.add_argument("--pin", action="store_true",
                        help="overhead: the worker alone on CPU 0 with one thread, the rest elsewhere")
    parser.add_argument("--only", choices=("overhead", "affinity"),
                        help="run one part; the other part's last results are kept")
    args = parser.parse_args()
    settings = load_settings()
    model = settings.model_file
    out = REPO / "bench" / "results" / "scale.json"
    report: dict[str, Any] = json.loads(out.read_text()) if args.only and out.exists() else {}
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "model": model.name}
    with tempfile.TemporaryDirectory(prefix="ktulhu-scale-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        env = {"KTULHU_FREE_GENERATIONS": "1000000", "KTULHU_ANON_RATE": "0",
               "LLAMA_CLI_MAX_TOKENS": str(args.max_tokens), "LLAMA_CLI_TEMP": "0", "KTULHU_QUEUE": "1024"}
        stamp = {"measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}
        if args.only != "affinity":
            report["overhead_pinned" if args.pin else "overhead"] = {**_overhead(root, model, env, args), **stamp}
        if args.only != "overhead":
            report["affinity"] = {**_affinity(root, model, env, args), **stamp}
    out.write_text(json.dumps(report, indent=2))
    for part in ("overhead", "overhead_pinned"):
        if part not in report:
            continue
        o = report[part]
        print(f"{part} at {o['streams']} streams: direct {o['median']['direct']:.1f} tok/s, /v1 "
              f"{o['median']['v1']:.1f} ({o['ratio_v1']:.3f}x); direct with the system prompts "
              f"{o['median']['direct_ws']:.1f} tok/s, /ws {o['median']['ws']:.1f} ({o['ratio_ws']:.3f}x); "
              f"front-end CPU per token: {o['frontend_cpu_ms_per_token']}")
    if "affinity" in report:
        a = report["affinity"]
        print(f"affinity: turn-{a['turn']} TTFT median on {a['ttft_on_s'] * 1000:.0f} ms, off "
              f"{a['ttft_off_s'] * 1000:.0f} ms (ratio {a['ratio']:.2f}); off and not on the previous turn's worker "
              f"({a['off_missed']} of {a['chats']}) {a['ttft_off_missed_s'] * 1000:.0f} ms "
              f"(ratio {a['ratio_missed']:.2f})")
    print(f"written to {out}")


def _overhead(root: Path, model: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    single = LocalCluster(root / "overhead", REPO, model, port=free_port(), workers=1, frontends=1,
                          slots=args.streams, ctx=1024, threads=1 if args.pin else args.threads, frontend_env=env)
    router = Router.from_settings(load_settings())
    systems = [system_prompt(router.classify_sync(_prompt(i), "en"), "en") for i in range(args.streams)]
    cpus = os.sched_getaffinity(0)
    single.start(print)
    try:
        if args.pin:
            _pin(single)
        return trio.run(overhead, single, args.streams, args.rounds, args.max_tokens, systems)
    finally:
        single.stop()
        os.sched_setaffinity(0, cpus)


def _affinity(root: Path, model: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    pair = LocalCluster(root / "affinity", REPO, model, port=free_port(), workers=2, frontends=2,
                        slots=args.chats, ctx=1024, threads=1, frontend_env={**env, "LLAMA_CLI_MAX_TOKENS": "48"})
    pair.start(print)
    try:
        warm = trio.run(affinity_ttft, pair, args.chats, args.turns)
        for index in (1, 2):
            pair.members[f"frontend-{index}"].env["KTULHU_WORKER_AFFINITY"] = "0"
            pair.restart(f"frontend-{index}")
        cold = trio.run(affinity_ttft, pair, args.chats, args.turns)
    finally:
        pair.stop()
    missed = [t for t in cold if t["cached_tokens"] < t["prompt_tokens"] / 2]
    return {"turn": args.turns, "chats": args.chats, "on": warm, "off": cold,
            "ttft_on_s": _median_ttft(warm), "ttft_off_s": _median_ttft(cold),
            "ttft_off_missed_s": _median_ttft(missed), "off_missed": len(missed),
            "ratio": _median_ttft(warm) / _median_ttft(cold),
            "ratio_missed": _median_ttft(warm) / _median_ttft(missed)}


if __name__ == "__main__":
    main()
