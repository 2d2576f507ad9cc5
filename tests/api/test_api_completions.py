"""Legacy completions through the official SDK against the real engine."""

from __future__ import annotations

import pytest
from openai.types import Completion
from shim_helpers import MODEL_ID, Shim, async_client, engine_output, in_thread, sync_client

from dbloom.inference import GenerateRequest

PROMPT = "The quick brown fox"


def greedy(max_tokens: int) -> GenerateRequest:
    return GenerateRequest(model=MODEL_ID, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0)


async def test_completion_matches_the_engine(shim: Shim) -> None:
    expected, final = await engine_output(shim.engine, greedy(30))

    def call() -> Completion:
        with sync_client(shim) as client:
            return client.completions.create(
                model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0
            )

    answer = await in_thread(call)
    assert answer.id.startswith("cmpl-")
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == final.finish_reason.value
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == final.prompt_tokens
    assert answer.usage.completion_tokens == final.completion_tokens


async def test_completion_default_length_is_openais(shim: Shim) -> None:
    async with async_client(shim) as client:
        answer = await client.completions.create(model=MODEL_ID, prompt=[PROMPT], temperature=0)
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 16
    assert answer.choices[0].finish_reason == "length"


async def test_completion_stream_matches_the_engine(shim: Shim) -> None:
    expected, final = await engine_output(shim.engine, greedy(30))
    async with async_client(shim) as client:
        stream = await client.completions.create(
            model=MODEL_ID,
            prompt=PROMPT,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == final.total_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_completion_logprobs_in_openai_shape(shim: Shim, stream: bool) -> None:
    async with async_client(shim) as client:
        if stream:
            chunks = await client.completions.create(
                model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, stream=True
            )
            parts = [c.choices[0].logprobs async for c in chunks if c.choices]
            tokens = [t for p in parts if p for t in p.tokens or []]
            offsets = [o for p in parts if p for o in p.text_offset or []]
            tops = [t for p in parts if p for t in p.top_logprobs or []]
        else:
            answer = await client.completions.create(
                model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
            )
            Completion.model_validate(answer.model_dump())
            logprobs = answer.choices[0].logprobs
            assert logprobs is not None
            tokens = logprobs.tokens or []
            offsets = logprobs.text_offset or []
            tops = logprobs.top_logprobs or []
            assert all(lp <= 0 for lp in logprobs.token_logprobs or [])
    assert len(tokens) == 5
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(5)]
    assert all(1 <= len(top) <= 2 for top in tops)
    assert [max(top, key=top.__getitem__) for top in tops] == tokens
