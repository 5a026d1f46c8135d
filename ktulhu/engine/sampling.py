"""Per-request sampling parameters and the llama.cpp sampler chain built from them.

A request may carry a GBNF grammar (llama.cpp's syntax, rule `root`): its sampler then comes
before the draw, so every token keeps the text a prefix of the grammar's language. llama.cpp
aborts the whole process when a grammar sampler is told to accept a token it rejected (which
happens when the grammar allows no token at all), so a constrained chain is applied and checked
here rather than with `llama_sampler_sample`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
import secrets
from collections.abc import Sequence

import attrs
import llama_cpp
import numpy as np

from ..settings import Settings
from . import llama_log

__all__ = ["GRAMMAR_MAX_CHARS", "SamplingParams", "TokenSampler", "build_chain", "check_grammar"]

#: Prompt tokens fed to the repetition penalty so it also discourages repeating the prompt.
PENALTY_LAST_N = 64
#: Bounds on a request's grammar text and on each `{m,n}` repetition in it (a hostile grammar
#: must not make llama.cpp build an enormous rule set).
GRAMMAR_MAX_CHARS = 32_768
GRAMMAR_MAX_REPEAT = 16_384
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


def _check_range(lo: float, hi: float):
    def check(instance: object, attribute: attrs.Attribute, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{attribute.name} must be a number from {lo} to {hi}, got {value!r}")

    return check


def _check_stop(instance: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if len(value) > 8 or any(not isinstance(s, str) or not s or len(s) > 200 for s in value):
        raise ValueError("stop must be at most 8 non-empty strings of at most 200 characters")


def _check_grammar(instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None:
        check_grammar(value)


def check_grammar(grammar: object) -> None:
    """Raise `ValueError` (saying why) unless `grammar` is a GBNF text llama.cpp accepts.

    The text is parsed without a vocabulary, so token references (`<|im_end|>`, `<[42]>`) are
    refused; everything else a grammar can say is checked exactly as the decode thread will build it.
    """
    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError("grammar must be a non-empty GBNF text (llama.cpp syntax with a `root` rule)")
    if len(grammar) > GRAMMAR_MAX_CHARS:
        raise ValueError(f"grammar must be at most {GRAMMAR_MAX_CHARS} characters, got {len(grammar)}")
    if "\x00" in grammar:
        raise ValueError("grammar must not contain NUL characters")
    for match in _REPEAT.finditer(grammar):
        if any(n and int(n) > GRAMMAR_MAX_REPEAT for n in match.groups()):
            raise ValueError(f"grammar repetition counts must be at most {GRAMMAR_MAX_REPEAT}, got {match.group(0)}")
    try:
        encoded = grammar.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("grammar must be valid Unicode text") from None
    problem = _grammar_problem(encoded)
    if problem:
        raise ValueError(problem)


@functools.lru_cache(maxsize=256)
def _grammar_problem(grammar: bytes) -> str | None:
    llama_log.install()
    with llama_log.expected_failures():
        sampler = llama_cpp.llama_sampler_init_grammar(None, grammar, b"root")
    if not sampler:
        return ("grammar is not valid GBNF: llama.cpp refused it (a syntax error, no `root` rule, an undefined "
                "rule, left recursion, or a token reference such as <|...|>, which is not supported)")
    llama_cpp.llama_sampler_free(sampler)
    return None


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
    #: GBNF grammar (llama.cpp syntax, start rule `root`) the generated text must follow; checked here.
    grammar: str | None = attrs.field(default=None, validator=_check_grammar)

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


def build_chain(
    params: SamplingParams,
    n_vocab: int,
    seed: int,
    *,
    vocab: llama_cpp.llama_vocab_p | None = None,
    recent: Sequence[int] = (),
) -> llama_cpp.llama_sampler_p:
    """penalties -> grammar -> top-k -> top-p -> min-p -> temperature -> draw (greedy at temperature 0).

    `recent` (the prompt's last tokens) primes the repetition penalty only; a grammar needs the
    model's `vocab`. Raises `ValueError` when llama.cpp refuses the grammar. The caller owns the
    chain and frees it with `llama_sampler_free`.
    """
    grammar = None
    if params.grammar is not None:
        if vocab is None:
            raise ValueError("a grammar needs the model's vocabulary")
        with llama_log.expected_failures():
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
        if not grammar:
            raise ValueError("llama.cpp refused the grammar for this model's vocabulary")
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.repeat_penalty != 1.0:
        penalties = llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0)
        for token in list(recent)[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(penalties, token)
        add(chain, penalties)
    if grammar is not None:
        add(chain, grammar)
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


class TokenSampler:
    """One request's sampler chain, owned by the decode thread: `sample` per step, then `close`."""

    def __init__(self, chain: llama_cpp.llama_sampler_p, n_vocab: int, constrained: bool) -> None:
        self._chain = chain
        self._n_vocab = n_vocab
        self._candidates = np.zeros(n_vocab, dtype=_TOKEN_DATA) if constrained else None
        self._ids = np.arange(n_vocab, dtype=np.int32) if constrained else None

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        vocab: llama_cpp.llama_vocab_p,
        n_vocab: int,
        seed: int,
        prompt: Sequence[int] = (),
    ) -> "TokenSampler":
        """Raises `ValueError` when llama.cpp refuses the request's grammar."""
        chain = build_chain(params, n_vocab, seed, vocab=vocab, recent=prompt[-PENALTY_LAST_N:])
        return cls(chain, n_vocab, params.grammar is not None)

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int | None:
        """The next token from the logits at batch position `index`; None when the grammar allows none."""
        if self._candidates is None:
            return llama_cpp.llama_sampler_sample(self._chain, ctx, index)
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        if not logits:
            return None
        candidates = self._candidates
        candidates["id"] = self._ids
        candidates["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=self._n_vocab, selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return None
        chosen = array.data[array.selected]
        if not math.isfinite(chosen.logit):  # every candidate was rejected: the grammar is stuck
            return None
        token = int(chosen.id)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
