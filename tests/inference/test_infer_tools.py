"""Tool calling on the node: reading calls out of the text, chat templates, forced calls."""

from __future__ import annotations

import json
import shutil
from itertools import count
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio
from infer_helpers import MODEL_ID, collect, infer_all, text_of

from dbloom.inference import (
    ChatMessage,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    MLXEngine,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from dbloom.inference._events import MAX_ARGUMENTS_PIECE
from dbloom.inference._tools import ToolCallReader, ToolSyntax

WEATHER = Tool(
    name="get_weather",
    description="The weather in a city",
    parameters=json.dumps(
        {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        }
    ),
)
CLOCK = Tool(
    name="get_time",
    parameters=json.dumps(
        {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        }
    ),
)
USER = (ChatMessage(role="user", content="What is the weather in Paris?"),)


def json_parser(text: str, tools: Any = None) -> Any:
    return json.loads(text.strip())


JSON_SYNTAX = ToolSyntax(
    start="<tool_call>", end="</tool_call>", parser=json_parser, json_calls=True
)


def reader(syntax: ToolSyntax = JSON_SYNTAX) -> ToolCallReader:
    ids = count()
    return ToolCallReader(syntax, [], make_id=lambda: f"call_{next(ids)}")


def feed_all(r: ToolCallReader, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    text, deltas = "", []
    for piece in pieces:
        out, found = r.feed(piece)
        text += out
        deltas += found
    out, found = r.finish()
    return text + out, deltas + found


def calls_of(deltas: list[ToolCallDelta]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call, assembled as a client would."""
    calls: list[list[str]] = []
    for d in deltas:
        if d.id:
            assert d.index == len(calls) and not d.arguments
            calls.append([d.id, d.name, ""])
        else:
            calls[d.index][2] += d.arguments
    return [(i, n, a) for i, n, a in calls]


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("split", [1, 2, 5, 11, 1000])
def test_reader_finds_calls_however_the_text_is_split(split: int) -> None:
    text = "Let me check." + CALL + "\n" + CALL.replace("Paris", "Oslo")
    pieces = [text[i : i + split] for i in range(0, len(text), split)]
    r = reader()
    content, deltas = feed_all(r, pieces)
    assert content == "Let me check.\n"
    assert calls_of(deltas) == [
        ("call_0", "get_weather", '{"city": "Paris"}'),
        ("call_1", "get_weather", '{"city": "Oslo"}'),
    ]
    assert r.called


def test_reader_holds_back_only_a_possible_marker() -> None:
    r = reader()
    assert r.feed("a <tool") == ("a ", [])
    assert r.feed("s are fine") == ("<tools are fine", [])
    assert r.finish() == ("", [])
    assert not r.called


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        '{"arguments": {}}',
        '{"name": "bad name!", "arguments": {}}',
        '{"name": "x" , "arguments": {"v": NaN}}',
        "[1, 2]",
    ],
)
def test_a_call_that_does_not_parse_stays_content(body: str) -> None:
    raw = f"<tool_call>{body}</tool_call>"
    r = reader()
    assert feed_all(r, ["before ", raw, " after"]) == (f"before {raw} after", [])
    assert not r.called


def test_an_unterminated_call_is_parsed_at_the_end_or_given_back() -> None:
    assert calls_of(feed_all(reader(), ['<tool_call>{"name": "f", "arguments": {}}'])[1]) == [
        ("call_0", "f", "{}")
    ]
    assert feed_all(reader(), ['<tool_call>{"name": "f", "argu']) == (
        '<tool_call>{"name": "f", "argu',
        [],
    )


def test_families_without_an_end_marker_and_with_lists() -> None:
    def parse(text: str, tools: Any) -> Any:
        return [{"name": c["name"], "arguments": c["arguments"]} for c in json.loads(text)]

    syntax = ToolSyntax(start="[TOOL_CALLS]", end="", parser=parse, json_calls=False)
    text = (
        'Sure.[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{}"}]'
    )
    content, deltas = feed_all(reader(syntax), [text[:20], text[20:]])
    assert content == "Sure."
    assert calls_of(deltas) == [("call_0", "a", '{"x": 1}'), ("call_1", "b", "{}")]


def test_long_arguments_come_in_pieces_that_fit_a_frame() -> None:
    value = "é" * (3 * MAX_ARGUMENTS_PIECE)
    call = json.dumps({"name": "f", "arguments": {"v": value}}, ensure_ascii=False)
    _, deltas = feed_all(reader(), [f"<tool_call>{call}</tool_call>"])
    assert all(len(d.arguments) <= MAX_ARGUMENTS_PIECE for d in deltas)
    assert len(deltas) == 1 + 4
    assert json.loads(calls_of(deltas)[0][2]) == {"v": value}


def test_the_tiny_model_offers_json_tool_calls(tiny_model: Path) -> None:
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    syntax = ToolSyntax.of(tokenizer)
    assert syntax is not None and syntax.json_calls
    assert (syntax.start, syntax.end) == ("<tool_call>", "</tool_call>")
    prompt = tokenizer.apply_chat_template(
        [m.template_entry() for m in USER], tools=[WEATHER.template_entry()], tokenize=False
    )
    assert '"name": "get_weather"' in prompt


def required(*tools: Tool, **kwargs: Any) -> GenerateRequest:
    fields: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": USER,
        "max_tokens": 80,
        "temperature": 0.0,
        "tools": tools,
        "tool_choice": "required",
    }
    return GenerateRequest(**(fields | kwargs))


async def test_a_named_tool_is_called_with_valid_arguments(engine: MLXEngine) -> None:
    chunks, final = await collect(engine.generate(required(WEATHER, CLOCK, tool_name="get_time")))
    deltas = [d for c in chunks for d in c.tool_calls]
    ((call_id, name, arguments),) = calls_of(deltas)
    assert call_id.startswith("call_") and name == "get_time"
    jsonschema.validate(json.loads(arguments), json.loads(CLOCK.parameters))
    assert final.finish_reason is FinishReason.TOOL_CALLS
    assert text_of(chunks) == ""
    assert final.completion_tokens == sum(len(c.token_ids) for c in chunks)


async def test_sampled_calls_stay_inside_the_grammar(
    engine: MLXEngine,
) -> None:
    async def one(seed: int) -> list[tuple[str, str, str]]:
        request = required(
            WEATHER, CLOCK, temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=False
        )
        chunks, final = await collect(engine.generate(request))
        assert final.finish_reason is FinishReason.TOOL_CALLS
        return calls_of([d for c in chunks for d in c.tool_calls])

    results: dict[int, list[tuple[str, str, str]]] = {}
    async with trio.open_nursery() as nursery:
        for seed in range(6):

            async def run(seed: int = seed) -> None:
                results[seed] = await one(seed)

            nursery.start_soon(run)
    schemas = {t.name: json.loads(t.parameters) for t in (WEATHER, CLOCK)}
    for calls in results.values():
        assert len(calls) == 1
        for _, name, arguments in calls:
            jsonschema.validate(json.loads(arguments), schemas[name])


async def test_one_call_without_parallel_calls(engine: MLXEngine) -> None:
    chunks, _ = await collect(engine.generate(required(WEATHER, parallel_tool_calls=False)))
    assert len(calls_of([d for c in chunks for d in c.tool_calls])) == 1


async def test_a_tool_round_trip_reaches_the_template(engine: MLXEngine) -> None:
    chunks, _ = await collect(engine.generate(required(WEATHER)))
    ((call_id, name, arguments),) = calls_of([d for c in chunks for d in c.tool_calls])
    history = (
        *USER,
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=(ToolCall(id=call_id, name=name, arguments=arguments),),
        ),
        ChatMessage(role="tool", content="Sunny, 24 C", tool_call_id=call_id),
    )
    follow_up = GenerateRequest(
        model=MODEL_ID, messages=history, tools=(WEATHER,), max_tokens=8, temperature=0.0
    )
    chunks, final = await collect(engine.generate(follow_up))
    without = GenerateRequest(
        model=MODEL_ID, messages=history[:1], tools=(WEATHER,), max_tokens=8, temperature=0.0
    )
    _, shorter = await collect(engine.generate(without))
    # The call and its result are part of the prompt the template rendered.
    assert final.prompt_tokens > shorter.prompt_tokens + 10
    assert final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


async def test_tool_choice_none_offers_no_tools(engine: MLXEngine) -> None:
    plain = GenerateRequest(model=MODEL_ID, messages=USER, max_tokens=6, temperature=0.0)
    none = GenerateRequest(
        model=MODEL_ID,
        messages=USER,
        max_tokens=6,
        temperature=0.0,
        tools=(WEATHER,),
        tool_choice="none",
    )
    (a, fa), (b, fb) = await collect(engine.generate(plain)), await collect(engine.generate(none))
    assert text_of(a) == text_of(b) and fa.prompt_tokens == fb.prompt_tokens


async def test_a_call_the_model_garbles_stays_content(engine: MLXEngine, reference: Any) -> None:
    """Without a grammar, what the model writes after its call marker (forced here with
    logit bias) is read as a call; one that never parses reaches the client as text."""
    _, tokenizer = reference
    (start,) = tokenizer.encode("<tool_call>", add_special_tokens=False)
    request = GenerateRequest(
        model=MODEL_ID,
        messages=USER,
        max_tokens=6,
        temperature=0.0,
        tools=(WEATHER,),
        logit_bias={start: 100},
    )
    chunks, final = await collect(engine.generate(request))
    assert not [d for c in chunks for d in c.tool_calls]
    assert text_of(chunks).startswith("<tool_call><tool_call>")
    assert final.finish_reason is FinishReason.LENGTH


async def test_tools_over_the_wire(server_port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", server_port) as stream:
        chunks, final = await infer_all(stream, required(WEATHER, CLOCK, tool_name="get_weather"))
    ((_, name, arguments),) = calls_of([d for c in chunks for d in c.tool_calls])
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), json.loads(WEATHER.parameters))
    assert final.finish_reason is FinishReason.TOOL_CALLS


async def test_a_model_without_tool_calls_refuses_tools(tiny_model: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    config_path = plain / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    async with MLXEngine(plain, model_id=MODEL_ID) as engine:
        for request in (required(WEATHER), required(WEATHER, tool_choice="auto")):
            with pytest.raises(InvalidRequest, match="cannot call tools"):
                await collect(engine.generate(request))
        none = required(WEATHER, tool_choice="none", max_tokens=3)
        _, final = await collect(engine.generate(none))
        assert final.completion_tokens == 3
