"""Every failure reaches the client as OpenAI's error object with the right status."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam
from shim_helpers import (
    MODEL_ID,
    ScriptedEngine,
    Shim,
    async_client,
    start_shim,
    wait_idle,
)

from dbloom.api import ApiKeys, NoNodeAvailable
from dbloom.inference import Chunk, MLXEngine, RequestTimeout

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello world"}]


async def post(shim: Shim, path: str, body: Any, **kwargs: Any) -> httpx2.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx2.AsyncClient(base_url=shim.url, timeout=30) as client:
        return await client.post(path, content=content, **kwargs)


def assert_error(
    response: httpx2.Response, status: int, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def test_malformed_json(shim: Shim) -> None:
    for path in (CHAT, COMPLETIONS, RESPONSES):
        error = assert_error(await post(shim, path, b'{"model": "tiny",'), 400)
        assert error["code"] == "invalid_json"
        assert_error(await post(shim, path, b"\xff\xfe\x00"), 400)
        assert_error(await post(shim, path, b"[1, 2]"), 400)
        assert_error(await post(shim, path, b""), 400)


async def test_unpaired_surrogates_are_refused(shim: Shim) -> None:
    """JSON may escape a lone surrogate, but no tokenizer accepts one; a proper pair is fine."""
    lone = [
        (COMPLETIONS, b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'),
        (RESPONSES, b'{"model": "tiny", "input": "hi", "instructions": "\\uDC00"}'),
    ]
    for path, body in lone:
        error = assert_error(await post(shim, path, body), 400)
        assert error["code"] == "invalid_unicode"
    pair = b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}'
    assert (await post(shim, COMPLETIONS, pair)).status_code == 200


WRONG = [
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    (CHAT, {"messages": USER, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": USER, "temperature": 3}, "temperature"),
    (CHAT, {"messages": USER, "top_p": 0}, "top_p"),
    (CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": "5"}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "seed": -1}, "seed"),
    (CHAT, {"messages": USER, "seed": True}, "seed"),
    (CHAT, {"messages": USER, "stop": 5}, "stop"),
    (CHAT, {"messages": USER, "logit_bias": {"x": 1}}, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"1": 500}}, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"100000": 1}}, None),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": USER, "stream": "yes"}, "stream"),
    (
        CHAT,
        {"messages": USER, "stream_options": {"include_usage": 1}},
        "stream_options.include_usage",
    ),
    (CHAT, {"messages": USER, "n": 2}, "n"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, "response_format.type"),
    (CHAT, {"messages": USER, "model": 5}, "model"),
    (CHAT, {"messages": USER, "model": None}, "model"),
    (COMPLETIONS, {"prompt": [1, 2]}, "prompt"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": "a", "logprobs": True}, "logprobs"),
    (COMPLETIONS, {"prompt": "a", "echo": True}, "echo"),
    (COMPLETIONS, {"prompt": "a", "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "a", "n": 3}, "n"),
    (RESPONSES, {"input": 5}, "input"),
    (RESPONSES, {"input": [{"type": "reasoning", "role": "user"}]}, "input[0].type"),
    (RESPONSES, {"input": [{"type": "function_call", "role": "user"}]}, "input[0].call_id"),
    (
        RESPONSES,
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content[0].type",
    ),
    (RESPONSES, {"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    (RESPONSES, {"input": "hi", "max_output_tokens": -1}, "max_output_tokens"),
    (RESPONSES, {"input": "hi", "instructions": ["x"]}, "instructions"),
    (RESPONSES, {"input": "hi", "text": {"format": {"type": "json_schema"}}}, "text.format.name"),
]


@pytest.mark.parametrize(("path", "fields", "param"), WRONG)
async def test_wrong_fields_name_the_param(
    shim: Shim, path: str, fields: dict[str, Any], param: str | None
) -> None:
    body = {"model": MODEL_ID} | fields
    assert_error(await post(shim, path, body), 400, param)


async def test_unknown_model_is_not_found(shim: Shim) -> None:
    async with async_client(shim) as client:
        with pytest.raises(openai.NotFoundError) as chat:
            await client.chat.completions.create(model="nope", messages=USER)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="x", stream=True)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="nope", input="x")
        with pytest.raises(openai.NotFoundError) as retrieve:
            await client.models.retrieve("org/nope")
    assert chat.value.code == "model_not_found"
    assert retrieve.value.code == "model_not_found"


async def test_prompt_beyond_the_context(shim: Shim) -> None:
    long_prompt = " ".join(["fox"] * 3000)
    async with async_client(shim) as client:
        with pytest.raises(openai.BadRequestError) as prompt:
            await client.completions.create(model=MODEL_ID, prompt=long_prompt, stream=True)
        with pytest.raises(openai.BadRequestError) as limit:
            await client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=5000)
    assert prompt.value.code == "context_length_exceeded"
    assert limit.value.code == "context_length_exceeded"


async def test_unknown_route_and_method(shim: Shim) -> None:
    async with httpx2.AsyncClient(base_url=shim.url) as client:
        assert_error(await client.get("/v1/nope"), 404)
        assert_error(await client.post("/v2/chat/completions", content=b"{}"), 404)
        assert_error(await client.get(CHAT), 405)
        assert_error(await client.delete("/v1/models"), 405)


async def test_body_too_large(shim: Shim) -> None:
    big = b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}'
    error = assert_error(await post(shim, COMPLETIONS, big), 413)
    assert error["code"] == "request_too_large"

    async def chunks() -> Any:
        for _ in range(5):
            yield b"a" * (1 << 20)

    async with httpx2.AsyncClient(base_url=shim.url) as client:
        streamed = await client.post(COMPLETIONS, content=chunks())
    assert_error(streamed, 413)


async def test_keys_required(shim_model: Path, engine: MLXEngine, tmp_path: Path) -> None:
    keys = ApiKeys.in_home(tmp_path)
    key = keys.add("alice")
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, engine, keys=keys)
        async with async_client(shim, api_key="dbk-wrong") as wrong:
            with pytest.raises(openai.AuthenticationError) as refused:
                await wrong.models.list()
        assert refused.value.code == "invalid_api_key"
        async with httpx2.AsyncClient(base_url=shim.url) as http:
            missing = await http.get("/v1/models")
            assert_error(missing, 401)
            assert missing.headers["www-authenticate"] == "Bearer"
            assert (await http.get("/health")).status_code == 200
            assert_error(await http.get("/metrics"), 401)
            assert_error(await http.post(CHAT, content=b"not even json"), 401)
            # Two keys, one of them good: refused whichever comes first.
            for first, second in ((key, "dbk-wrong"), ("dbk-wrong", key)):
                both = [("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}")]
                assert_error(await http.get("/v1/models", headers=both), 401)
        async with async_client(shim, api_key=key) as client:
            models = await client.models.list()
            assert [m.id for m in models.data] == [MODEL_ID]
            # A key removed while the shim runs is refused from the next request on.
            ApiKeys.in_home(tmp_path).remove("alice")
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        nursery.cancel_scope.cancel()


async def test_busy_engine_is_429(shim_model: Path) -> None:
    async with (
        MLXEngine(shim_model, model_id=MODEL_ID, max_batch=1, max_queue=0) as engine,
        trio.open_nursery() as nursery,
    ):
        shim = await start_shim(nursery, engine)
        async with async_client(shim) as client:
            running = await client.completions.create(
                model=MODEL_ID, prompt="Hello", max_tokens=1500, stream=True
            )
            await anext(running.__aiter__())
            assert engine.load().active == 1
            with pytest.raises(openai.RateLimitError) as busy:
                await client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2)
            assert busy.value.response.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model=MODEL_ID, messages=USER, stream=True)
            await running.close()
        await wait_idle(engine)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("error", "status"),
    [(NoNodeAvailable("no attested node serves 'tiny'"), 503), (RequestTimeout("slow"), 504)],
)
async def test_router_failures_before_the_first_token(error: Exception, status: int) -> None:
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, ScriptedEngine(error))
        async with async_client(shim) as client:
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as failed:
                    await client.chat.completions.create(
                        model=MODEL_ID, messages=USER, stream=stream
                    )
                assert failed.value.status_code == status
                assert failed.value.body == {
                    "message": str(error),
                    "type": failed.value.type,
                    "param": None,
                    "code": failed.value.code,
                }
        nursery.cancel_scope.cancel()


async def test_failure_after_the_first_token_ends_the_stream() -> None:
    engine = ScriptedEngine(
        RequestTimeout("the node went quiet"),
        chunks=[Chunk(text="Hi", token_ids=(1,)), Chunk(text=" there", token_ids=(2, 3))],
        refuse=False,
    )
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, engine)
        async with async_client(shim) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL_ID,
                messages=USER,
                stream=True,
                stream_options={"include_usage": True},
            )
            assert raw.headers["x-dbloom-node"] == "12D3KooWScriptedNode"
            seen = []
            with pytest.raises(openai.APIError) as failed:
                async for chunk in raw.parse():
                    seen.append(chunk)
            assert failed.value.message == "the node went quiet"
            assert (
                "".join(c.choices[0].delta.content or "" for c in seen if c.choices) == "Hi there"
            )
            assert seen[-1].choices == []
            assert seen[-1].usage is not None
            assert seen[-1].usage.completion_tokens == 3

            stream = await client.responses.create(model=MODEL_ID, input="x", stream=True)
            events = [event async for event in stream]
        assert [e.type for e in events[-2:]] == ["error", "response.failed"]
        failed_event = events[-1]
        assert failed_event.type == "response.failed"
        assert failed_event.response.status == "failed"
        assert failed_event.response.error is not None
        assert failed_event.response.output_text == "Hi there"
        nursery.cancel_scope.cancel()


async def test_unexpected_failure_is_500_and_logged_without_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "my secret prompt text"
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, ScriptedEngine(RuntimeError(secret)))
        with caplog.at_level(logging.INFO):
            response = await post(shim, CHAT, {"model": MODEL_ID, "messages": USER})
        nursery.cancel_scope.cancel()
    error = assert_error(response, 500)
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"]
    assert secret not in response.text
    assert request_id in caplog.text and "RuntimeError" in caplog.text
    assert secret not in caplog.text
