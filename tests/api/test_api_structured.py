"""Structured output through the official SDK: JSON mode, JSON Schema, Pydantic parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, Field
from shim_helpers import MODEL_ID, Shim, async_client
from tokenizers import Tokenizer

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
PERSON_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}


class Pet(BaseModel):
    name: str = Field(max_length=12)
    species: Literal["cat", "dog", "owl"]
    age: int = Field(ge=0, le=30)


class Household(BaseModel):
    pets: list[Pet] = Field(min_length=1, max_length=2)
    city: str = Field(max_length=10)


async def test_json_schema_not_streamed_and_streamed(shim: Shim) -> None:
    async with async_client(shim) as client:
        answer = await client.chat.completions.create(
            model=MODEL_ID, messages=USER, response_format=PERSON_FORMAT, max_tokens=120
        )
        stream = await client.chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            response_format=PERSON_FORMAT,
            max_tokens=120,
            temperature=0,
            stream=True,
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), PERSON)
    jsonschema.validate(json.loads(streamed), PERSON)


async def test_the_sdk_parses_into_pydantic_models(shim: Shim) -> None:
    async with async_client(shim) as client:
        parsed = await client.chat.completions.parse(
            model=MODEL_ID, messages=USER, response_format=Household, max_tokens=200
        )
        response = await client.responses.parse(
            model=MODEL_ID, input="A pet.", text_format=Pet, max_output_tokens=120
        )
    household = parsed.choices[0].message.parsed
    assert isinstance(household, Household) and 1 <= len(household.pets) <= 2
    assert isinstance(response.output_parsed, Pet)


async def test_json_object_mode(shim: Shim, shim_model: Path) -> None:
    """Any object is allowed, so a random model may never close one: a bias towards `}`
    lets it, and the grammar still decides where it may go."""
    close = Tokenizer.from_file(str(shim_model / "tokenizer.json")).token_to_id("}")
    async with async_client(shim) as client:
        answer = await client.chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            response_format={"type": "json_object"},
            logit_bias={str(close): 100},
            max_tokens=40,
        )
    assert json.loads(answer.choices[0].message.content or "") == {}


async def test_responses_text_format(shim: Shim) -> None:
    async with async_client(shim) as client:
        answer = await client.responses.create(
            model=MODEL_ID,
            input="Describe a person.",
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
            max_output_tokens=120,
        )
        stream = await client.responses.create(
            model=MODEL_ID,
            input="Describe a person.",
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
            max_output_tokens=120,
            stream=True,
        )
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
    jsonschema.validate(json.loads(answer.output_text), PERSON)
    assert answer.text is not None and answer.text.format is not None
    assert answer.text.format.type == "json_schema"
    jsonschema.validate(json.loads("".join(deltas)), PERSON)


UNSUPPORTED: list[tuple[Any, str, str]] = [
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        "response_format.json_schema.schema",
        "not",
    ),
    (
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}},
        },
        "response_format.json_schema.schema",
        "look-around",
    ),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://a/b"}}},
        "response_format.json_schema.schema",
        "http://a/b",
    ),
    (
        {"type": "json_schema", "json_schema": {"schema": PERSON}},
        "response_format.json_schema.name",
        "",
    ),
    ({"type": "json_schema"}, "response_format.json_schema", ""),
    ({"type": "grammar"}, "response_format.type", "grammar"),
]


@pytest.mark.parametrize(("response_format", "param", "says"), UNSUPPORTED)
async def test_unsupported_formats_are_a_clear_400(
    shim: Shim, response_format: Any, param: str, says: str
) -> None:
    async with async_client(shim) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(
                model=MODEL_ID, messages=USER, response_format=response_format
            )
    assert error.value.param == param
    assert says in error.value.message


async def test_unsupported_responses_schema(shim: Shim) -> None:
    async with async_client(shim) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await client.responses.create(
                model=MODEL_ID,
                input="hi",
                text={"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}},
            )
    assert error.value.param == "text.format.schema"
    assert error.value.code == "unsupported_schema"
