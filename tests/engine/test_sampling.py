"""The sampler of one request on the real default model: a plain greedy request takes the logits'
argmax without a llama.cpp chain, and picks what llama.cpp's greedy chain picks."""

from __future__ import annotations

import llama_cpp
import pytest

from ktulhu.engine.model import Model
from ktulhu.engine.sampling import SamplingParams, TokenSampler, build_chain, plain_greedy

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a", "1, 2, 3, 5, 8,"]


@pytest.mark.parametrize("params, plain", [
    (SamplingParams(temperature=0.0), True),
    (SamplingParams(temperature=0.7), False),
    (SamplingParams(temperature=0.0, repeat_penalty=1.1), False),
    (SamplingParams(temperature=0.0, presence_penalty=0.5), False),
    (SamplingParams(temperature=0.0, logit_bias=((5, 2.0),)), False),
    (SamplingParams(temperature=0.0, grammar='root ::= "a"'), False),
])
def test_only_greedy_sampling_of_untouched_logits_is_plain(params: SamplingParams, plain: bool) -> None:
    assert plain_greedy(params) is plain


def test_the_argmax_of_a_plain_greedy_request_is_what_the_greedy_chain_picks(smol_model: Model) -> None:
    params = SamplingParams(temperature=0.0)
    n_vocab = smol_model.info.n_vocab
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx, ctx_params.n_threads, ctx_params.n_threads_batch = 256, 1, 1
    ctx = llama_cpp.llama_init_from_model(smol_model.handle, ctx_params)
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    plain = TokenSampler.create(params, smol_model.vocab, n_vocab, 0)
    chain = build_chain(params, n_vocab, 0)
    picked = 0
    try:
        for prompt in PROMPTS:
            tokens = smol_model.tokenize(prompt, special=False, add_bos=True)
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
            for step in range(12):  # the prompt, then one sampled token a step
                fed = tokens if step == 0 else tokens[-1:]
                start = 0 if step == 0 else len(tokens) - 1
                for k, token in enumerate(fed):
                    batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, start + k, 1
                    batch.seq_id[k][0], batch.logits[k] = 0, int(k == len(fed) - 1)
                batch.n_tokens = len(fed)
                assert llama_cpp.llama_decode(ctx, batch) == 0
                token = plain.sample(ctx, len(fed) - 1)
                assert token == llama_cpp.llama_sampler_sample(chain, ctx, len(fed) - 1)
                tokens.append(token)
                picked += 1
    finally:
        plain.close()
        llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    assert picked == 12 * len(PROMPTS)
