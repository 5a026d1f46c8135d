"""`python -m bench.engine.speculative`: speculative decoding (prompt-lookup drafts) off and on, side by side.

One process, one model: two engines (`KTULHU_SPECULATIVE=off` and `ngram`, otherwise alike) run the
same greedy requests in turn, interleaved round by round (the order alternating), at each
concurrency level. Two workloads: replies that quote their conversation (a paragraph repeated, a
text's spelling corrected, a function edited) and ordinary chat replies. Reported per level and
workload: tokens/s (the median round) and inter-token gaps for both, their ratios, the drafts'
acceptance, and whether every reply was the same text both ways. Results go to
bench/results/speculative.json; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import trio

from bench.paths import REPO
from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.sampling import SamplingParams
from ktulhu.engine.worker import physical_cores
from ktulhu.settings import load_settings

from .workload import Record, chat_prompt, summarise_rounds

MODES = ("off", "ngram")
PARAGRAPHS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a cloth to "
    "polish the great lens. Ships far out at sea trusted the steady beam to guide them past the rocks.",
    "Our village market opens at seven on Saturdays. Farmers bring apples, honey, cheese and fresh bread, and "
    "the baker always sells out of cinnamon rolls before nine, so arrive early if you want one.",
    "To reset the router, unplug it from the wall, wait thirty seconds, and plug it back in. When the green "
    "light stops blinking, reconnect your laptop to the network and try loading a page again.",
    "Maria planted tomatoes, peppers and basil along the south wall of the garden, where the sun is strongest. "
    "By August the plants were taller than her and the kitchen smelled of sauce every evening.",
    "The meeting is moved from Tuesday to Thursday at three in the afternoon, in the small room on the second "
    "floor. Please bring the quarterly figures and your notes on the new delivery schedule.",
    "Glaciers form where more snow falls in winter than melts in summer. Over many years the snow is pressed "
    "into ice, which slowly flows downhill under its own weight, carving valleys as it moves.",
    "Thank you for your order. Your parcel left our warehouse this morning and should arrive within three "
    "working days. You can follow its progress with the tracking number in this message.",
    "The old library on Elm Street reopened after two years of repairs. It now has a reading garden, a room "
    "for children's stories, and twenty new computers that anyone with a library card may use.",
]
FUNCTIONS = [
    "def total_price(items):\n    total = 0\n    for item in items:\n        total = total + item.price * item.count\n"
    "    return total\n",
    "def average(values):\n    if not values:\n        return 0\n    result = sum(values) / len(values)\n"
    "    return result\n",
    "def greet(name):\n    message = 'Hello, ' + name + '!'\n    print(message)\n    return message\n",
]


def misspell(text: str) -> str:
    """Every fourth word of four letters or more with two inner letters swapped."""
    words = text.split(" ")
    for i in range(0, len(words), 4):
        word = words[i]
        if len(word) >= 4 and word.isalpha():
            words[i] = word[0] + word[2] + word[1] + word[3:]
    return " ".join(words)


def quote_prompt(i: int) -> list[ChatMessage]:
    """A request whose reply quotes it: repeat, correct or edit (the task and the text vary with `i`)."""
    task = i % 3
    paragraph = PARAGRAPHS[i % len(PARAGRAPHS)]
    if task == 0:
        text = f"Repeat the following paragraph exactly:\n\n{paragraph}"
    elif task == 1:
        text = f"Correct the spelling in the following text and write it out in full:\n\n{misspell(paragraph)}"
    else:
        code = FUNCTIONS[i % len(FUNCTIONS)]
        text = f"Add a docstring to this Python function and show the whole function:\n\n```python\n{code}```"
    return [ChatMessage("user", text)]


def ordinary_prompt(i: int) -> list[ChatMessage]:
    return [ChatMessage(**message) for message in chat_prompt(i)]


WORKLOADS = {"quote": quote_prompt, "chat": ordinary_prompt}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine.speculative", description=__doc__)
    parser.add_argument("--levels", default="1,8", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=96,
                        help="most tokens per reply (greedy, ending at end of turn)")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per slot")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions per level")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speculative.json")
    return parser.parse_args()


async def streams(engine: Engine, prompts: list[list[ChatMessage]],
                  max_tokens: int) -> tuple[list[Record], float, list[str]]:
    """All prompts at once; each reply's record (gaps taken at sampling) and text, and the wall time."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    records: list[Record | None] = [None] * len(prompts)
    texts = [""] * len(prompts)
    started = time.perf_counter()

    async def stream(i: int) -> None:
        t0 = time.perf_counter()
        first = None
        pieces = []
        with await engine.chat(prompts[i], params) as gen:
            async for piece in gen:
                first = first or time.perf_counter()
                pieces.append(piece)
        m = gen.metrics
        texts[i] = "".join(pieces)
        records[i] = Record(ttft=(first or time.perf_counter()) - t0, gaps=m.gaps, tokens=m.generated_tokens,
                            seconds=m.finished - t0)

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(stream, i)
    return records, time.perf_counter() - started, texts


