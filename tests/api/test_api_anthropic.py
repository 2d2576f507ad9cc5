"""Anthropic's Messages API through the official `anthropic` SDK against the real engine."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
import trio
from anthropic.types import Message, MessageParam
from shim_helpers import (
    MODEL_ID,
    ScriptedEngine,
    Shim,
    engine_output,
    in_thread,
    start_shim,
    wait_idle,
)

from dbloom.api import ApiKeys, NoNodeAvailable
from dbloom.inference import (
    ChatMessage,
    Chunk,
    Final,
    GenerateRequest,
    MLXEngine,
    RequestTimeout,
)

MESSAGES: list[MessageParam] = [{"role": "user", "content": "Hello world"}]
SYSTEM = "Be brief."
GREEDY = {"temperature": 0}
"""Sampling settings ride in `extra_body`: this SDK's `create` no longer names them."""
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def sync_client(shim: Shim, api_key: str = "unused", **options: Any) -> anthropic.Anthropic:
    """The blocking SDK client; call it inside `in_thread`. No retries: tests see each error."""
    return anthropic.Anthropic(base_url=shim.url, api_key=api_key, max_retries=0, **options)


def async_client(shim: Shim, api_key: str = "unused", **options: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=shim.url, api_key=api_key, max_retries=0, **options)


def greedy(max_tokens: int, stop: tuple[str, ...] = ()) -> GenerateRequest:
    messages = (
        ChatMessage(role="system", content=SYSTEM),
        ChatMessage(role="user", content="Hello world"),
    )
    return GenerateRequest(
        model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0.0, stop=stop
    )


def assert_matches(message: Message, text: str, final: Final) -> None:
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL_ID
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text == text
    assert message.stop_reason == STOP_REASONS[final.finish_reason.value]
    assert message.stop_sequence is None
    assert message.usage.input_tokens == final.prompt_tokens
    assert message.usage.output_tokens == final.completion_tokens


async def test_create_matches_the_engine_sync_and_async(shim: Shim) -> None:
    expected, final = await engine_output(shim.engine, greedy(24))

    def call() -> Message:
        with sync_client(shim) as client:
            return client.messages.create(
                model=MODEL_ID, system=SYSTEM, messages=MESSAGES, max_tokens=24, extra_body=GREEDY
            )

    assert_matches(await in_thread(call), expected, final)
    async with async_client(shim) as client:
        answer = await client.messages.create(
            model=MODEL_ID,
            system=[{"type": "text", "text": SYSTEM}],
            messages=MESSAGES,
            max_tokens=24,
            extra_body={"temperature": 0, "top_p": 0.5, "top_k": 3},
            metadata={"user_id": "someone"},
        )
    assert_matches(answer, expected, final)


async def test_stream_matches_the_engine_sync_and_async(shim: Shim) -> None:
    expected, final = await engine_output(shim.engine, greedy(40))

    def call() -> tuple[list[str], Message]:
        with (
            sync_client(shim) as client,
            client.messages.stream(
                model=MODEL_ID, system=SYSTEM, messages=MESSAGES, max_tokens=40, extra_body=GREEDY
            ) as stream,
        ):
            return list(stream.text_stream), stream.get_final_message()

    texts, message = await in_thread(call)
    assert "".join(texts) == expected and len(texts) > 1
    assert_matches(message, expected, final)
    async with (
        async_client(shim) as client,
        client.messages.stream(
            model=MODEL_ID, system=SYSTEM, messages=MESSAGES, max_tokens=40, extra_body=GREEDY
        ) as stream,
    ):
        texts = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert "".join(texts) == expected
    assert_matches(message, expected, final)


async def test_stream_is_anthropics_event_sequence(shim: Shim) -> None:
    body = {
        "model": MODEL_ID,
        "messages": MESSAGES,
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
    }
    async with httpx2.AsyncClient(base_url=shim.url, timeout=30) as http:
        response = await http.post("/v1/messages", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.strip().split("\n\n"):
        event_line, data_line = block.split("\n")
        name, data = (
            event_line.removeprefix("event: "),
            json.loads(data_line.removeprefix("data: ")),
        )
        assert data["type"] == name
        events.append(data)
    names = [e["type"] for e in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) <= {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["model"] == MODEL_ID and start["id"].startswith("msg_")
    assert events[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    for delta in events[3:-3]:
        assert delta["index"] == 0 and delta["delta"]["type"] == "text_delta"
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] == 5
    assert events[-2]["usage"]["input_tokens"] > 0


async def test_text_blocks_are_joined_like_chat_content_parts(shim: Shim) -> None:
    request = GenerateRequest(
        model=MODEL_ID,
        messages=(
            ChatMessage(role="system", content="Be\nbrief."),
            ChatMessage(role="user", content="Hi"),
            ChatMessage(role="assistant", content="Hello"),
            ChatMessage(role="user", content="Hello\nworld"),
        ),
        max_tokens=12,
        temperature=0.0,
    )
    expected, final = await engine_output(shim.engine, request)
    async with async_client(shim) as client:
        answer = await client.messages.create(
            model=MODEL_ID,
            system=[{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}],
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Hello"},
                        {"type": "text", "text": "world"},
                    ],
                },
            ],
            max_tokens=12,
            extra_body=GREEDY,
        )
    assert_matches(answer, expected, final)


