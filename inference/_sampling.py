"""Per-request samplers and logits processors for mlx-lm's `BatchGenerator`.

A constrained request (JSON output, forced tool calls) also gets a `GrammarProcessor`,
which masks every token its grammar does not allow.

Filters (top-p, min-p, top-k) and penalties are mlx-lm's own. The final draw is not
`make_sampler`'s: that one takes from MLX's global PRNG, which every request in the batch
shares, so a seeded request would depend on its neighbours. Here each sampled request
owns a PRNG key derived from its seed and splits it once per token, so the same seed and
prompt give the same tokens whatever else is running.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from ._request import GenerateRequest

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def make_request_sampler(request: GenerateRequest, *, seed: int, vocab_size: int) -> Sampler:
    """The sampler for one request; greedy requests share one function so they batch."""
    if request.greedy:
        return greedy_sampler
    filters: list[Callable[[mx.array], mx.array]] = []
    if request.top_p < 1.0:
        top_p = request.top_p
        filters.append(lambda x: apply_top_p(x, top_p))
    if request.min_p > 0.0:
        min_p = request.min_p
        filters.append(lambda x: apply_min_p(x, min_p))
    if 0 < request.top_k < vocab_size:
        top_k = request.top_k
        filters.append(lambda x: apply_top_k(x, top_k))
    inverse_temperature = 1.0 / request.temperature
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, draw = mx.random.split(key)
        for keep in filters:
            logprobs = keep(logprobs)
        return mx.random.categorical(logprobs * inverse_temperature, key=draw)

    return sample


def make_request_processors(request: GenerateRequest) -> list[LogitsProcessor]:
    """Logit bias and penalties, through `make_logits_processors`; empty when unused."""
    return list(
        make_logits_processors(
            logit_bias=dict(request.logit_bias) or None,
            repetition_penalty=(
                request.repetition_penalty if request.repetition_penalty != 1.0 else None
            ),
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        )
    )


class GrammarProcessor:
    """The logits processor of one constrained request (mlx-lm's `(tokens, logits)` shape).

    mlx-lm first calls it with the prompt as `tokens`, then once per step with the token
    sampled last appended, so every call after the first feeds that token to the matcher.
    A matcher in an error state (a bug, never a client's doing) allows only the end.
    `matcher` is an `llguidance.LLMatcher`.
    """

    def __init__(self, matcher: Any, eos: Sequence[int]) -> None:
        self._matcher = matcher
        self._eos = list(eos)
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        matcher = self._matcher
        if self._started:
            matcher.consume_token(tokens[-1].item())
        self._started = True
        width = logits.shape[-1]
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.zeros(width, dtype=np.bool_)
        allowed[: min(width, bits.size)] = bits[:width]
        if matcher.is_error() or not allowed.any():
            allowed[:] = False
            allowed[[t for t in self._eos if t < width]] = True
        return mx.where(mx.array(allowed), logits, -mx.inf)
