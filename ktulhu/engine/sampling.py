"""Per-request sampling parameters and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import math
import secrets

import attrs
import llama_cpp

from ..settings import Settings

__all__ = ["SamplingParams", "build_chain"]

#: Prompt tokens fed to the repetition penalty so it also discourages repeating the prompt.
PENALTY_LAST_N = 64


def _check_range(lo: float, hi: float):
    def check(instance: object, attribute: attrs.Attribute, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{attribute.name} must be a number from {lo} to {hi}, got {value!r}")

    return check


def _check_stop(instance: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if len(value) > 8 or any(not isinstance(s, str) or not s or len(s) > 200 for s in value):
        raise ValueError("stop must be at most 8 non-empty strings of at most 200 characters")


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How one request samples. Invalid values raise `ValueError` naming the parameter."""

    temperature: float = attrs.field(default=0.7, validator=_check_range(0.0, 5.0))
    top_k: int = attrs.field(default=40, validator=_check_range(0, 1_000_000))
    top_p: float = attrs.field(default=0.9, validator=_check_range(0.0, 1.0))
    min_p: float = attrs.field(default=0.0, validator=_check_range(0.0, 1.0))
    repeat_penalty: float = attrs.field(default=1.0, validator=_check_range(0.0, 10.0))
    max_tokens: int = attrs.field(default=512, validator=_check_range(1, 1 << 20))
    #: None = a fresh random seed for this request.
    seed: int | None = attrs.field(default=None)
    stop: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_check_stop)
    #: Keep a reasoning model's thinking block in the visible text.
    include_thinking: bool = False
    #: Generate exactly `max_tokens` even past end-of-turn (benchmarks; never for chat replies).
    ignore_eos: bool = False

    @seed.validator
    def _check_seed(self, attribute: attrs.Attribute, value: int | None) -> None:
        if value is not None and not (isinstance(value, int) and 0 <= value < 2**32):
            raise ValueError(f"seed must be a whole number from 0 to {2**32 - 1}, got {value!r}")

    @classmethod
    def defaults(cls, settings: Settings, **overrides: object) -> "SamplingParams":
        """The `LLAMA_CLI_*` defaults, with `overrides` (None values ignored)."""
        base = {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
                "max_tokens": settings.max_tokens}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else secrets.randbits(32)


def build_chain(params: SamplingParams, n_vocab: int, seed: int) -> llama_cpp.llama_sampler_p:
    """penalties -> top-k -> top-p -> min-p -> temperature -> draw (greedy at temperature 0).

    The caller owns the chain and frees it with `llama_sampler_free`.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.repeat_penalty != 1.0:
        add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
    if params.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain
