"""Per-request sampling parameters and the llama.cpp sampler chain built from them.

The chain follows llama-server's order: logit biases, then penalties (repetition, presence,
frequency), then the grammar, then the truncations and the draw. A request may carry a GBNF
grammar (llama.cpp's syntax, rule `root`; `json_grammar` makes one from a JSON schema): its
sampler then comes before the draw, so every token keeps the text a prefix of the grammar's
language. llama.cpp aborts the whole process when a grammar sampler is told to accept a token it rejected (which
happens when the grammar allows no token at all), so a constrained chain is applied and checked
here rather than with `llama_sampler_sample`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
import secrets
from collections.abc import Sequence

import attrs
import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from ..settings import Settings
from . import llama_log

__all__ = ["GRAMMAR_MAX_CHARS", "LOGIT_BIAS_MAX", "SCHEMA_MAX_CHARS", "TOP_LOGPROBS_MAX", "SamplingParams",
           "TokenSampler", "build_chain", "check_grammar", "json_grammar", "plain_greedy", "token_logprobs"]

#: Prompt tokens fed to the repetition penalty so it also discourages repeating the prompt.
PENALTY_LAST_N = 64
#: Bounds on a request's grammar text and on each `{m,n}` repetition in it (a hostile grammar
#: must not make llama.cpp build an enormous rule set).
GRAMMAR_MAX_CHARS = 32_768
GRAMMAR_MAX_REPEAT = 16_384
#: Most entries of a request's `logit_bias`; a bias of -100 (the least) bans the token.
LOGIT_BIAS_MAX = 1024
LOGIT_BIAS_BAN = -100.0
#: Most alternatives a request may ask for with each token's log probability (OpenAI's bound).
TOP_LOGPROBS_MAX = 20
#: Longest JSON schema (serialised) that `json_grammar` converts.
SCHEMA_MAX_CHARS = 65_536
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


def _check_repeat_penalty(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= 10.0):
        raise ValueError(f"repeat_penalty must be a number above 0 and at most 10 (1 = off), got {value!r}")


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    items = value.items() if isinstance(value, dict) else value
    try:
        return tuple(sorted((token, bias) for token, bias in items))  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError("logit_bias must map token ids to biases") from None


def _check_logit_bias(instance: object, attribute: attrs.Attribute, value: tuple[tuple[int, float], ...]) -> None:
    if len(value) > LOGIT_BIAS_MAX:
        raise ValueError(f"logit_bias may hold at most {LOGIT_BIAS_MAX} tokens, got {len(value)}")
    for token, bias in value:
        if not (isinstance(token, int) and not isinstance(token, bool) and 0 <= token < 2**31):
            raise ValueError(f"logit_bias keys must be token ids (whole numbers from 0), got {token!r}")
        if not (isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
                and -100 <= bias <= 100):
            raise ValueError(f"logit_bias values must be numbers from -100 to 100, got {bias!r} for token {token}")


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


_COUNT_KEYS = frozenset({"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"})


def _schema_repeats(schema: object) -> int:
    """The sum of every length, item count and `{m,n}` in a pattern of `schema`: llama_cpp's
    converter spells a repetition out, so its work and its grammar grow with this sum."""
    total = 0
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
                    total += abs(value)
                elif key == "pattern" and isinstance(value, str):
                    total += sum(int(n) for match in _REPEAT.finditer(value) for n in match.groups() if n)
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return total


def json_grammar(schema: object = None) -> str:
    """A checked GBNF grammar for JSON text: any JSON object when `schema` is None, else a value
    that `schema` (a JSON schema object) accepts. Raises `ValueError` saying why when the schema
    cannot be expressed (unsupported keywords, remote `$ref`s, a grammar over the size limits)."""
    if schema is None:
        grammar = JSON_GBNF
    else:
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be an object")
        try:
            text = json.dumps(schema)
        except RecursionError:
            raise ValueError("the JSON schema is nested too deeply") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the JSON schema cannot be serialised: {exc}") from None
        if len(text) > SCHEMA_MAX_CHARS:
            raise ValueError(f"the JSON schema must be at most {SCHEMA_MAX_CHARS} characters as JSON")
        if _schema_repeats(schema) > GRAMMAR_MAX_CHARS:  # the converter writes repetitions out in full
            raise ValueError(f"the JSON schema's lengths, item counts and pattern repetitions add up to more than "
                             f"{GRAMMAR_MAX_CHARS}")
        try:
            grammar = json_schema_to_gbnf(text)
        except RecursionError:
            raise ValueError("the JSON schema is nested too deeply (or refers to itself without end)") from None
        except Exception as exc:  # noqa: BLE001 - llama_cpp's converter raises anything on odd schemas
            raise ValueError(f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
    try:
        check_grammar(grammar)
    except ValueError as exc:
        raise ValueError(f"the JSON schema's grammar is refused: {exc}") from None
    return grammar


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How one request samples. Invalid values raise `ValueError` naming the parameter."""

    temperature: float = attrs.field(default=0.7, validator=_check_range(0.0, 5.0))
    top_k: int = attrs.field(default=40, validator=_check_range(0, 1_000_000))
    top_p: float = attrs.field(default=0.9, validator=_check_range(0.0, 1.0))
    min_p: float = attrs.field(default=0.0, validator=_check_range(0.0, 1.0))
    #: llama.cpp's repetition penalty (1 = off); presence and frequency penalties as OpenAI's (0 = off).
    #: All three look at the last `PENALTY_LAST_N` tokens, the prompt's included (as llama-server).
    repeat_penalty: float = attrs.field(default=1.0, validator=_check_repeat_penalty)
    presence_penalty: float = attrs.field(default=0.0, validator=_check_range(-2.0, 2.0))
    frequency_penalty: float = attrs.field(default=0.0, validator=_check_range(-2.0, 2.0))
    #: (token id, bias added to its logit), sorted; -100 bans the token. Ids past the model's
    #: vocabulary are refused by `build_chain` (callers check them against the model first).
    logit_bias: tuple[tuple[int, float], ...] = attrs.field(default=(), converter=_logit_bias,
                                                            validator=_check_logit_bias)
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
    #: The OpenAI `response_format` object (JSON text) that `grammar` was made from: what a remote
    #: worker is sent instead of the grammar (it builds its own). The local engine follows `grammar`.
    response_format: str | None = None
    #: Report each generated token's log probability and this many most likely alternatives
    #: (0 to `TOP_LOGPROBS_MAX`); None = none (the default: no cost at all).
    logprobs: int | None = attrs.field(default=None)

    @seed.validator
    def _check_seed(self, attribute: attrs.Attribute, value: int | None) -> None:
        if value is not None and not (isinstance(value, int) and 0 <= value < 2**32):
            raise ValueError(f"seed must be a whole number from 0 to {2**32 - 1}, got {value!r}")

    @logprobs.validator
    def _check_logprobs(self, attribute: attrs.Attribute, value: int | None) -> None:
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 0 <= value <= TOP_LOGPROBS_MAX):
            raise ValueError(f"logprobs must be a whole number from 0 to {TOP_LOGPROBS_MAX} (the alternatives "
                             f"reported per token), got {value!r}")

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
    """logit bias -> penalties -> grammar -> top-k -> top-p -> min-p -> temperature -> draw (greedy at
    temperature 0: the biases, penalties and grammar still apply).

    `recent` (the prompt's last tokens) primes the penalties only; a grammar needs the model's
    `vocab`. Raises `ValueError` when llama.cpp refuses the grammar or a biased token is not in the
    vocabulary. The caller owns the chain and frees it with `llama_sampler_free`.
    """
    outside = [token for token, _ in params.logit_bias if token >= n_vocab]
    if outside:
        raise ValueError(f"logit_bias token {outside[0]} is not in this model's vocabulary (0 to {n_vocab - 1})")
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
    if params.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(*(
            llama_cpp.llama_logit_bias(token, -math.inf if bias <= LOGIT_BIAS_BAN else bias)
            for token, bias in params.logit_bias))
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        penalties = llama_cpp.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty)
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


def plain_greedy(params: SamplingParams) -> bool:
    """Whether the next token is the argmax of the model's logits alone: greedy, with no bias,
    penalty or grammar to reshape them."""
    return (params.temperature <= 0.0 and params.grammar is None and not params.logit_bias
            and params.repeat_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty)


class TokenSampler:
    """One request's sampler chain, owned by the decode thread: `sample` per step, then `close`.
    A plain greedy request (`plain_greedy`) has no chain: its token is the logits' argmax, what
    llama.cpp's greedy sampler picks (the first highest), without copying the vocabulary into a
    candidate array every step."""

    def __init__(self, chain: llama_cpp.llama_sampler_p | None, n_vocab: int, constrained: bool) -> None:
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
        if plain_greedy(params):
            return cls(None, n_vocab, False)
        chain = build_chain(params, n_vocab, seed, vocab=vocab, recent=prompt[-PENALTY_LAST_N:])
        return cls(chain, n_vocab, params.grammar is not None)

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int | None:
        """The next token from the logits at batch position `index`; None when the grammar allows none."""
        if self._chain is None:
            logits = llama_cpp.llama_get_logits_ith(ctx, index)
            return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)))) if logits else None
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


def token_logprobs(logits: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-softmax of one row of the model's raw logits (before biases, penalties, grammar and
    temperature): the log probability of `token`, and the `n_top` most likely tokens as
    (id, log probability), most likely first. O(n_vocab)."""
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))
    top: list[tuple[int, float]] = []
    if n_top > 0:
        n_top = min(n_top, logits.shape[0])
        ids = np.argpartition(logits, -n_top)[-n_top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = [(int(i), float(logits[i]) - log_total) for i in ids]
    return float(logits[token]) - log_total, top
