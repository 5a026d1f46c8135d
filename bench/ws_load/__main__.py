"""`python -m bench.ws_load`: the server under WebSocket load, measured side by side in one run.

1. idle: the server runs as its own process (`ktulhu serve`, hypercorn on loopback, its own
   store), so its resident memory can be read from /proc: ready, then with `--idle` sockets open
   and registered.
2. active: with the idle sockets still open, `--active` chats send `--turns` prompts each. Every
   prompt must end with exactly one `done`, every frame must name its prompt, and the streamed text
   must equal the stored reply (nothing lost or garbled). TTFT p50/p99 as the client sees it.
3. throughput: a server started in this process (same code, hypercorn on loopback); `--streams`
   chats prompting at once through `/ws`, and in alternate rounds the same prompts straight into
   that server's engine (same engine, cache, routed system prompts); the ratio of aggregate tokens/s.

Results: bench/results/ws_load.json (and a summary on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from bench.paths import REPO
from bench.ws_client import Checker, ask, register
from ktulhu.ports import free_port
from ktulhu.engine.engine import Engine
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.sampling import SamplingParams
from ktulhu.prompts import system_prompt
from ktulhu.router.service import Router
from ktulhu.nurseries import root
from ktulhu.settings import load_settings
from ktulhu.startup import prepare

TOPICS = ["the sea", "mountains", "a city at night", "an old library", "the desert", "a rainy forest",
          "a space station", "a small village", "the northern lights", "a busy market", "a lighthouse",
          "a train journey", "a winter garden", "a river delta", "a volcano", "a coral reef"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1000, help="idle sockets held open")
    parser.add_argument("--active", type=int, default=16, help="chats prompting during the active phase")
    parser.add_argument("--turns", type=int, default=2, help="prompts per active chat")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams in the throughput phase")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved throughput rounds")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ws_load.json")
    return parser.parse_args()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def server_env(args: argparse.Namespace, db: Path, port: int) -> dict[str, str]:
    """Greedy sampling: the same prompts give the same replies, so /ws and direct rounds do the same work."""
    return {**os.environ, "KTULHU_HOST": "127.0.0.1", "KTULHU_PORT": str(port), "KTULHU_DB_PATH": str(db),
            "KTULHU_ANON_RATE": "0", "LLAMA_CLI_THREADS": str(args.threads), "KTULHU_SLOTS": str(args.streams),
            "LLAMA_CLI_MAX_TOKENS": str(args.max_tokens), "KTULHU_QUEUE": "256", "KTULHU_LOG": "warning",
            "LLAMA_CLI_TEMP": "0"}


async def ws_round(url: str, args: argparse.Namespace, round_no: int) -> tuple[float, int]:
    """`--streams` chats at once through /ws: aggregate generated tokens per second, and the prompt
    tokens the engine computed (not served from its prefix cache)."""
    checker = Checker()
    totals: list[int] = []

    connected = 0
    go = trio.Event()
    started = 0.0

    async def stream(i: int) -> None:
        nonlocal connected, started
        async with open_websocket_url(url) as ws:
            connected += 1
            if connected == args.streams:  # every socket is open: all prompts leave together
                started = time.perf_counter()
                go.set()
            await go.wait()
            _, tokens, _ = await ask(ws, checker, f"Describe {TOPICS[(i + round_no) % len(TOPICS)]} in detail.", "")
            totals.append(tokens)

    async with trio.open_nursery() as nursery:
        for i in range(args.streams):
            nursery.start_soon(stream, i)
    return sum(totals) / (time.perf_counter() - started), checker.prefilled


async def direct_round(engine: Engine, router: Router, args: argparse.Namespace,
                       round_no: int) -> tuple[float, int]:
    """The same prompts through the engine in this process, with the system prompt the server's
    router would pick."""
    totals: list[int] = []
    prefilled: list[int] = []

    async def stream(i: int) -> None:
        text = f"Describe {TOPICS[(i + round_no) % len(TOPICS)]} in detail."
        routed = await router.classify(text, "en")
        messages = [ChatMessage("system", system_prompt(routed, "en")), ChatMessage("user", text)]
        with await engine.chat(messages, SamplingParams.defaults(engine.settings)) as generation:
            await generation.text()
        totals.append(generation.metrics.generated_tokens)
        prefilled.append(generation.metrics.prompt_tokens - generation.metrics.cached_tokens)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(args.streams):
            nursery.start_soon(stream, i)
    return sum(totals) / (time.perf_counter() - started), sum(prefilled)


async def hold_idle(url: str, count: int, opened: trio.Event, release: trio.Event) -> None:
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with open_websocket_url(url) as ws:
            await register(ws, f"idle{i}", "idle")
            done += 1
            if done == count:
                opened.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
            if i % 50 == 49:
                await trio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"ws://127.0.0.1:{port}/ws"
    workdir = Path(tempfile.mkdtemp(prefix="ktulhu-wsload-"))
    ktulhu = shutil.which("ktulhu", path=str(Path(sys.executable).parent)) or "ktulhu"
    process = subprocess.Popen([ktulhu, "serve"], cwd=REPO, env=server_env(args, workdir / "chatdb", port))
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                              "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            with trio.fail_after(120):
                while True:
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.2)
            baseline = rss_mb(process.pid)

            # 1. idle sockets
            opened, release = trio.Event(), trio.Event()
            async with trio.open_nursery() as idle:
                idle.start_soon(hold_idle, url, args.idle, opened, release)
                with trio.fail_after(300):
                    await opened.wait()
                await trio.sleep(1)
                with_idle = rss_mb(process.pid)
                result["idle"] = {"sockets": args.idle, "rss_ready_mb": round(baseline, 1),
                                  "rss_with_idle_mb": round(with_idle, 1),
                                  "extra_mb": round(with_idle - baseline, 1),
                                  "kb_per_socket": round((with_idle - baseline) * 1024 / args.idle, 1)}
                print(json.dumps(result["idle"]))

                # 3. active chats while the idle sockets stay open
                checker = Checker()
                chats: list[str] = []

                async def active(i: int) -> None:
                    async with open_websocket_url(url) as ws:
                        chat_id = ""
                        for turn in range(args.turns):
                            chat_id, _, _ = await ask(ws, checker, f"Tell me about {TOPICS[i % len(TOPICS)]}"
                                                                   f" (question {turn + 1}).", chat_id)
                        chats.append(chat_id)

                started = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for i in range(args.active):
                        nursery.start_soon(active, i)
                elapsed = time.perf_counter() - started
                lost = 0
                for chat_id in chats:
                    thread = (await client.get(f"/chat-thread/{chat_id}")).json()["messages"]
                    stored = [m["text"] for m in thread if m["role"] == "assistant"]
                    streamed = [t.strip() for key, t in checker.streamed.items() if key.startswith(chat_id + ":")]
                    lost += sum(1 for s in streamed if s not in stored)
                result["active"] = {
                    "chats": args.active, "prompts": checker.prompts, "dones": checker.dones,
                    "frames_for_other_prompts": len(checker.bad_frames), "replies_differing_from_store": lost,
                    "seconds": round(elapsed, 1), "ttft_p50_ms": round(percentile(checker.ttft, 50) * 1000),
                    "ttft_p99_ms": round(percentile(checker.ttft, 99) * 1000),
                    "rss_mb": round(rss_mb(process.pid), 1),
                }
                print(json.dumps(result["active"]))
                release.set()

    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    # 2. throughput: /ws vs the same engine driven directly, interleaved rounds
    result["throughput"] = await throughput(args)
    return result


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """`--streams` prompts at once through /ws and, in alternate rounds, straight into the same
    server's engine (its router picks the same system prompts): one process, one engine, one
    cache, so the ratio isolates what the WebSocket path costs. Also the CPU seconds per round."""
    workdir = Path(tempfile.mkdtemp(prefix="ktulhu-wsload-"))
    env = server_env(args, workdir / "chatdb", 0)
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith(("KTULHU_", "LLAMA_CLI_"))},
                             root=REPO)
    ws_rates: list[float] = []
    direct_rates: list[float] = []
    ws_cpu: list[float] = []
    direct_cpu: list[float] = []
    try:
        async with trio.open_nursery() as nursery:
            runtime, binds = await nursery.start(root.serve, prepare(settings))
            with trio.fail_after(120):
                await runtime.readiness.wait_ready()
            url = f"ws://127.0.0.1:{binds[0].rsplit(':', 1)[1]}/ws"

            async def idle() -> None:
                """Until the title worker (which runs in idle time, after a round's replies asked for their
                titles) and then the engine are done."""
                with trio.fail_after(300):
                    await runtime.summaries.get().wait_idle()
                    await runtime.engine.get().wait_idle()

            await ws_round(url, args, 99)  # warm-up, both paths
            await idle()
            await direct_round(runtime.engine.get(), runtime.router.get(), args, 99)
            for round_no in range(args.rounds):
                await idle()
                before = cpu_seconds(os.getpid())
                rate, ws_prefill = await ws_round(url, args, round_no)
                ws_rates.append(rate)
                ws_cpu.append(cpu_seconds(os.getpid()) - before)
                await idle()
                before = cpu_seconds(os.getpid())
                rate, direct_prefill = await direct_round(runtime.engine.get(), runtime.router.get(), args, round_no)
                direct_rates.append(rate)
                direct_cpu.append(cpu_seconds(os.getpid()) - before)
                print(f"round {round_no + 1}: /ws {ws_rates[-1]:.1f} tok/s ({ws_prefill} prompt tokens computed), "
                      f"engine {direct_rates[-1]:.1f} tok/s ({direct_prefill})")
            runtime.request_shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ws_median, direct_median = statistics.median(ws_rates), statistics.median(direct_rates)
    summary = {"streams": args.streams, "ws_tokens_per_s": [round(r, 1) for r in ws_rates],
               "engine_tokens_per_s": [round(r, 1) for r in direct_rates],
               "ws_median": round(ws_median, 1), "engine_median": round(direct_median, 1),
               "ratio": round(ws_median / direct_median, 3),
               "cpu_s_per_ws_round": round(statistics.median(ws_cpu), 2),
               "cpu_s_per_direct_round": round(statistics.median(direct_cpu), 2)}
    print(json.dumps(summary))
    return summary


def main() -> None:
    args = parse_args()
    result = trio.run(run, args)
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
