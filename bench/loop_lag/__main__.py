"""`python -m bench.loop_lag`: how long the server's event loop stalls while big prompts are built.

A server runs as its own process (`ktulhu serve` on loopback, its own store) for each scenario, so
the client's loop never competes with the server's. While the scenario's request is handled, a
pinger sends `GET /healthz` every 10 ms (one at a time) and records each round trip: a blocked
trio thread shows as one long round trip. The server's own `ktulhu_event_loop_lag_seconds`
histogram (how late its lag task woke) is read from `/metrics` before and after.

Scenarios (the worst cases the settings allow: limits are raised so the text reaches the prompt
builder instead of being refused at parse time):

- `v1_1mb`: one `POST /v1/chat/completions` with `--v1-kb` KB of messages (`--v1-messages` turns).
- `ws_1000`: one `/ws` prompt on a chat with `--stored` stored messages, all read as history.

Target: the worst lag (the longest `/healthz` round trip and the metric's largest sample) under
50 ms. On a shared machine other processes delay the server's thread as well: each scenario also
records the round trips of its idle second and the load average. Results:
bench/results/loop_lag.json (and a summary on stdout; `--baseline` keeps an earlier run under `before`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from bench.paths import REPO
from ktulhu.ports import free_port
from ktulhu.auth.tokens import issue_token
from ktulhu.settings import load_settings
from ktulhu.store import Store
from ktulhu.store.records import Message, User, now_ms

METRIC = "ktulhu_event_loop_lag_seconds"
TARGET_MS = 50.0
JWT_SECRET = "bench-loop-lag-" + "0123456789abcdef" * 3
SENTENCE = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loop_lag", description=__doc__.split("\n\n")[0])
    parser.add_argument("--v1-kb", type=int, default=1024, help="size of the /v1 body's messages in KB")
    parser.add_argument("--v1-messages", type=int, default=1000, help="messages in the /v1 body (at most 1000)")
    parser.add_argument("--stored", type=int, default=1000, help="stored messages of the /ws chat")
    parser.add_argument("--stored-chars", type=int, default=400, help="characters of each stored message")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="time between /healthz pings")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a scenario may take")
    parser.add_argument("--threads", type=int, default=1, help="LLAMA_CLI_THREADS of the server")
    parser.add_argument("--only", choices=("v1_1mb", "ws_1000"), help="run one scenario")
    parser.add_argument("--baseline", type=Path, help="an earlier result (e.g. before a change) to keep under `before`")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loop_lag.json")
    return parser.parse_args()


def text_of(chars: int, seed: int) -> str:
    """Ordinary prose of about `chars` characters (varied a little so turns differ)."""
    body = f"Note {seed}: " + SENTENCE * (chars // len(SENTENCE) + 1)
    return body[:chars]


@attrs.define
class Pings:
    """`/healthz` round trips: (when it was sent relative to the start, round trip), in seconds."""

    samples: list[tuple[float, float]] = attrs.field(factory=list)
    failures: int = 0

    def summary(self, since: float, until: float) -> dict[str, Any]:
        chosen = [(sent, rtt) for sent, rtt in list(self.samples) if since <= sent <= until]
        if not chosen:
            return {"pings": 0}
        ordered = sorted(rtt for _, rtt in chosen)
        worst_sent, worst = max(chosen, key=lambda sample: sample[1])
        return {"pings": len(chosen), "rtt_p50_ms": round(statistics.median(ordered) * 1000, 2),
                "rtt_p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000, 2),
                "rtt_max_ms": round(worst * 1000, 2), "rtt_max_sent_at_s": round(worst_sent - since, 3)}


def ping(base: str, interval: float, pings: Pings, start: float, stop: threading.Event) -> None:
    """One `/healthz` at a time, the next `interval` after the previous was sent (or at once when
    late). Runs on its own thread with its own connection, so the load's client work in this
    process (sending a megabyte) never delays a ping."""
    with httpx.Client(base_url=base, timeout=None) as client:
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                client.get("/healthz")
            except httpx.HTTPError:
                pings.failures += 1
            pings.samples.append((sent - start, time.perf_counter() - sent))
            stop.wait(max(0.0, interval - (time.perf_counter() - sent)))


def lag_histogram(text: str) -> dict[str, Any] | None:
    """The server's loop-lag histogram (`count`, `sum`, cumulative `buckets`), or None before it existed."""
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        out: dict[str, Any] = {"count": 0.0, "sum": 0.0, "buckets": {}}
        for sample in family.samples:
            if sample.name.endswith("_count"):
                out["count"] = sample.value
            elif sample.name.endswith("_sum"):
                out["sum"] = sample.value
            elif sample.name.endswith("_bucket"):
                out["buckets"][float(sample.labels["le"])] = sample.value
        return out
    return None


