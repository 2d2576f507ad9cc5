"""The Responses API (`POST /v1/responses`): messages and function calls in and out.

Nothing is stored (`store` is always false), so `previous_response_id` and
conversations are refused; a client replays earlier turns, function calls and their
outputs included, as input items. The output is an assistant message and one
`function_call` item per call, in the order the model wrote them. A stream is the event
sequence OpenAI sends for those items, each event with its `sequence_number`; a
generation cut by `max_output_tokens` ends `incomplete`, as OpenAI's does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dbloom.inference import ChatMessage, Chunk, Final, FinishReason, GenerateRequest

from ._call import Call, CalledTool
from ._errors import ApiError, invalid
from ._fields import (
    Features,
    Fields,
    build_request,
    chat_message,
    function_tool,
    function_tools,
    reject_unsupported,
    response_format,
    sampling,
    text_content,
    tool_call,
    tool_features,
)
from ._sse import sse

PART_TYPES = frozenset({"input_text", "output_text"})
"""Text parts: `input_text` in user turns, `output_text` in replayed assistant turns."""


def _function_call(item: Fields, messages: list[ChatMessage]) -> None:
    """A replayed `function_call` item joins the assistant turn it belongs to."""
    call = tool_call(
        item,
        item.required_string("call_id"),
        item.required_string("name"),
        item.required_string("arguments"),
    )
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        messages[-1] = dataclasses.replace(last, tool_calls=(*last.tool_calls, call))
    else:
        messages.append(chat_message(item, "assistant", "", tool_calls=(call,)))


def _input_messages(fields: Fields) -> list[ChatMessage]:
    value = fields.raw("input")
    if isinstance(value, str):
        if not value:
            raise invalid("input must not be empty", param="input")
        return [ChatMessage(role="user", content=value)]
    items = fields.array("input")
    if not items:
        raise invalid("input must be a string or a non-empty array of messages", param="input")
    messages: list[ChatMessage] = []
    for index, item in enumerate(items):
        message = Fields(item, f"input[{index}]")
        kind = message.string("type")
        if kind == "function_call":
            _function_call(message, messages)
            continue
        if kind == "function_call_output":
            output = text_content(message, "output", PART_TYPES)
            if output is None:
                raise invalid(f"{message.param('output')} is required", message.param("output"))
            call_id = message.required_string("call_id")
            messages.append(chat_message(message, "tool", output, tool_call_id=call_id))
            continue
        if kind not in (None, "message"):
            raise invalid(
                f"input items of type {kind!r} are not supported; send messages and function calls",
                param=message.param("type"),
                code="unsupported_content",
            )
        role = message.required_string("role")
        content = text_content(message, "content", PART_TYPES)
        if content is None:
            raise invalid(f"{message.param('content')} is required", message.param("content"))
        messages.append(chat_message(message, role, content))
    return messages


def _named_function(choice: Fields) -> str:
    """`{"type": "function", "name": ...}`."""
    if choice.string("type") != "function":
        raise invalid(
            'tool_choice must be none, auto, required or {"type": "function", "name": ...}',
            param="tool_choice",
        )
    return choice.required_string("name")


def _features(fields: Fields) -> Features:
    """`tools` (functions only), `tool_choice`, `parallel_tool_calls` and `text.format`."""
    tools = [function_tool(tool) for tool in function_tools(fields)]
    features = tool_features(fields, tuple(tools), _named_function)
    text = fields.nested("text")
    text_format = text.nested("format") if text is not None else None
    if text_format is not None:
        kind = text_format.required_string("type")
        features["response_format"] = response_format(text_format, kind, text_format)
    return features


def parse_response(body: object, *, request_id: str, default_max_tokens: int) -> ResponseCall:
    """A `POST /v1/responses` body as a call; raises `ApiError` (400) if malformed."""
    fields = Fields(body)
    model = fields.required_string("model")
    reject_unsupported(fields, "previous_response_id", "conversation", "prompt", "background")
    features = _features(fields)
    instructions = fields.string("instructions")
    messages = _input_messages(fields)
    if instructions:
        messages.insert(0, ChatMessage(role="system", content=instructions))
    settings = sampling(fields, ("max_output_tokens",))
    settings.setdefault("max_tokens", ("max_output_tokens", default_max_tokens))
    request = build_request(
        model=model,
        request_id=request_id,
        settings=settings,
        messages=tuple(messages),
        features=features,
    )
    text = fields.nested("text")
    return ResponseCall(
        request,
        stream=bool(fields.boolean("stream")),
        instructions=instructions,
        max_output_tokens=fields.integer("max_output_tokens"),
        echo={
            "tools": fields.raw("tools") or [],
            "tool_choice": fields.raw("tool_choice") or "auto",
            "text": {"format": (text.raw("format") if text else None) or {"type": "text"}},
            "parallel_tool_calls": request.parallel_tool_calls,
        },
    )


class ResponseCall(Call):
    """One response: an assistant message (one `output_text` part) and function calls.

    Output items are numbered in the order they appear in the generation. The message
    item opens with the first text; a response with neither text nor calls still has an
    empty message, and one with only calls has no message. `echo` holds the request's
    `tools`, `tool_choice`, `text` and `parallel_tool_calls`, which the response repeats.
    """

    def __init__(
        self,
        request: GenerateRequest,
        *,
        stream: bool,
        instructions: str | None,
        max_output_tokens: int | None,
        echo: dict[str, Any],
    ) -> None:
        super().__init__(request, stream=stream)
        self.instructions = instructions
        self.max_output_tokens = max_output_tokens
        self.echo = echo
        self._sequence = 0
        self._items = 0
        self._message_index: int | None = None
        self._message_announced = False
        self._call_indices: list[int] = []

    @property
    def id(self) -> str:
        """The response id, which embeds the engine request id."""
        return f"resp_{self.request_id}"

    @property
    def message_id(self) -> str:
        """The id of the one output message."""
        return f"msg_{self.request_id}"

    def _call_id(self, index: int) -> str:
        return f"fc_{self.request_id}_{index}"

    def _take(self) -> int:
        self._items += 1
        return self._items - 1

    def add(self, chunk: Chunk) -> None:
        super().add(chunk)
        if chunk.text and self._message_index is None:
            self._message_index = self._take()
        self._call_indices.extend(self._take() for piece in chunk.tool_calls if piece.id)

    def _event(self, kind: str, **data: Any) -> bytes:
        event = sse({"type": kind, "sequence_number": self._sequence, **data}, event=kind)
        self._sequence += 1
        return event

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _message(self, status: str, *, content: bool = True) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [self._part(self.text)] if content else [],
        }

    def _function_call(self, index: int, status: str) -> dict[str, Any]:
        call: CalledTool = self.tool_calls[index]
        return {
            "id": self._call_id(index),
            "type": "function_call",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments if status == "completed" else "",
            "status": status,
        }

    def _settle_message(self) -> None:
        """Every response without calls has a message, empty if need be."""
        if self._message_index is None and not self.tool_calls:
            self._message_index = self._take()

    def _output(self, status: str) -> list[dict[str, Any]]:
        items: dict[int, dict[str, Any]] = {
            index: self._function_call(n, "completed") for n, index in enumerate(self._call_indices)
        }
        if self._message_index is not None:
            items[self._message_index] = self._message(status)
        return [items[index] for index in sorted(items)]

    def _usage(self, final: Final) -> dict[str, Any]:
        return {
            "input_tokens": final.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": final.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": final.total_tokens,
        }

    def _response(
        self,
        status: str,
        *,
        final: Final | None = None,
        output: list[dict[str, Any]] | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        incomplete = status == "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.request.model,
            "output": output or [],
            "previous_response_id": None,
            "store": False,
            "temperature": self.request.temperature,
            "top_p": self.request.top_p,
            "truncation": "disabled",
            "usage": self._usage(final) if final is not None else None,
            "metadata": {},
            **self.echo,
        }

    def _status(self, final: Final) -> str:
        return "incomplete" if final.finish_reason is FinishReason.LENGTH else "completed"

    def _place(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": self._message_index, "content_index": 0}

    def opening(self) -> list[bytes]:
        in_progress = self._response("in_progress")
        return [
            self._event("response.created", response=in_progress),
            self._event("response.in_progress", response=in_progress),
        ]

    def _announce_message(self) -> list[bytes]:
        if self._message_announced or self._message_index is None:
            return []
        self._message_announced = True
        return [
            self._event(
                "response.output_item.added",
                output_index=self._message_index,
                item=self._message("in_progress", content=False),
            ),
            self._event("response.content_part.added", **self._place(), part=self._part("")),
        ]

    def events(self, chunk: Chunk) -> list[bytes]:
        events = []
        if chunk.text:
            events += self._announce_message()
            events.append(
                self._event(
                    "response.output_text.delta", **self._place(), delta=chunk.text, logprobs=[]
                )
            )
        for piece in chunk.tool_calls:
            index = self._call_indices[piece.index]
            if piece.id:
                item = self._function_call(piece.index, "in_progress")
                events.append(
                    self._event("response.output_item.added", output_index=index, item=item)
                )
            else:
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self._call_id(piece.index),
                        output_index=index,
                        delta=piece.arguments,
                    )
                )
        return events

    def _close_message(self, status: str) -> list[bytes]:
        return [
            self._event("response.output_text.done", **self._place(), text=self.text, logprobs=[]),
            self._event("response.content_part.done", **self._place(), part=self._part(self.text)),
            self._event(
                "response.output_item.done",
                output_index=self._message_index,
                item=self._message(status),
            ),
        ]

    def _close_call(self, n: int) -> list[bytes]:
        index, item = self._call_indices[n], self._function_call(n, "completed")
        return [
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def closing(self, final: Final) -> list[bytes]:
        status = self._status(final)
        self._settle_message()
        events = self._announce_message()
        closes = {index: self._close_call(n) for n, index in enumerate(self._call_indices)}
        if self._message_index is not None:
            closes[self._message_index] = self._close_message(status)
        for index in sorted(closes):
            events += closes[index]
        output = self._output(status)
        events.append(
            self._event(
                f"response.{status}", response=self._response(status, final=final, output=output)
            )
        )
        return events

    def failure(self, error: ApiError) -> list[bytes]:
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        failed = self._response(
            "failed",
            output=[self._message("incomplete")],
            error={"code": code, "message": error.message},
        )
        return [
            self._event("error", code=error.code, message=error.message, param=error.param),
            self._event("response.failed", response=failed),
        ]

    def body(self, final: Final) -> dict[str, Any]:
        status = self._status(final)
        self._settle_message()
        return self._response(status, final=final, output=self._output(status))
