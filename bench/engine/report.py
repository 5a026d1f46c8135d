"""docs/benchmarks.md (tables with ratios) and a PNG plot from one benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SYSTEMS = (("ours", "Ktulhu engine"), ("llama_server", "llama-server"), ("baseline", "original design"))
# Sections from the first heading of this name on come from other benchmarks and are kept as they are.
KEPT_FROM = "## Store engines"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def write(results: dict[str, Any], docs: Path) -> None:
    sweep = results["sweep"]
    levels = sorted({int(level) for system in sweep.values() for level in system}, key=int)
    lines = [
        "# Benchmarks",
        "",
        "Measured side by side in one run of `make bench-engine` (`python -m bench.engine`) on "
        f"{results['machine']['platform']}, {results['machine']['threads']} threads, model "
        f"`{results['model']}`, {results['max_tokens']} generated tokens per request (greedy, end of turn "
        f"ignored), {results['ctx_per_slot']} tokens of context per slot, at {results['measured_at']}. "
        f"Each concurrency level runs the three systems in turn, {results['rounds']} times; tokens/s is the "
        "median round, latency percentiles pool all rounds.",
        f"llama-server: {results['llama_server']}.",
        "",
        "The Ktulhu engine is measured in-process (its time to first token is the first text reaching the "
        "requesting trio task; inter-token gaps are taken at sampling). llama-server is measured over "
        "loopback HTTP streaming, one SSE event per token. The original design runs one single-sequence "
        "context per stream with the CPU threads divided between them.",
        "",
        "## Concurrency sweep",
        "",
        "| streams | system | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        for key, name in SYSTEMS:
            row = sweep.get(key, {}).get(level) or sweep.get(key, {}).get(str(level))
            if row:
                lines.append(f"| {level} | {name} | {row['tokens_per_s']} | {row['ttft_p50_ms']} | "
                             f"{row['ttft_p99_ms']} | {row['itl_p50_ms']} | {row['itl_p99_ms']} |")
    lines += ["", "Ratios of aggregate tokens/s:", "",
              "| streams | ours / llama-server | ours / original design | Python bookkeeping share of a step |",
              "|---|---|---|---|"]
    for level in levels:
        ours = _get(sweep, "ours", level)
        lines.append(f"| {level} | {_ratio(ours.get('tokens_per_s'), _get(sweep, 'llama_server', level).get('tokens_per_s'))}"
                     f" | {_ratio(ours.get('tokens_per_s'), _get(sweep, 'baseline', level).get('tokens_per_s'))}"
                     f" | {ours.get('python_bookkeeping_share', '—')} |")
    replay = results["chat_replay"]
    lines += ["", "## 10-turn chat replay", "",
              "Time to first token of each turn of one conversation: prefix cache kept (warm) or dropped "
              "before every turn (cold).", "",
              "| turn | prompt tokens | cached (warm) | TTFT warm ms | TTFT cold ms |", "|---|---|---|---|---|"]
    for i, (warm, cold) in enumerate(zip(replay["warm"], replay["cold"]), start=1):
        lines.append(f"| {i} | {warm['prompt_tokens']} | {warm['cached_tokens']} | {warm['ttft_ms']} | {cold['ttft_ms']} |")
    lines += ["", f"Last turn warm / cold: **{replay['last_turn_ratio']}**.", "",
              "## Cancel latency", "",
              "From `cancel()` to the slot being free in the decode thread, with 4 streams busy, cancelling "
              "during decode (the next step drops the sequence) and during a long prefill (llama.cpp's abort "
              "callback interrupts the step).", ""]
    c = results["cancel"]
    lines += [f"- {c['cancels']} cancels: p50 **{c['p50_ms']} ms**, p99 **{c['p99_ms']} ms** "
              f"(during decode p99 {c['decode_p99_ms']} ms, during prefill p99 {c['prefill_p99_ms']} ms); "
              f"mean decode step {c['mean_step_ms']} ms.", ""]
    lines += ["## Reading the figures", "",
              "On a small CPU, llama.cpp's kernels are compute-bound: one batched step of N sequences costs "
              "nearly N single steps, so batching adds little aggregate throughput and the engine and "
              "llama-server (same kernels, same batching) meet. What separates them from the original "
              "design is prompt work: prefix reuse (the shared system prompt, and whole earlier turns of a "
              "chat) and batched prefill, seen in the time to first token and the chat replay. On a GPU, "
              "where a step is memory-bound, batching multiplies throughput.", "",
              "The engine prefills new prompts in chunks sized so that a step lasts about "
              "`KTULHU_STEP_TARGET_MS` (never under 64 tokens, where the CPU kernels lose efficiency): its "
              "first streams start earlier than llama-server's, at the cost of occasional inter-token gaps of "
              "one such step while later prompts are prefilled (the ITL p99 column).", "",
              "## On a GPU", "",
              "`bash bench/gpu.sh` builds the CUDA variant of llama-cpp-python and of llama-server (same "
              "sources and flags), checks with `ktulhu doctor` that every layer is on the GPU, and runs this "
              "benchmark with all layers offloaded on both sides; its tables and plot go to "
              "`bench/results/gpu/`.", ""]
    if _plot(results, levels, docs / "benchmarks-engine.png"):
        lines += ["![aggregate tokens/s by streams](benchmarks-engine.png)", ""]
    path = docs / "benchmarks.md"
    previous = path.read_text() if path.exists() else ""
    kept = previous[previous.index(KEPT_FROM):] if KEPT_FROM in previous else ""
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


def _get(sweep: dict, key: str, level: int) -> dict:
    system = sweep.get(key, {})
    return system.get(level) or system.get(str(level)) or {}


def _plot(results: dict[str, Any], levels: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, name in SYSTEMS:
        points = [(level, _get(results["sweep"], key, level)) for level in levels]
        points = [(level, row) for level, row in points if row]
        if points:
            left.plot([p[0] for p in points], [p[1]["tokens_per_s"] for p in points], marker="o", label=name)
            right.plot([p[0] for p in points], [p[1]["ttft_p50_ms"] for p in points], marker="o", label=name)
    left.set(xlabel="concurrent streams", ylabel="aggregate tokens/s", xscale="log", title="Throughput")
    right.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log", title="Time to first token")
    for axis in (left, right):
        axis.set_xticks(levels, [str(x) for x in levels])
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
