"""Structured output: the new wire fields, grammars, and JSON enforced while decoding."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import jsonschema
import llguidance
import msgpack
import pytest
import trio
from fuzzing import mutations
from hypothesis import given, settings
from hypothesis import strategies as st
from infer_helpers import MODEL_ID, collect, infer_all, text_of

from dbloom.inference import (
    ChatMessage,
    Chunk,
    DecodeError,
    Final,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    MLXEngine,
    ResponseFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    decode_payload,
    encode_message,
    schema_problem,
)
from dbloom.inference._grammar import request_grammar
from dbloom.inference._tools import ToolSyntax

BIG = 1 << 22
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
INVENTORY = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                    "count": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "count"],
                "additionalProperties": False,
            },
        },
        "warehouse": {"enum": ["north", "south"]},
    },
    "required": ["items", "warehouse"],
    "additionalProperties": False,
}
TAGS = {
    "type": "array",
    "items": {"type": "string", "maxLength": 8},
    "minItems": 2,
    "maxItems": 4,
}
NESTED = {
    "type": "object",
    "properties": {
        "point": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -9, "maximum": 9},
                "y": {"type": "integer", "minimum": -9, "maximum": 9},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 6}]},
    },
    "required": ["point", "label"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "inventory": INVENTORY, "tags": TAGS, "nested": NESTED}
TOOL = Tool(name="lookup", description="Look it up", parameters=json.dumps(PERSON))
MESSAGES = (ChatMessage(role="user", content="Describe someone."),)

REQUEST = GenerateRequest(
    model="tiny",
    messages=(
        ChatMessage(role="user", content="weather?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=(ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}'),),
        ),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    ),
    tools=(TOOL, Tool(name="get_weather")),
    tool_choice="required",
    tool_name="lookup",
    parallel_tool_calls=False,
    response_format=ResponseFormat(kind="json_schema", schema=json.dumps(PERSON)),
)
CHUNK = Chunk(
    text="",
    token_ids=(),
    tool_calls=(
        ToolCallDelta(index=0, id="call_x", name="lookup"),
        ToolCallDelta(index=0, arguments='{"name":'),
    ),
)
MESSAGES_ON_THE_WIRE = [
    REQUEST,
    GenerateRequest(
        model="m", messages=MESSAGES, response_format=ResponseFormat(kind="json_object")
    ),
    CHUNK,
    Chunk(
        text="\ufffd",
        token_ids=(7,),
        logprobs=(
            TokenLogprob(
                token=7,
                logprob=-0.5,
                top=((7, -0.5), (9, -1.0)),
                text="\ufffd",
                top_text=("\ufffd", "a"),
                token_bytes=b"\xe6",
                top_bytes=(b"\xe6", b"a"),
            ),
        ),
    ),
    Final(
        request_id="r", finish_reason=FinishReason.TOOL_CALLS, prompt_tokens=3, completion_tokens=9
    ),
]


def payload(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = msgpack.unpackb(encode_message(message, max_size=BIG)[4:])
    return data


def reencode(m: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(m, use_bin_type=True)
    return data


@pytest.mark.parametrize("message", MESSAGES_ON_THE_WIRE, ids=lambda m: type(m).__name__)
def test_new_fields_round_trip(message: Any) -> None:
    assert decode_payload(encode_message(message, max_size=BIG)[4:]) == message


def test_requests_without_the_new_fields_encode_as_before() -> None:
    plain = GenerateRequest(model="m", messages=MESSAGES)
    m = payload(plain)
    assert not {"tools", "tool_choice", "tool_name", "parallel_tool_calls", "format"} & set(m)
    assert m["messages"] == [{"role": "user", "content": "Describe someone."}]
    assert "tool_calls" not in payload(Chunk(text="a", token_ids=(1,)))


def _with(base: Any, **change: Any) -> dict[str, Any]:
    m = payload(base)
    m.update(change)
    return m


def _message(**change: Any) -> dict[str, Any]:
    return _with(REQUEST, messages=[{"role": "user", "content": "x"} | change])


TOOL_ROW = ["lookup", "", "{}"]
BAD = [
    (_with(REQUEST, tools=[["lookup", ""]]), "3-element"),
    (_with(REQUEST, tools={"lookup": 1}), "3-element"),
    (_with(REQUEST, tools=[["bad name", "", "{}"]]), "tool name"),
    (_with(REQUEST, tools=[["f", "", "[1]"]]), "JSON object"),
    (_with(REQUEST, tools=[["f", "", "{]"]]), "not valid JSON"),
    (_with(REQUEST, tools=[["f", "", '{"a": NaN}']]), "not valid JSON"),
    (_with(REQUEST, tools=[["f", "", "{}"]] * 2, tool_name="f"), "unique"),
    (_with(REQUEST, tools=[TOOL_ROW] * 129, tool_name="lookup"), "at most 128"),
    (_with(REQUEST, tools=[["f", "x" * 9000, "{}"]], tool_name="f"), "description"),
    (_with(REQUEST, tools=[["f", "", " " * (129 << 10)]], tool_name="f"), "parameters"),
    (_with(REQUEST, tool_choice="sometimes"), "tool_choice"),
    (_with(REQUEST, tool_choice=1), "tool_choice"),
    (_with(REQUEST, tool_name="nope"), "tool_name"),
    (_with(REQUEST, tool_choice="auto"), "tool_name"),
    (_with(REQUEST, parallel_tool_calls=1), "parallel_tool_calls"),
    (_with(REQUEST, format={"type": "yaml"}), "response format"),
    (_with(REQUEST, format={"type": "json_schema"}), "needs a schema"),
    (_with(REQUEST, format={"type": "json_object", "schema": "{}"}), "needs a schema"),
    (_with(REQUEST, format={"type": "json_schema", "schema": "{", "x": 1}), "format must be"),
    (_with(REQUEST, format=["json_object"]), "format must be"),
    (_message(tool_calls=[["c", "f", "{}"]]), "only assistant"),
    (_message(tool_call_id="c"), "only tool messages"),
    (_message(tool_calls=[["c", "f"]]), "3-element"),
    (_message(name="x"), "each message"),
    (_message(role="assistant", tool_calls=[["", "f", "{}"]]), "tool call id"),
    (_message(role="tool", tool_call_id=7), "tool_call_id"),
    (_with(GenerateRequest(model="m", prompt="p"), tools=[TOOL_ROW]), "need messages"),
    (_with(CHUNK, tool_calls=[[0, "c", "f"]]), "4-element"),
    (_with(CHUNK, tool_calls=[[-1, "c", "f", ""]]), "index"),
    (_with(CHUNK, tool_calls=[[128, "c", "f", ""]]), "index"),
    (_with(CHUNK, tool_calls=[[True, "c", "f", ""]]), "index"),
    (_with(CHUNK, tool_calls=[[0, "c" * 129, "f", ""]]), "id"),
    (_with(CHUNK, tool_calls=[[0, "c", "no spaces", ""]]), "name"),
    (_with(CHUNK, tool_calls=[[0, "c", "f", "x" * 8193]]), "pieces"),
    (_with(CHUNK, tool_calls=[[0, "c", "f", b"{}"]]), "pieces"),
    (_with(CHUNK, tool_calls=[[0, "", "", ""]] * 17), "at most 16"),
    (_with(CHUNK, tokens=[5], logprobs=[[5, -1.0, [], "", [], "x", []]]), "token bytes"),
    (_with(CHUNK, tokens=[5], logprobs=[[5, -1.0, [], "", [], b"x" * 1025, []]]), "token bytes"),
    (_with(CHUNK, tokens=[5], logprobs=[[5, -1.0, [[5, -1.0]], "", [], b"", [b"", b""]]]), "bytes"),
    (_with(CHUNK, tokens=[5], logprobs=[[5, -1.0, [], "", [], b""]]), "logprob entry"),
]


@pytest.mark.parametrize(("m", "match"), BAD)
def test_new_fields_are_decoded_strictly(m: dict[str, Any], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_payload(reencode(m))


@settings(max_examples=400)
@given(st.sampled_from(MESSAGES_ON_THE_WIRE).flatmap(lambda m: mutations(reencode(payload(m)))))
def test_mutated_frames_with_new_fields_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_payload(data)


FIELD_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 200) | st.text(max_size=6) | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=400)
@given(
    base=st.sampled_from(MESSAGES_ON_THE_WIRE),
    key=st.sampled_from(
        ["tools", "tool_choice", "tool_name", "parallel_tool_calls", "format", "tool_calls"]
    ),
    value=FIELD_VALUES,
)
def test_garbage_in_new_fields_raises_only_decode_error(base: Any, key: str, value: Any) -> None:
    m = payload(base)
    m[key] = value
    if "messages" in m and key == "tool_calls":
        m["messages"] = [{"role": "assistant", "content": "", "tool_calls": value}]
    with contextlib.suppress(DecodeError):
        decode_payload(reencode(m))


JSON_SYNTAX = ToolSyntax(
    start="<tool_call>", end="</tool_call>", parser=json.loads, json_calls=True
)
XML_SYNTAX = ToolSyntax(
    start="<tool_call>", end="</tool_call>", parser=json.loads, json_calls=False
)


def test_grammars_for_each_combination() -> None:
    fmt = ResponseFormat(kind="json_object")
    plain = GenerateRequest(model="m", messages=MESSAGES)
    assert request_grammar(plain, JSON_SYNTAX) is None
    with_tools = GenerateRequest(model="m", messages=MESSAGES, tools=(TOOL,))
    assert request_grammar(with_tools, JSON_SYNTAX) is None
    answer = request_grammar(
        GenerateRequest(model="m", messages=MESSAGES, response_format=fmt), None
    )
    assert answer is not None and answer.startswith("start: answer\n")
    both = request_grammar(
        GenerateRequest(model="m", messages=MESSAGES, tools=(TOOL,), response_format=fmt),
        JSON_SYNTAX,
        lambda marker: {"<tool_call>": 5, "</tool_call>": 6}[marker],
    )
    assert both is not None and "start: answer | calls" in both and "<[5]>" in both
    assert 'calls: call ("\\n" call)*' in both
    single = request_grammar(
        GenerateRequest(
            model="m", messages=MESSAGES, tools=(TOOL,), tool_choice="required", tool_name="lookup"
        ),
        JSON_SYNTAX,
    )
    assert single is not None and "calls: call\n" in single and '"<tool_call>"' in single
    assert "answer" not in single
    for syntax in (None, XML_SYNTAX):
        with pytest.raises(InvalidRequest, match="cannot be enforced"):
            request_grammar(
                GenerateRequest(
                    model="m", messages=MESSAGES, tools=(TOOL,), tool_choice="required"
                ),
                syntax,
            )


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"$ref": "https://example.com/schema.json"}, "https://example.com"),
        ({"type": "stringy"}, "stringy"),
        (PERSON, None),
        (INVENTORY, None),
    ],
)
def test_schema_problems_come_from_the_library(schema: Any, problem: str | None) -> None:
    found = schema_problem(json.dumps(schema))
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def constrained(schema: Any | None, **kwargs: Any) -> GenerateRequest:
    fmt = (
        ResponseFormat(kind="json_schema", schema=json.dumps(schema))
        if schema is not None
        else ResponseFormat(kind="json_object")
    )
    fields: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": MESSAGES,
        "max_tokens": 200,
        "temperature": 0.0,
        "response_format": fmt,
    }
    return GenerateRequest(**(fields | kwargs))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_output_validates_against_the_schema(engine: MLXEngine, name: str) -> None:
    chunks, final = await collect(engine.generate(constrained(SCHEMAS[name])))
    assert final.finish_reason is FinishReason.STOP
    jsonschema.validate(json.loads(text_of(chunks)), SCHEMAS[name])


async def test_sampled_outputs_validate_too(engine: MLXEngine) -> None:
    outputs: list[str] = []

    async def run(seed: int) -> None:
        request = constrained(INVENTORY, temperature=1.0, top_p=0.95, seed=seed)
        chunks, final = await collect(engine.generate(request))
        assert final.finish_reason is FinishReason.STOP
        outputs.append(text_of(chunks))

    async with trio.open_nursery() as nursery:
        for seed in range(8):
            nursery.start_soon(run, seed)
    for text in outputs:
        jsonschema.validate(json.loads(text), INVENTORY)
    assert len(set(outputs)) > 1


async def test_json_object_mode_gives_an_object(engine: MLXEngine, reference: Any) -> None:
    """Any object is allowed, so a random model may never close one: a bias towards `}`
    lets it, and the grammar still decides where it may go."""
    _, tokenizer = reference
    (close,) = tokenizer.encode("}", add_special_tokens=False)
    request = constrained(None, max_tokens=60, logit_bias={close: 100})
    chunks, final = await collect(engine.generate(request))
    assert final.finish_reason is FinishReason.STOP
    assert json.loads(text_of(chunks)) == {}


async def test_constraints_do_not_leak_into_the_batch(engine: MLXEngine) -> None:
    """Free requests decoding next to constrained ones give exactly what they give alone,
    and every constrained one keeps its own parser state."""
    free = GenerateRequest(model=MODEL_ID, messages=MESSAGES, max_tokens=40, temperature=0.0)
    alone, _ = await collect(engine.generate(free))
    texts: dict[str, str] = {}

    async def run(key: str, request: GenerateRequest) -> None:
        chunks, _ = await collect(engine.generate(request))
        texts[key] = text_of(chunks)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "free", free)
        for name, schema in SCHEMAS.items():
            nursery.start_soon(run, name, constrained(schema))
    assert texts["free"] == text_of(alone)
    for name, schema in SCHEMAS.items():
        jsonschema.validate(json.loads(texts[name]), schema)


async def test_unsupported_schemas_are_refused_before_decoding(engine: MLXEngine) -> None:
    with pytest.raises(InvalidRequest, match="not"):
        await collect(engine.generate(constrained({"not": {"type": "null"}})))
    assert engine.load().active == 0


async def test_structured_output_over_the_wire(server_port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server_port) as stream:
        chunks, final = await infer_all(stream, constrained(PERSON))
    jsonschema.validate(json.loads(text_of(chunks)), PERSON)
    assert final.finish_reason is FinishReason.STOP


def test_tool_parameters_may_refer_to_their_own_definitions() -> None:
    """Pointers into the parameters' own `$defs` (and to their root, recursively) still
    resolve once the parameters sit inside the call's schema; data is left alone."""
    tree = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"const": {"$ref": "#/not/a/reference"}},
                    "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["label"],
            }
        },
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/Node"}, "again": {"$ref": "#"}},
        "required": ["root"],
    }
    tool = Tool(name="plant", parameters=json.dumps(tree))
    grammar = request_grammar(
        GenerateRequest(model="m", messages=MESSAGES, tools=(tool,), tool_choice="required"),
        JSON_SYNTAX,
    )
    assert grammar is not None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar), None
    )
    assert not is_error, messages
    assert "#/properties/arguments/$defs/Node" in grammar
    assert '"#/properties/arguments"' in grammar
    assert "#/not/a/reference" in grammar
