"""How a token is drawn: the sampling settings and the one llama.cpp sampler chain built from them.

Every caller (the engine, the trainer's sampler, the benchmarks' raw loops) builds its chain with
:func:`make_sampler`, so there is no second chain that may disagree (as with mlx-lm's make_sampler).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp


@dataclass(frozen=True)
class SamplingParams:
    """Per-trajectory sampling; defaults are those of the published evaluation (docs/method.md)."""

    temperature: float = 0.6
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    penalty_last_n: int = 64
    seed: int = 0
    max_new_tokens: int = 2048
    stop: tuple[str, ...] = ()
    # Never end a trajectory at an end-of-generation token (llama.cpp's --ignore-eos): runs of a
    # fixed length, for benchmarks.
    ignore_eos: bool = False


def make_sampler(params: SamplingParams, n_vocab: int, seed: int, history: Sequence[int] = (),
                 banned: Sequence[int] = ()):
    """A llama.cpp sampler chain: repetition penalty, then temperature, top-p and a seeded draw.

    ``history`` (the prompt, or a forked trajectory's tokens so far) primes the penalty window;
    ``banned`` tokens are never drawn (the end-of-generation tokens, with ``ignore_eos``).
    Temperature comes before top-p, as in the published (vLLM / transformers) sampling; a
    temperature of 0 is greedy. The caller frees the chain with ``llama_sampler_free``.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if banned:
        bias = (llama_cpp.llama_logit_bias * len(banned))(*[llama_cpp.llama_logit_bias(t, float("-inf")) for t in banned])
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(banned), bias))
    if params.repetition_penalty != 1.0:
        add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, params.penalty_last_n, params.repetition_penalty, 0.0, 0.0))
    if params.temperature <= 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    if params.penalty_last_n > 0:
        for tok in history[-params.penalty_last_n :]:
            llama_cpp.llama_sampler_accept(chain, tok)
    return chain
