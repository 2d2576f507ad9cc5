"""Tool calls, structured output and logprobs through real peers, with the official SDK.

The node parses tool calls and enforces grammars; what crosses `/dbloom/infer` are the
strictly decoded tool-call pieces and finish reasons, which the shim turns back into
OpenAI's shapes. Logprobs must arrive exactly as a local engine computes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
from network_helpers import MODEL, in_thread, network
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from tokenizers import Tokenizer

from dbloom.inference import ChatMessage, Final, GenerateRequest, MLXEngine

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "role"],
    "additionalProperties": False,
}
MESSAGES: Any = [{"role": "user", "content": "Weather in Paris?"}]
PROMPT = "Peers find each other through the DHT"


async def local_logprobs(model_dir: Path, max_tokens: int) -> list[tuple[str, float]]:
    async with MLXEngine(model_dir, model_id=MODEL) as engine:
        request = GenerateRequest(
            model=MODEL,
            messages=(ChatMessage(role="user", content=PROMPT),),
            max_tokens=max_tokens,
            temperature=0.0,
            logprobs=True,
            top_logprobs=3,
        )
        out: list[tuple[str, float]] = []
        async with engine.generate(request) as generation:
            async for item in generation:
                if not isinstance(item, Final):
                    out += [(lp.text, lp.logprob) for lp in item.logprobs or ()]
        return out


async def test_tools_and_structured_output_through_peers(e2e_model: Path) -> None:
    async with network(e2e_model, peers=2) as net:
        client = net.client()

        def blocking() -> tuple[Any, list[Any], Any]:
            whole = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=80
            )
            stream = client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                max_tokens=80,
                stream=True,
            )
            chunks = list(stream)
            structured = client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
                },
                max_tokens=60,
            )
            return whole, chunks, structured

        whole, chunks, structured = await in_thread(blocking)
    ChatCompletion.model_validate(whole.model_dump())
    assert whole.choices[0].finish_reason == "tool_calls"
    calls = whole.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    pieces = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in pieces)
    jsonschema.validate(json.loads(arguments), WEATHER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert structured.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(structured.choices[0].message.content), PERSON)


async def test_logprobs_through_peers_match_the_local_engine(e2e_model: Path) -> None:
    expected = await local_logprobs(e2e_model, 8)
    async with network(e2e_model, peers=1) as net:
        client = net.client()
        chat: Any = [{"role": "user", "content": PROMPT}]

        def blocking() -> tuple[Any, list[Any], Any, list[Any]]:
            options: Any = {"model": MODEL, "max_tokens": 8, "temperature": 0}
            whole = client.chat.completions.create(
                messages=chat, logprobs=True, top_logprobs=3, **options
            )
            streamed = list(
                client.chat.completions.create(
                    messages=chat, logprobs=True, top_logprobs=3, stream=True, **options
                )
            )
            completion = client.completions.create(prompt=PROMPT, logprobs=2, **options)
            completion_stream = list(
                client.completions.create(prompt=PROMPT, logprobs=2, stream=True, **options)
            )
            return whole, streamed, completion, completion_stream

        whole, streamed, completion, completion_stream = await in_thread(blocking)
    ChatCompletion.model_validate(whole.model_dump())
    content = whole.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in content] == expected
    joined = bytes(b for token in content for b in token.bytes)
    assert joined.decode(errors="replace").strip() == whole.choices[0].message.content.strip()
    for token in content:
        if "\ufffd" not in token.token:
            assert token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        assert (token.top_logprobs[0].token, token.top_logprobs[0].logprob) == (
            token.token,
            token.logprob,
        )
        assert token.top_logprobs[0].bytes == token.bytes
    pieces = [
        t
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [p.model_dump() for p in pieces] == [t.model_dump() for t in content]

    Completion.model_validate(completion.model_dump())
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert (
        len(logprobs.token_logprobs) == len(logprobs.tokens) == completion.usage.completion_tokens
    )
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(
        max(top.values()) == lp
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )
    parts = [
        c.choices[0].logprobs for c in completion_stream if c.choices and c.choices[0].logprobs
    ]
    assert [t for p in parts for t in p.tokens] == logprobs.tokens
    assert [v for p in parts for v in p.token_logprobs] == logprobs.token_logprobs
    assert [o for p in parts for o in p.text_offset] == logprobs.text_offset


async def test_logprob_bytes_of_a_partial_character(e2e_model: Path) -> None:
    """A token holding part of a UTF-8 character shows as U+FFFD, but its `bytes` are its
    own, so a client can join the bytes of consecutive tokens into the character."""
    tokenizer = Tokenizer.from_file(str(e2e_model / "tokenizer.json"))
    partial = next(
        i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i]) == "\ufffd"
    )
    async with network(e2e_model, peers=1) as net:
        client = net.client()

        def blocking() -> Any:
            return client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=1,
                logit_bias={str(partial): 100},
                logprobs=True,
                top_logprobs=2,
            )

        answer = await in_thread(blocking)
    (token,) = answer.choices[0].logprobs.content
    assert token.token == "\ufffd"
    assert len(token.bytes) == 1 and token.bytes != list("\ufffd".encode())
    assert token.top_logprobs[0].bytes == token.bytes