async def test_stop_sequences_are_reported(shim: Shim) -> None:
    unstopped, _ = await engine_output(shim.engine, greedy(40))
    word = re.search(r"[a-z]{4,}", unstopped)
    assert word is not None
    stop = word.group()
    expected, final = await engine_output(shim.engine, greedy(40, ("never seen", stop)))
    assert expected == unstopped[: unstopped.index(stop)]
    async with async_client(shim) as client:
        answer = await client.messages.create(
            model=MODEL_ID,
            system=SYSTEM,
            messages=MESSAGES,
            max_tokens=40,
            extra_body=GREEDY,
            stop_sequences=["never seen", stop],
        )
        async with client.messages.stream(
            model=MODEL_ID,
            system=SYSTEM,
            messages=MESSAGES,
            max_tokens=40,
            extra_body=GREEDY,
            stop_sequences=[stop],
        ) as stream:
            streamed = await stream.get_final_message()
        unmatched = await client.messages.create(
            model=MODEL_ID,
            system=SYSTEM,
            messages=MESSAGES,
            max_tokens=40,
            extra_body=GREEDY,
            stop_sequences=["never seen"],
        )
    for message in (answer, streamed):
        assert message.content[0].type == "text" and message.content[0].text == expected
        assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
        assert message.usage.output_tokens == final.completion_tokens
    assert unmatched.content[0].type == "text" and unmatched.content[0].text == unstopped
    assert unmatched.stop_reason == "max_tokens" and unmatched.stop_sequence is None


async def post(shim: Shim, body: Any, **kwargs: Any) -> httpx2.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx2.AsyncClient(base_url=shim.url, timeout=30) as client:
        return await client.post("/v1/messages", content=content, **kwargs)


