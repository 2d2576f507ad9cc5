"""A short self-benchmark, so a node advertises speeds it has measured, not guessed."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ._engine import Engine
from ._events import Chunk
from ._request import GenerateRequest

PROMPT = "The quick brown fox jumps over the lazy dog. " * 24


@dataclass(frozen=True, slots=True)
class Speed:
    """Prefill and decode throughput of one request alone, in tokens per second."""

    prefill_tps: float
    decode_tps: float


async def measure_speed(
    engine: Engine, model_id: str, *, decode_tokens: int = 32, warm_up: bool = True
) -> Speed:
    """Time one greedy request: prompt tokens over time to first token, then decode rate.

    With `warm_up` (an engine's first measurement), a short request goes first, so one-off
    compilation and allocation are not counted.
    """
    if warm_up:
        first_run = GenerateRequest(model=model_id, prompt=PROMPT, max_tokens=2, temperature=0.0)
        async with engine.generate(first_run) as generation:
            async for _ in generation:
                pass
    request = GenerateRequest(
        model=model_id, prompt=PROMPT, max_tokens=decode_tokens, temperature=0.0
    )
    start = trio.current_time()
    first = last = None
    tokens = 0
    prompt_tokens = 0
    async with engine.generate(request) as generation:
        async for item in generation:
            now = trio.current_time()
            if isinstance(item, Chunk):
                if item.token_ids and first is None:
                    first = now
                tokens += len(item.token_ids)
                last = now
            else:
                prompt_tokens = item.prompt_tokens
    if first is None or last is None:
        return Speed(0.0, 0.0)
    prefill = prompt_tokens / max(first - start, 1e-6)
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return Speed(prefill_tps=round(prefill, 1), decode_tps=round(decode, 1))
