"""The Responses API through the official SDK against the real engine."""

from __future__ import annotations

from typing import Any

from openai.types.responses import Response, ResponseStreamEvent
from shim_helpers import MODEL_ID, Shim, async_client, engine_output, in_thread, sync_client

from dbloom.inference import ChatMessage, GenerateRequest

EVENT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def greedy(max_tokens: int, *messages: tuple[str, str]) -> GenerateRequest:
    chat = tuple(ChatMessage(role=role, content=content) for role, content in messages)
    return GenerateRequest(model=MODEL_ID, messages=chat, max_tokens=max_tokens, temperature=0.0)


async def test_response_matches_the_engine(shim: Shim) -> None:
    expected, final = await engine_output(
        shim.engine, greedy(20, ("system", "Answer briefly."), ("user", "Hello world"))
    )

    def call() -> Response:
        with sync_client(shim) as client:
            return client.responses.create(
                model=MODEL_ID,
                instructions="Answer briefly.",
                input="Hello world",
                max_output_tokens=20,
                temperature=0,
            )

    answer = await in_thread(call)
    Response.model_validate(answer.model_dump())
    assert answer.id.startswith("resp_")
    assert answer.object == "response"
    assert answer.output_text == expected
    assert answer.status == ("incomplete" if final.finish_reason.value == "length" else "completed")
    assert answer.usage is not None
    assert answer.usage.input_tokens == final.prompt_tokens
    assert answer.usage.output_tokens == final.completion_tokens
    assert answer.usage.total_tokens == final.total_tokens
    message = answer.output[0]
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert message.content[0].annotations == []


async def test_response_input_items(shim: Shim) -> None:
    expected, _ = await engine_output(
        shim.engine, greedy(8, ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"))
    )
    items: list[Any] = [
        {"role": "user", "content": "Hi"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello."}],
        },
        {"role": "user", "content": [{"type": "input_text", "text": "Bye"}]},
    ]
    async with async_client(shim) as client:
        answer = await client.responses.create(
            model=MODEL_ID, input=items, max_output_tokens=8, temperature=0
        )
    assert answer.output_text == expected


async def test_response_stream_event_sequence(shim: Shim) -> None:
    expected, final = await engine_output(shim.engine, greedy(24, ("user", "Hello world")))
    async with async_client(shim) as client:
        stream = await client.responses.create(
            model=MODEL_ID, input="Hello world", max_output_tokens=24, temperature=0, stream=True
        )
        events: list[ResponseStreamEvent] = [event async for event in stream]
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == [
        *EVENT_ORDER,
        "response.incomplete" if final.finish_reason.value == "length" else "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == expected
    done = events[kinds.index("response.output_text.done")]
    assert done.type == "response.output_text.done" and done.text == expected
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert last.response.output_text == expected
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == final.completion_tokens


async def test_response_stream_helper_accumulates(shim: Shim) -> None:
    """The SDK's `responses.stream()` helper, which rebuilds the response from the events.

    A response cut by `max_output_tokens` ends with `response.incomplete`, as OpenAI's do
    (the helper's `get_final_response()` only knows `response.completed`).
    """
    expected, _ = await engine_output(shim.engine, greedy(10, ("user", "Hello world")))
    async with (
        async_client(shim) as client,
        client.responses.stream(
            model=MODEL_ID, input="Hello world", max_output_tokens=10, temperature=0
        ) as stream,
    ):
        events = [event async for event in stream]
    snapshots = [e.snapshot for e in events if e.type == "response.output_text.delta"]
    assert snapshots[-1] == expected
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == expected