def drafts(engine: Engine) -> tuple[int, int]:
    stats = engine.stats().workers[0]
    return stats.draft_tokens, stats.accepted_tokens


async def level_run(model: Model, args: argparse.Namespace, level: int) -> dict:
    """Both engines up; per round and workload, each mode in turn (the order alternating by round)."""
    engines = {mode: Engine(model, load_settings(environ={
        "KTULHU_SLOTS": str(level), "LLAMA_CLI_CTX": str(args.ctx), "LLAMA_CLI_THREADS": str(args.threads),
        "KTULHU_QUEUE": "256", "KTULHU_SPECULATIVE": mode}, root=REPO)) for mode in MODES}
    runs: dict[str, dict[str, list]] = {w: {m: [] for m in MODES} for w in WORKLOADS}
    texts: dict[str, dict[str, list[str]]] = {w: {m: [] for m in MODES} for w in WORKLOADS}
    counted: dict[str, list[int]] = {w: [0, 0] for w in WORKLOADS}
    async with trio.open_nursery() as nursery:
        for engine in engines.values():
            await nursery.start(engine.run)
        for round_ in range(args.rounds):
            for workload, make in WORKLOADS.items():
                prompts = [make(round_ * level + i) for i in range(level)]
                order = MODES if round_ % 2 == 0 else MODES[::-1]
                for mode in order:
                    engine = engines[mode]
                    await streams(engine, [make(1000 + i) for i in range(level)], 4)  # warm-up
                    before = drafts(engine)
                    records, wall, replies = await streams(engine, prompts, args.max_tokens)
                    runs[workload][mode].append((records, wall))
                    texts[workload][mode] += replies
                    if mode == "ngram":
                        after = drafts(engine)
                        counted[workload][0] += after[0] - before[0]
                        counted[workload][1] += after[1] - before[1]
        nursery.cancel_scope.cancel()
    return {workload: summary(runs[workload], texts[workload], counted[workload], level, workload)
            for workload in WORKLOADS}


def summary(runs: dict[str, list], texts: dict[str, list[str]], counted: list[int], level: int,
            workload: str) -> dict:
    result = {mode: summarise_rounds(runs[mode]) for mode in MODES}
    off, on = result["off"], result["ngram"]
    result["tokens_per_s_ratio"] = _ratio(on["tokens_per_s"], off["tokens_per_s"])
    result["itl_mean_ratio"] = _ratio(on["itl_mean_ms"], off["itl_mean_ms"])
    result["itl_p99_ratio"] = _ratio(on["itl_p99_ms"], off["itl_p99_ms"])
    result["draft_tokens"], result["accepted_tokens"] = counted
    result["same_replies"] = sum(a == b for a, b in zip(texts["off"], texts["ngram"]))
    result["replies"] = len(texts["off"])
    print(f"[{level:>2} streams] {workload:<5} tok/s off {off['tokens_per_s']} on {on['tokens_per_s']} "
          f"(x{result['tokens_per_s_ratio']}), ITL mean {off['itl_mean_ms']} / {on['itl_mean_ms']} ms, "
          f"p99 {off['itl_p99_ms']} / {on['itl_p99_ms']} ms, drafts {counted[1]}/{counted[0]} accepted, "
          f"same replies {result['same_replies']}/{result['replies']}", flush=True)
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


async def main(args: argparse.Namespace) -> dict:
    model = await trio.to_thread.run_sync(Model.load, load_settings(environ={}, root=REPO))
    try:
        levels = {level: await level_run(model, args, level) for level in (int(x) for x in args.levels.split(","))}
    finally:
        model.close()
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "model": model.info.path.rsplit("/", 1)[-1],
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "ctx_per_slot": args.ctx,
        "levels": levels,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


if __name__ == "__main__":
    arguments = parse_args()
    outcome = trio.run(main, arguments)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"wrote {arguments.out}")