def histogram_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the lag task recorded during the scenario: samples, the mean, how many were over the
    target, and the upper bound of the largest sample (a histogram keeps no maximum)."""
    if before is None or after is None:
        return None
    count = after["count"] - before["count"]
    buckets = {le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]}
    bounds = sorted(buckets)
    largest = next((le for le in bounds if buckets[le] >= count), float("inf"))
    over = count - max((buckets[le] for le in bounds if le <= TARGET_MS / 1000), default=0.0)
    mean = (after["sum"] - before["sum"]) / count if count else None
    return {"samples": int(count), "mean_ms": None if mean is None else round(mean * 1000, 2),
            "samples_over_target": int(over),
            "max_at_most_ms": None if largest == float("inf") else round(largest * 1000, 1)}


@attrs.define
class Server:
    process: subprocess.Popen[bytes]
    base: str
    settings_env: dict[str, str]


def server_env(args: argparse.Namespace, workdir: Path, port: int) -> dict[str, str]:
    """Limits raised so the whole text reaches the prompt builder; short greedy replies."""
    return {"KTULHU_HOST": "127.0.0.1", "KTULHU_PORT": str(port), "KTULHU_DB_PATH": str(workdir / "chatdb"),
            "KTULHU_ANON_RATE": "0", "LLAMA_CLI_THREADS": str(args.threads), "LLAMA_CLI_MAX_TOKENS": "4",
            "LLAMA_CLI_TEMP": "0", "KTULHU_LOG": "warning", "JWT_SECRET": JWT_SECRET,
            "KTULHU_MAX_PROMPT_CHARS": str(max(32_000, args.v1_kb * 1024 // 4 + 1024)),
            "KTULHU_WS_MAX_FRAME": str(1 << 20), "KTULHU_HISTORY_MESSAGES": str(max(24, args.stored))}


async def start_server(args: argparse.Namespace, workdir: Path,
                       prepare: Callable[[Store, dict[str, str]], None]) -> Server:
    port = free_port()
    env = server_env(args, workdir, port)
    store = Store.open(workdir / "chatdb")
    try:
        prepare(store, env)
    finally:
        store.close()
    ktulhu = shutil.which("ktulhu", path=str(Path(sys.executable).parent)) or "ktulhu"
    process = subprocess.Popen([ktulhu, "serve"], cwd=REPO, env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as client:
        with trio.fail_after(180):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with {process.returncode}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.2)
    return Server(process, base, env)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:  # a loop that is still blocked never sees SIGTERM
        server.process.kill()
        server.process.wait()


async def measure(args: argparse.Namespace, server: Server, load: Callable[[], Awaitable[str]]) -> dict[str, Any]:
    """Ping for 1 s idle, run `load` while pinging, then 0.5 s more; compare."""
    pings = Pings()
    stop = threading.Event()
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        before = lag_histogram((await client.get("/metrics")).text)
        outcome = "timeout"
        async with trio.open_nursery() as nursery:
            pinger = functools.partial(ping, server.base, args.interval_ms / 1000, pings, start, stop)
            nursery.start_soon(functools.partial(trio.to_thread.run_sync, pinger, abandon_on_cancel=True))
            await trio.sleep(1.0)
            load_start = time.perf_counter() - start
            with trio.move_on_after(args.timeout):
                outcome = await load()
            load_end = time.perf_counter() - start
            if outcome != "timeout":
                await trio.sleep(0.5)
            stop.set()
            if outcome == "timeout":  # its ping may wait for the blocked server: leave it (it ends
                nursery.cancel_scope.cancel()  # when the server is stopped)
        after = None
        if outcome != "timeout":
            after = lag_histogram((await client.get("/metrics")).text)
    during = pings.summary(load_start, load_end + 0.5)
    if outcome == "timeout" and pings.samples:  # the ping in flight when it gave up waited at least this long
        in_flight = load_end - (pings.samples[-1][0] + pings.samples[-1][1])
        during["rtt_max_ms"] = max(during.get("rtt_max_ms", 0.0), round(in_flight * 1000, 2))
    return {"outcome": outcome, "request_s": round(load_end - load_start, 2),
            # other processes on the machine delay the server's thread too: the idle figures and the
            # load average say how much of the lag is theirs
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "idle": pings.summary(0.0, load_start), "during": during, "ping_failures": pings.failures,
            "metric": histogram_delta(before, after)}


async def scenario_v1(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    token: dict[str, str] = {}

    def prepare(store: Store, env: dict[str, str]) -> None:
        user = store.save_user(User(id=str(uuid.uuid4()), created_ts=now_ms(), role="paid"))
        token["jwt"] = issue_token(load_settings(environ=env, root=REPO), user.id)

    server = await start_server(args, workdir, prepare)
    count = min(1000, args.v1_messages)
    each = args.v1_kb * 1024 // count
    messages = [{"role": "system", "content": "You are brief."}]
    for i in range(count - 1):
        messages.append({"role": "user" if i % 2 == 0 or i == count - 2 else "assistant", "content": text_of(each, i)})
    body = json.dumps({"model": "ktulhu", "messages": messages, "max_tokens": 4, "temperature": 0}).encode()

    async def load() -> str:
        async with httpx.AsyncClient(base_url=server.base, timeout=None) as client:
            response = await client.post("/v1/chat/completions", content=body, headers={
                "Authorization": f"Bearer {token['jwt']}", "Content-Type": "application/json"})
            return f"HTTP {response.status_code}"

    try:
        result = await measure(args, server, load)
    finally:
        stop_server(server)
    return {"body_bytes": len(body), "messages": len(messages), **result}


async def scenario_ws(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    chat_id = str(uuid.uuid4())

    def prepare(store: Store, env: dict[str, str]) -> None:
        store.ensure_chat_for_device(chat_id, "bench")
        for i in range(args.stored):
            store.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, session_id="bench", device_hash="bench",
                                       role="user" if i % 2 == 0 else "assistant",
                                       text=text_of(args.stored_chars, i), language="en", ts=now_ms()))

    server = await start_server(args, workdir, prepare)
    ws_url = server.base.replace("http://", "ws://") + "/ws"

    async def load() -> str:
        request_id = str(uuid.uuid4())
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message(json.dumps({"msg_type": "prompt", "request_id": request_id, "chat_id": chat_id,
                                              "session_id": "bench", "device_hash": "bench",
                                              "text": "And what happened next?", "language": "en"}))
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("done") is True and frame.get("request_id") == request_id:
                    return f"done: {frame.get('reason')}"

    try:
        result = await measure(args, server, load)
    finally:
        stop_server(server)
    return {"stored_messages": args.stored, "stored_chars_each": args.stored_chars, **result}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                              "args": {k: str(v) for k, v in vars(args).items()}, "target_ms": TARGET_MS}
    scenarios = {"v1_1mb": scenario_v1, "ws_1000": scenario_ws}
    for name, scenario in scenarios.items():
        if args.only and args.only != name:
            continue
        workdir = Path(tempfile.mkdtemp(prefix="ktulhu-looplag-"))
        try:
            result[name] = await scenario(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        during = result[name]["during"]
        metric = result[name]["metric"] or {}
        worst = max(during.get("rtt_max_ms", 0.0), metric.get("max_at_most_ms") or 0.0)
        result[name]["worst_lag_ms"] = worst
        result[name]["meets_target"] = result[name]["outcome"] != "timeout" and worst < TARGET_MS
        print(name, json.dumps(result[name]))
    return result


def main() -> None:
    args = parse_args()
    result = trio.run(run, args)
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.baseline is not None:
        result["before"] = json.loads(args.baseline.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
