"""Store benchmark. One command: ``python -m bench.store`` writes ``bench/results/store.json``.

1. Concurrent message saves from trio tasks through `AsyncStore` (target >= 5,000/s), with the
   longest stall of the trio loop seen meanwhile; and the inline (same-thread) path for comparison:
   its throughput and per-call latency (it blocks the loop for each call's duration).
2. A store with `--messages` (default 1,000,000) messages in the original's layout, bulk-loaded with
   WriteBatches, then opened (the migration builds the indexes, timed), then
   `list_recent_messages(25)` (target < 5 ms) against the original's full scan (`baseline.py`).
3. The history of a 1,000-message chat (target < 20 ms), in the new and in the original layout.
4. The same on the PostgreSQL engine (`KTULHU_STORE=postgresql://...`), on a PostgreSQL server this
   benchmark starts in a temp dir with its own ``fsync`` ON (commits are durable: the store sets
   ``synchronous_commit = on``): concurrent saves through `AsyncStore` on the engine's default
   threads (target >= 1,000/s) and inline; then the 1,000,000-message store of step 2 is copied into
   it with `ktulhu store copy` (timed: the bulk path) and `list_recent_messages(25)` (target < 5 ms)
   and the 1,000-message histories are timed there. Skipped with ``--no-postgres`` or when no
   PostgreSQL is installed (/usr/lib/postgresql/*/bin).

Medians of repeated runs; ratios are baseline / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from bench.paths import REPO
from ktulhu.store import AsyncStore, Message, Store
from ktulhu.store.aio import DEFAULT_THREADS
from ktulhu.store.postgres import POSTGRES_THREADS

from . import baseline

RESULTS = REPO / "bench" / "results" / "store.json"
BASE_S = 1_600_000_000  # legacy timestamps (seconds)
TEXT = "The quick brown fox jumps over the lazy dog. " * 4  # ~180 bytes, a typical short turn


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def timed(fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


# --- 1. concurrent saves -------------------------------------------------------------------------


async def _saves_async(aio: AsyncStore, tasks: int, per_task: int, run: int) -> tuple[float, float]:
    stall = 0.0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal stall
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.0005)
            now = trio.current_time()
            stall = max(stall, now - last - 0.0005)
            last = now

    async def writer(t: int) -> None:
        for i in range(per_task):
            await aio.save_message(Message(id=f"r{run}t{t}m{i}", chat_id=f"r{run}c{t}", role="user",
                                           text=TEXT, ts=1_700_000_000_000 + i))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async with trio.open_nursery() as writers:
            for t in range(tasks):
                writers.start_soon(writer, t)
        elapsed = time.perf_counter() - start
        done.set()
    return (tasks * per_task) / elapsed, stall


def bench_saves(location: Path | str, tasks: int, per_task: int, rounds: int, threads: int,
                inline: int | None = None, target: int = 5000) -> dict[str, Any]:
    store = Store.open(location, connections=threads + 4)
    try:
        aio = AsyncStore(store, limiter=trio.CapacityLimiter(threads))
        rates, stalls = [], []
        for run in range(rounds):
            rate, stall = trio.run(_saves_async, aio, tasks, per_task, run)
            rates.append(rate)
            stalls.append(stall)
        inline_latencies = []
        start = time.perf_counter()
        count = tasks * per_task if inline is None else inline
        for i in range(count):
            t0 = time.perf_counter()
            store.save_message(Message(id=f"i{i}", chat_id=f"inline{i % tasks}", role="user", text=TEXT,
                                       ts=1_700_000_000_000 + i))
            inline_latencies.append(time.perf_counter() - t0)
        inline_rate = count / (time.perf_counter() - start)
    finally:
        store.close()
    inline_latencies.sort()
    return {
        "tasks": tasks, "saves_per_round": tasks * per_task, "rounds": rounds, "threads": threads,
        "async_saves_per_s_median": round(statistics.median(rates)),
        "async_saves_per_s_runs": [round(r) for r in rates],
        "async_max_loop_stall_ms": ms(max(stalls)),
        "inline_saves_per_s": round(inline_rate),
        "inline_call_ms_p50": ms(inline_latencies[len(inline_latencies) // 2]),
        "inline_call_ms_p99": ms(inline_latencies[int(len(inline_latencies) * 0.99)]),
        "inline_call_ms_max": ms(inline_latencies[-1]),
        "inline_saves": count,
        "target_saves_per_s": target,
        "met": statistics.median(rates) >= target,
    }


# --- 2 + 3. a large store in the original's layout ----------------------------------------------


def legacy_message(chat_id: str, message_id: str, role: str, ts: int) -> bytes:
    return (
        f'{{"id":"{message_id}","chat_id":"{chat_id}","session_id":"s","user_id":null,"device_hash":"dev",'
        f'"role":"{role}","text":"{TEXT}","language":"en","attachments":[],"liked":false,"ts":{ts},"meta":null}}'
    ).encode()


def bulk_load(path: Path, messages: int, chats: int, history: int) -> float:
    """`messages` in the original's layout (of which `history` in one chat), written with WriteBatches
    (WAL off for the load, flushed at the end)."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    db = Rdict(str(path), options)
    no_wal = WriteOptions()
    no_wal.disable_wal = True
    start = time.perf_counter()
    batch = WriteBatch(raw_mode=True)
    per_chat = max(1, (messages - history) // chats)
    for i in range(messages - history):
        chat = f"chat{i // per_chat:06d}"
        ts = BASE_S + i
        mid = f"m{i:08d}"
        batch.put(b"chat:%s:msg:%020d:%s" % (chat.encode(), ts, mid.encode()),
                  legacy_message(chat, mid, "user" if i % 2 == 0 else "assistant", ts))
        if i % per_chat == 0:
            batch.put(f"chat:meta:{chat}".encode(),
                      f'{{"id":"{chat}","title":null,"user_id":null,"device_hash":"dev","updated_ts":{ts},"meta":{{}}}}'.encode())
        if batch.len() >= 50_000:
            db.write(batch, no_wal)
            batch = WriteBatch(raw_mode=True)
    for j in range(history):  # one long chat in the original layout, older than the rest
        ts = BASE_S - history + j
        batch.put(b"chat:legacyhistory:msg:%020d:h%06d" % (ts, j), legacy_message("legacyhistory", f"h{j:06d}", "user", ts))
    db.write(batch, no_wal)
    db.flush()
    db.close()
    return time.perf_counter() - start


def bench_large(work: Path, messages: int, history: int, repeat: int) -> dict[str, Any]:
    """`messages` in all: the bulk-loaded original layout, plus `history` saved through the store."""
    path = work / "large"
    chats = max(1, messages // 100)
    messages -= history
    load_s = bulk_load(path, messages, chats, history)
    start = time.perf_counter()
    store = Store.open(path)  # runs the 0 -> 1 migration: builds every index
    migrate_s = time.perf_counter() - start
    try:
        for j in range(history):  # the same long chat, written by Ktulhu (new layout)
            store.save_message(Message(id=f"n{j:06d}", chat_id="newhistory", role="user" if j % 2 == 0 else "assistant",
                                       text=TEXT, ts=1_800_000_000_000 + j))
        ours = timed(lambda: store.list_recent_messages(25), repeat)
        base = timed(lambda: baseline.list_recent_messages(store._rdict(), 25), 3)
        ours_result = [m.id for m in store.list_recent_messages(25)]
        # the baseline only sees the original layout, so compare after excluding the new chat
        base_ids = [m["id"] for m in baseline.list_recent_messages(store._rdict(), 25)]
        ours_legacy = [m.id for m in store.list_recent_messages(25 + history) if m.chat_id != "newhistory"][:25]
        hist_new = timed(lambda: store.list_messages_for_chat("newhistory"), repeat)
        hist_old = timed(lambda: store.list_messages_for_chat("legacyhistory"), repeat)
        last_24 = timed(lambda: store.list_messages_for_chat("newhistory", last=24), repeat)
        assert len(store.list_messages_for_chat("newhistory")) == history
        assert len(store.list_messages_for_chat("legacyhistory")) == history
    finally:
        store.close()
    ours_med, base_med = statistics.median(ours), statistics.median(base)
    return {
        "messages": messages + history, "chats": chats + 2, "loaded_in_original_layout": messages,
        "bulk_load_s": round(load_s, 2), "migration_s": round(migrate_s, 2),
        "recent_25": {
            "ours_ms_median": ms(ours_med), "ours_ms_max": ms(max(ours)), "runs": repeat,
            "baseline_full_scan_ms_median": ms(base_med), "baseline_runs": 3,
            "ratio_baseline_over_ours": round(base_med / ours_med),
            "newest_from_new_layout": ours_result[0].startswith("n"),
            "baseline_top_is_newest_legacy": base_ids[0] == f"m{messages - history - 1:08d}",
            "same_order_on_legacy_data": [i for i in ours_legacy if i] == base_ids[: len(ours_legacy)],
            "target_ms": 5, "met": ours_med * 1000 < 5,
        },
        "history_1000": {
            "new_layout_ms_median": ms(statistics.median(hist_new)),
            "original_layout_ms_median": ms(statistics.median(hist_old)),
            "last_24_ms_median": ms(statistics.median(last_24)),
            "runs": repeat, "target_ms": 20,
            "met": max(statistics.median(hist_new), statistics.median(hist_old)) * 1000 < 20,
        },
    }


# --- 4. the PostgreSQL engine ---------------------------------------------------------------------


def bench_postgres(large_path: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """Steps 1-3 on PostgreSQL (fsync on), the large store copied in from RocksDB."""
    try:
        sys.path.insert(0, str(REPO))
        from tests.postgres import fresh_database, postgres_bin, start_server, stop_server
    except ImportError as error:
        print(f"postgresql: skipped ({error})", flush=True)
        return None
    if postgres_bin() is None:
        print("postgresql: skipped (not installed)", flush=True)
        return None
    from ktulhu.store.copy import copy_store

    server = start_server(fsync=True, extra={"shared_buffers": "256MB", "max_wal_size": "4GB"})
    try:
        version = server.bin.parent.name
        print(f"postgresql {version} (fsync on): concurrent saves, {args.pg_threads} threads ...", flush=True)
        saves = bench_saves(fresh_database(server), args.tasks, args.per_task, args.rounds, args.pg_threads,
                            inline=args.pg_inline, target=1000)
        print(json.dumps(saves), flush=True)
        url = fresh_database(server)
        print("postgresql: copying the large store in (ktulhu store copy) ...", flush=True)
        with open(os.devnull, "w") as quiet:
            report = copy_store(large_path, url, progress=False, out=quiet)
        assert report.verified, report.lines()
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE kv")  # what autovacuum does soon after a bulk load
            table_bytes = conn.execute("SELECT pg_total_relation_size('kv')").fetchone()[0]
        store = Store.open(url)
        try:
            ours = timed(lambda: store.list_recent_messages(25), args.repeat)
            ids = [m.id for m in store.list_recent_messages(25)]
            hist_new = timed(lambda: store.list_messages_for_chat("newhistory"), args.repeat)
            hist_old = timed(lambda: store.list_messages_for_chat("legacyhistory"), args.repeat)
            last_24 = timed(lambda: store.list_messages_for_chat("newhistory", last=24), args.repeat)
            messages = len(store.list_messages_for_chat("newhistory")) + len(store.list_messages_for_chat("legacyhistory"))
        finally:
            store.close()
        rocks = Store.open(large_path)
        try:
            same = ids == [m.id for m in rocks.list_recent_messages(25)]
        finally:
            rocks.close()
        large = {
            "keys": report.source_keys, "table_bytes": table_bytes,
            "copy_s": round(report.seconds, 1), "copy_keys_per_s": round(report.source_keys / report.seconds),
            "recent_25": {"ms_median": ms(statistics.median(ours)), "ms_max": ms(max(ours)), "runs": args.repeat,
                          "same_result_as_rocksdb": same, "target_ms": 5,
                          "met": statistics.median(ours) * 1000 < 5},
            "history_1000": {"new_layout_ms_median": ms(statistics.median(hist_new)),
                             "original_layout_ms_median": ms(statistics.median(hist_old)),
                             "last_24_ms_median": ms(statistics.median(last_24)), "messages_read": messages,
                             "runs": args.repeat, "target_ms": 20,
                             "met": max(statistics.median(hist_new), statistics.median(hist_old)) * 1000 < 20},
        }
        print(json.dumps(large), flush=True)
        return {"server": f"PostgreSQL {version}, fsync on, synchronous_commit on, shared_buffers 256MB",
                "concurrent_saves": saves, "large_store": large}
    finally:
        stop_server(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=1_000)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the stores (default: a temp dir)")
    parser.add_argument("--no-postgres", action="store_true", help="RocksDB only (skip step 4)")
    parser.add_argument("--pg-threads", type=int, default=POSTGRES_THREADS)
    parser.add_argument("--pg-inline", type=int, default=2000, help="inline (one thread) saves on PostgreSQL")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ktulhu-bench-store-", dir=args.workdir))
    try:
        print(f"concurrent saves: {args.tasks} trio tasks x {args.per_task}, {args.rounds} rounds ...", flush=True)
        saves = bench_saves(work / "saves", args.tasks, args.per_task, args.rounds, args.threads)
        print(json.dumps(saves), flush=True)
        print(f"large store: {args.messages:,} messages ...", flush=True)
        large = bench_large(work, args.messages, args.history, args.repeat)
        print(json.dumps(large), flush=True)
        postgres = None if args.no_postgres else bench_postgres(work / "large", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "store",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
        "concurrent_saves": saves,
        "large_store": large,
    }
    if postgres is not None:
        result["postgresql"] = postgres
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
