"""Tool calling through the official SDK against the shim and the real engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import trio
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.responses import Response
from shim_helpers import MODEL_ID, Shim, async_client, start_shim

from dbloom.inference import MLXEngine

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER_PARAMETERS,
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
RESPONSE_TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOLS]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]
FORCED: Any = {"type": "function", "function": {"name": "get_weather"}}


def check_arguments(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


async def test_forced_tool_call_not_streamed(shim: Shim) -> None:
    async with async_client(shim) as client:
        answer = await client.chat.completions.create(
            model=MODEL_ID, messages=USER, tools=TOOLS, tool_choice=FORCED, max_tokens=80
        )
    ChatCompletion.model_validate(answer.model_dump())
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    check_arguments(call.function.name, call.function.arguments)


async def test_parameters_with_their_own_defs_are_enforced(shim: Shim) -> None:
    # Pydantic writes nested models as "$ref": "#/$defs/...". Nested inside the call's
    # schema, those pointers must still reach the parameters' own $defs.
    parameters = {
        "$defs": {
            "Unit": {"enum": ["c", "f"]},
            "Place": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}, "unit": {"$ref": "#/$defs/Unit"}},
        "required": ["place", "unit"],
        "additionalProperties": False,
    }
    tool: Any = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    async with async_client(shim) as client:
        answer = await client.chat.completions.create(
            model=MODEL_ID, messages=USER, tools=[tool], tool_choice="required", max_tokens=120
        )
    (call,) = answer.choices[0].message.tool_calls or []
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters)


async def test_streamed_tool_calls_as_openai_streams_them(shim: Shim) -> None:
    async with async_client(shim) as client:
        stream = await client.chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=80,
            temperature=0,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    pieces = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    first, *rest = pieces
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function is not None and first.function.name in SCHEMAS
    assert first.function.arguments == ""
    assert rest and all(p.id is None and p.function and p.function.name is None for p in rest)
    arguments = "".join(p.function.arguments or "" for p in rest if p.function)
    check_arguments(first.function.name, arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_the_sdk_stream_helper_assembles_calls(shim: Shim) -> None:
    async with (
        async_client(shim) as client,
        client.chat.completions.stream(
            model=MODEL_ID, messages=USER, tools=TOOLS, tool_choice=FORCED, max_tokens=80
        ) as stream,
    ):
        final = await stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    check_arguments("get_weather", call.function.arguments)


async def test_a_tool_round_trip(shim: Shim) -> None:
    async with async_client(shim) as client:
        first = await client.chat.completions.create(
            model=MODEL_ID, messages=USER, tools=TOOLS, tool_choice=FORCED, max_tokens=80
        )
        message = first.choices[0].message
        (call,) = message.tool_calls or []
        history: list[Any] = [
            *USER,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"},
        ]
        second = await client.chat.completions.create(
            model=MODEL_ID, messages=history, tools=TOOLS, max_tokens=4, temperature=0
        )
        alone = await client.chat.completions.create(
            model=MODEL_ID, messages=USER, tools=TOOLS, max_tokens=4, temperature=0
        )
    assert second.usage is not None and alone.usage is not None and first.usage is not None
    # The call and the tool's answer reached the template: the prompt grew by at least
    # the call's own tokens.
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + first.usage.completion_tokens


async def test_responses_function_calls(shim: Shim) -> None:
    async with async_client(shim) as client:
        answer = await client.responses.create(
            model=MODEL_ID,
            input="Weather in Paris?",
            tools=RESPONSE_TOOLS,
            tool_choice={"type": "function", "name": "get_time"},
            max_output_tokens=80,
        )
        async with client.responses.stream(
            model=MODEL_ID,
            input="Weather in Paris?",
            tools=RESPONSE_TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=80,
            temperature=0,
        ) as stream:
            kinds = [event.type async for event in stream]
            streamed = await stream.get_final_response()
    Response.model_validate(answer.model_dump())
    (call,) = answer.output
    assert call.type == "function_call" and call.name == "get_time"
    assert call.call_id.startswith("call_") and call.status == "completed"
    check_arguments("get_time", call.arguments)
    assert answer.status == "completed" and answer.tool_choice.type == "function"  # type: ignore[union-attr]
    assert [t.name for t in answer.tools] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (item,) = streamed.output
    assert item.type == "function_call"
    check_arguments(item.name, item.arguments)


async def test_responses_replay_function_calls_and_outputs(shim: Shim) -> None:
    items: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris","days":1}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    async with async_client(shim) as client:
        answer = await client.responses.create(
            model=MODEL_ID, input=items, tools=RESPONSE_TOOLS, max_output_tokens=4, temperature=0
        )
        alone = await client.responses.create(
            model=MODEL_ID, input=items[:1], tools=RESPONSE_TOOLS, max_output_tokens=4
        )
    assert answer.usage is not None and alone.usage is not None
    assert answer.usage.input_tokens > alone.usage.input_tokens + 20
    assert answer.output[0].type == "message"


@pytest.fixture
async def plain_shim(shim_model: Path, tmp_path: Path) -> AsyncIterator[Shim]:
    """A shim over a model whose chat template knows nothing of tools."""
    plain = tmp_path / "plain"
    shutil.copytree(shim_model, plain)
    config_path = plain / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    async with MLXEngine(plain, model_id=MODEL_ID) as engine, trio.open_nursery() as nursery:
        yield await start_shim(nursery, engine)
        nursery.cancel_scope.cancel()


async def test_a_model_without_tool_support_says_so(plain_shim: Shim) -> None:
    async with async_client(plain_shim) as client:
        with pytest.raises(openai.BadRequestError, match="cannot call tools") as chat:
            await client.chat.completions.create(model=MODEL_ID, messages=USER, tools=TOOLS)
        with pytest.raises(openai.BadRequestError, match="cannot call tools"):
            await client.responses.create(model=MODEL_ID, input="hi", tools=RESPONSE_TOOLS)
        none = await client.chat.completions.create(
            model=MODEL_ID, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=2
        )
    assert chat.value.status_code == 400
    assert none.choices[0].finish_reason == "length"


BAD: list[tuple[dict[str, Any], str, str | None]] = [
    ({"tools": [{"type": "custom", "custom": {}}]}, "tools[0].type", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", None),
    (
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        "tools[0].function.name",
        None,
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        "tools[0].function.parameters",
        "invalid_type",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
        "tools[0].function.parameters",
        "unsupported_schema",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"description": "x" * (1 << 17)}},
                }
            ]
        },
        "tools[0].function.parameters",
        None,
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 10**5}}]},
        "tools[0].function.description",
        None,
    ),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", None),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "tool_choice",
        None,
    ),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_type"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", None),
    (
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}, *USER]},
        None,
        None,
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "id": "c"}]}]},
        "messages[0].tool_calls[0].function",
        None,
    ),
]


@pytest.mark.parametrize(("fields", "param", "code"), BAD)
async def test_bad_tool_requests_are_400(
    shim: Shim, fields: dict[str, Any], param: str | None, code: str | None
) -> None:
    body: dict[str, Any] = {"model": MODEL_ID, "messages": USER, "max_tokens": 2} | fields
    async with async_client(shim) as client:
        if param is None:
            await client.chat.completions.create(**body)
            return
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(**body)
    assert error.value.param == param
    if code is not None:
        assert error.value.code == code


async def test_bad_responses_tools_are_400(shim: Shim) -> None:
    async with async_client(shim) as client:
        with pytest.raises(openai.BadRequestError) as kind:
            await client.responses.create(
                model=MODEL_ID, input="hi", tools=[{"type": "web_search"}]
            )
        with pytest.raises(openai.BadRequestError) as named:
            await client.responses.create(
                model=MODEL_ID,
                input="hi",
                tools=RESPONSE_TOOLS,
                tool_choice={"type": "function", "name": "nope"},
            )
    assert kind.value.param == "tools[0].type" and kind.value.code == "unsupported_parameter"
    assert named.value.param == "tool_choice"
