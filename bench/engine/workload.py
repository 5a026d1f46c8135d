"""Prompts, per-request records and the statistics every system is summarised with."""

from __future__ import annotations

import statistics
import time

import attrs

TOPICS = ["the history of Rome", "how rain forms", "why the sky is blue", "a recipe for bread",
          "the rules of chess", "how a bicycle works", "the life of bees", "the first moon landing",
          "how to learn a language", "what a CPU does", "the water cycle", "a short poem about autumn",
          "the causes of tides", "how vaccines work", "the Silk Road", "the theory of evolution"]


def chat_prompt(i: int) -> list[dict[str, str]]:
    """A distinct request per stream: the prompts do not share more than the system prompt."""
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"Request {i}: please explain {topic} in detail, step by step."}]


@attrs.define
class Record:
    """One request as a client saw it (seconds)."""

    ttft: float
    gaps: list[float]
    tokens: int
    seconds: float


@attrs.define
class TokenClock:
    """Times of token arrivals for one request, from `started` (perf_counter seconds)."""

    started: float
    first: float | None = None
    last: float | None = None
    gaps: list[float] = attrs.field(factory=list)

    def tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def record(self, tokens: int) -> Record:
        end = self.last if self.last is not None else time.perf_counter()
        return Record(ttft=(self.first or end) - self.started, gaps=self.gaps, tokens=tokens,
                      seconds=end - self.started)


def show(level: int, system: str, summary: dict) -> None:
    print(f"[{level:>2} streams] {system:<13} {summary['tokens_per_s']:>8} tok/s  "
          f"ttft p50 {summary['ttft_p50_ms']} ms  itl p50 {summary['itl_p50_ms']} ms", flush=True)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarise(records: list[Record], wall: float) -> dict[str, float | int | None]:
    gaps = [g for r in records for g in r.gaps]
    ttfts = [r.ttft for r in records]
    tokens = sum(r.tokens for r in records)
    return {
        "requests": len(records),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_mean_ms": _ms(statistics.fmean(ttfts)) if ttfts else None,
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "itl_p50_ms": _ms(percentile(gaps, 50)),
        "itl_p99_ms": _ms(percentile(gaps, 99)),
        "itl_mean_ms": _ms(statistics.fmean(gaps)) if gaps else None,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summarise_rounds(rounds: list[tuple[list[Record], float]]) -> dict[str, float | int | None]:
    """Latency percentiles over every round's requests; tokens/s of the median round."""
    pooled = summarise([r for records, _ in rounds for r in records], sum(wall for _, wall in rounds))
    rates = sorted(sum(r.tokens for r in records) / wall for records, wall in rounds if wall > 0)
    pooled["tokens_per_s"] = round(statistics.median(rates), 2) if rates else None
    pooled["tokens_per_s_rounds"] = [round(rate, 2) for rate in rates]
    return pooled
