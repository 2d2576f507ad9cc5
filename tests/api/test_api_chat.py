"""Chat completions through the official SDK against the real engine."""

from __future__ import annotations

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from shim_helpers import MODEL_ID, Shim, async_client, engine_output, in_thread, sync_client

from dbloom.inference import ChatMessage, GenerateRequest

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello world"},
]


def greedy_chat(max_tokens: int) -> GenerateRequest:
    messages = (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hello world"),
    )
    return GenerateRequest(
        model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0.0
    )


async def test_chat_matches_the_engine(shim: Shim) -> None:
    expected, final = await engine_output(shim.engine, greedy_chat(24))

    def call() -> ChatCompletion:
        with sync_client(shim) as client:
            return client.chat.completions.create(
                model=MODEL_ID, messages=MESSAGES, max_tokens=24, temperature=0
            )

    answer = await in_thread(call)
    assert answer.id.startswith("chatcmpl-")
    assert answer.object == "chat.completion"
    assert answer.model == MODEL_ID
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == final.finish_reason.value
    assert choice.logprobs is None
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == final.prompt_tokens
    assert answer.usage.completion_tokens == final.completion_tokens
    assert answer.usage.total_tokens == final.total_tokens
    assert answer._request_id is not None


async def test_chat_stream_matches_the_engine_and_reports_usage(shim: Shim) -> None:
    expected, final = await engine_output(shim.engine, greedy_chat(40))
    async with async_client(shim) as client:
        stream = await client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,
            max_completion_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks: list[ChatCompletionChunk] = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == final.finish_reason.value
    assert all(f is None for f in finishes[:-1])
    *content_chunks, usage_chunk = chunks
    assert all(c.usage is None for c in content_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == final.prompt_tokens
    assert usage_chunk.usage.completion_tokens == final.completion_tokens


async def test_chat_stream_without_usage_has_no_usage_chunk(shim: Shim) -> None:
    async with async_client(shim) as client:
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=5, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_chat_content_parts_and_developer_role(shim: Shim) -> None:
    expected, _ = await engine_output(shim.engine, greedy_chat(12))
    messages: list[ChatCompletionMessageParam] = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello world"}]},
    ]
    async with async_client(shim) as client:
        answer = await client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=12, temperature=0
        )
    assert answer.choices[0].message.content == expected


async def test_chat_logprobs_in_openai_shape(shim: Shim) -> None:
    async with async_client(shim) as client:
        answer = await client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
        stream = await client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
        streamed = [
            token
            async for chunk in stream
            if chunk.choices and chunk.choices[0].logprobs
            for token in chunk.choices[0].logprobs.content or []
        ]
    ChatCompletion.model_validate(answer.model_dump())
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert answer.usage is not None
    assert len(logprobs.content) == answer.usage.completion_tokens
    for token in logprobs.content:
        assert token.logprob <= 0.0
        assert token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        # Greedy: the sampled token is the likeliest one.
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == token.logprob
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in logprobs.content]


async def test_chat_sampling_options_and_stop(shim: Shim) -> None:
    """Every accepted sampling field reaches the engine: a seeded request is reproducible,
    and a stop string cuts the text before it."""
    async with async_client(shim) as client:

        async def create(stop: list[str] | None = None) -> ChatCompletion:
            return await client.chat.completions.create(
                model=MODEL_ID,
                messages=MESSAGES,
                max_tokens=20,
                temperature=0.9,
                top_p=0.9,
                seed=7,
                presence_penalty=0.5,
                frequency_penalty=0.5,
                logit_bias={"5": -100},
                user="someone",
                metadata={"k": "v"},
                stop=stop,
                extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "unknown": 1},
            )

        first, second = await create(), await create()
        text = first.choices[0].message.content or ""
        assert text == second.choices[0].message.content
        stop = text[len(text) // 2 :][:3]
        assert stop.strip(), "the seeded text should leave a usable stop string"
        stopped = await create([stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


async def test_chat_local_engine_sets_no_node_header(shim: Shim) -> None:
    async with async_client(shim) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=2
        )
    assert "x-dbloom-node" not in raw.headers
    assert raw.headers["x-request-id"]
    assert raw.parse().id == f"chatcmpl-{raw.headers['x-request-id']}"


async def test_sdk_error_type_for_bad_request(shim: Shim) -> None:
    async with async_client(shim) as client:
        try:
            await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=2)
        except openai.BadRequestError as exc:
            assert exc.param == "n"
        else:
            raise AssertionError("n=2 was accepted")