def assert_error(response: httpx2.Response, status: int, kind: str) -> str:
    """The response is Anthropic's error object; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    message: str = body["error"]["message"]
    assert message
    return message


BASE = {"model": MODEL_ID, "max_tokens": 8, "messages": MESSAGES}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
DOCUMENT = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools is not supported"),
        ({"tool_choice": {"type": "auto"}}, "tool_choice is not supported"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking is not supported"),
        ({"thinking": {"type": "adaptive"}}, "thinking is not supported"),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {}}}},
            "output_config.format is not supported",
        ),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, "'image' are not supported"),
        ({"messages": [{"role": "user", "content": [DOCUMENT]}]}, "'document' are not supported"),
        ({"system": [IMAGE]}, "'image' are not supported"),
        ({"messages": [*MESSAGES, {"role": "assistant", "content": "Sure"}]}, "final assistant"),
        ({"messages": [{"role": "system", "content": "x"}]}, "must be 'user' or 'assistant'"),
        ({"messages": []}, "non-empty array"),
        ({"messages": [{"role": "user"}]}, "messages[0].content is required"),
        ({"max_tokens": None}, "max_tokens is required"),
        ({"max_tokens": 0}, "max_tokens must be between"),
        ({"stop_sequences": ["ok", 3]}, "stop_sequences must be an array of strings"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"model": None}, "model is required"),
    ],
)
async def test_unsupported_or_malformed_requests_are_400(
    shim: Shim, change: dict[str, Any], words: str
) -> None:
    body = {key: value for key, value in {**BASE, **change}.items() if value is not None}
    assert words in assert_error(await post(shim, body), 400, "invalid_request_error")


async def test_switched_off_features_are_accepted(shim: Shim) -> None:
    body = {
        **BASE,
        "thinking": {"type": "disabled"},
        "tool_choice": {"type": "none"},
        "output_config": {"effort": "low"},
        "cache_control": {"type": "ephemeral"},
    }
    assert (await post(shim, body)).status_code == 200


async def test_sdk_errors_in_anthropic_shape(shim: Shim) -> None:
    async with async_client(shim) as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="nope", messages=MESSAGES, max_tokens=4)
        with pytest.raises(anthropic.BadRequestError) as image:
            await client.messages.create(
                model=MODEL_ID,
                messages=[{"role": "user", "content": [IMAGE]}],  # type: ignore[list-item]
                max_tokens=4,
            )
        with pytest.raises(anthropic.BadRequestError) as overflow:
            await client.messages.create(
                model=MODEL_ID,
                messages=[{"role": "user", "content": "word " * 3000}],
                max_tokens=4,
            )
    assert missing.value.type == "not_found_error" and "nope" in missing.value.message
    assert image.value.type == "invalid_request_error"
    assert "context" in overflow.value.message
    assert_error(await post(shim, b'{"model": "tiny",'), 400, "invalid_request_error")
    async with httpx2.AsyncClient(base_url=shim.url) as http:
        assert_error(await http.get("/v1/messages"), 405, "invalid_request_error")
        assert_error(await http.post("/v1/messages/batches"), 404, "not_found_error")
        assert_error(
            await http.post("/v1/messages", content=b"x" * (5 << 20)), 413, "request_too_large"
        )


async def test_keys_as_x_api_key_or_bearer(engine: MLXEngine, tmp_path: Path) -> None:
    keys = ApiKeys.in_home(tmp_path)
    key = keys.add("alice")
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, engine, keys=keys)
        async with async_client(shim, api_key="dbk-wrong") as wrong:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await wrong.messages.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)
        assert refused.value.type == "authentication_error"
        message = assert_error(await post(shim, BASE), 401, "authentication_error")
        assert "x-api-key" in message
        async with async_client(shim, api_key=key) as client:
            answer = await client.messages.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)
        assert answer.usage.output_tokens <= 2
        bearer = anthropic.AsyncAnthropic(base_url=shim.url, auth_token=key, max_retries=0)
        async with bearer:
            await bearer.messages.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)
        async with httpx2.AsyncClient(base_url=shim.url) as http:
            models = await http.get("/v1/models", headers={"x-api-key": key})
        assert models.status_code == 200
        nursery.cancel_scope.cancel()


async def test_busy_engine_is_overloaded_529(shim_model: Path) -> None:
    async with (
        MLXEngine(shim_model, model_id=MODEL_ID, max_batch=1, max_queue=0) as engine,
        trio.open_nursery() as nursery,
    ):
        shim = await start_shim(nursery, engine)
        async with (
            async_client(shim) as client,
            client.messages.stream(model=MODEL_ID, messages=MESSAGES, max_tokens=1500) as running,
        ):
            await anext(running.text_stream.__aiter__())
            assert engine.load().active == 1
            for stream in (False, True):
                with pytest.raises(anthropic.OverloadedError) as busy:
                    await client.messages.create(
                        model=MODEL_ID, messages=MESSAGES, max_tokens=2, stream=stream
                    )
                assert busy.value.type == "overloaded_error"
                assert busy.value.response.headers["retry-after"] == "1"
        await wait_idle(engine)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("error", "status", "kind", "sdk_error"),
    [
        (
            NoNodeAvailable("no attested node serves 'tiny'"),
            503,
            "api_error",
            anthropic.ServiceUnavailableError,
        ),
        (RequestTimeout("slow"), 504, "timeout_error", anthropic.GatewayTimeoutError),
        (RuntimeError("a bug"), 500, "api_error", anthropic.InternalServerError),
    ],
)
async def test_failures_before_the_first_token_have_real_statuses(
    error: Exception, status: int, kind: str, sdk_error: type[anthropic.APIStatusError]
) -> None:
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, ScriptedEngine(error))
        async with async_client(shim) as client:
            for stream in (False, True):
                with pytest.raises(sdk_error) as failed:
                    await client.messages.create(
                        model=MODEL_ID, messages=MESSAGES, max_tokens=4, stream=stream
                    )
                assert failed.value.status_code == status and failed.value.type == kind
                assert "a bug" not in failed.value.message
        nursery.cancel_scope.cancel()


async def test_failure_after_the_first_token_ends_the_stream_with_an_error_event() -> None:
    engine = ScriptedEngine(
        RequestTimeout("the node went quiet"),
        chunks=[Chunk(text="Hi", token_ids=(1,)), Chunk(text=" there", token_ids=(2, 3))],
        refuse=False,
    )
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, engine)
        async with async_client(shim) as client:
            texts = []
            with pytest.raises(anthropic.APIStatusError) as failed:
                async with client.messages.stream(
                    model=MODEL_ID, messages=MESSAGES, max_tokens=10
                ) as stream:
                    async for text in stream.text_stream:
                        texts.append(text)
        nursery.cancel_scope.cancel()
    assert "".join(texts) == "Hi there"
    assert failed.value.body == {
        "type": "error",
        "error": {"type": "timeout_error", "message": "the node went quiet"},
    }
