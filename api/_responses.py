"""The Responses API (`POST /v1/responses`): text in, one assistant message out.

Nothing is stored (`store` is always false), so `previous_response_id` and
conversations are refused. A stream is the event sequence OpenAI sends for one text
message, each event with its `sequence_number`; a generation cut by
`max_output_tokens` ends `incomplete`, as OpenAI's does.
"""

from __future__ import annotations

from typing import Any

from dbloom.inference import ChatMessage, Chunk, Final, FinishReason, GenerateRequest

from ._call import Call
from ._errors import ApiError, invalid
from ._fields import Fields, build_request, chat_message, reject_unsupported, sampling, text_content
from ._sse import sse

PART_TYPES = frozenset({"input_text", "output_text"})
"""Text parts: `input_text` in user turns, `output_text` in replayed assistant turns."""


def _input_messages(fields: Fields) -> list[ChatMessage]:
    value = fields.raw("input")
    if isinstance(value, str):
        if not value:
            raise invalid("input must not be empty", param="input")
        return [ChatMessage(role="user", content=value)]
    items = fields.array("input")
    if not items:
        raise invalid("input must be a string or a non-empty array of messages", param="input")
    messages = []
    for index, item in enumerate(items):
        message = Fields(item, f"input[{index}]")
        kind = message.string("type")
        if kind not in (None, "message"):
            raise invalid(
                f"input items of type {kind!r} are not supported; send messages",
                param=message.param("type"),
                code="unsupported_content",
            )
        role = message.required_string("role")
        content = text_content(message, "content", PART_TYPES)
        if content is None:
            raise invalid(f"{message.param('content')} is required", message.param("content"))
        messages.append(chat_message(message, role, content))
    return messages


def _plain_text_format(fields: Fields) -> None:
    """Refuse structured output: the engine cannot constrain what it generates."""
    text = fields.nested("text")
    text_format = text.nested("format") if text is not None else None
    if text_format is not None and text_format.string("type") not in (None, "text"):
        raise invalid(
            "only text responses are supported",
            param="text.format",
            code="unsupported_parameter",
        )


def parse_response(body: object, *, request_id: str, default_max_tokens: int) -> ResponseCall:
    """A `POST /v1/responses` body as a call; raises `ApiError` (400) if malformed."""
    fields = Fields(body)
    model = fields.required_string("model")
    reject_unsupported(
        fields, "tools", "previous_response_id", "conversation", "prompt", "background"
    )
    _plain_text_format(fields)
    instructions = fields.string("instructions")
    messages = _input_messages(fields)
    if instructions:
        messages.insert(0, ChatMessage(role="system", content=instructions))
    settings = sampling(fields, ("max_output_tokens",))
    settings.setdefault("max_tokens", ("max_output_tokens", default_max_tokens))
    request = build_request(
        model=model, request_id=request_id, settings=settings, messages=tuple(messages)
    )
    return ResponseCall(
        request,
        stream=bool(fields.boolean("stream")),
        instructions=instructions,
        max_output_tokens=fields.integer("max_output_tokens"),
    )


class ResponseCall(Call):
    """One response: a single assistant message holding a single `output_text` part."""

    def __init__(
        self,
        request: GenerateRequest,
        *,
        stream: bool,
        instructions: str | None,
        max_output_tokens: int | None,
    ) -> None:
        super().__init__(request, stream=stream)
        self.instructions = instructions
        self.max_output_tokens = max_output_tokens
        self._sequence = 0

    @property
    def id(self) -> str:
        """The response id, which embeds the engine request id."""
        return f"resp_{self.request_id}"

    @property
    def message_id(self) -> str:
        """The id of the one output message."""
        return f"msg_{self.request_id}"

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
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "store": False,
            "temperature": self.request.temperature,
            "top_p": self.request.top_p,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "usage": self._usage(final) if final is not None else None,
            "metadata": {},
        }

    def _status(self, final: Final) -> str:
        return "incomplete" if final.finish_reason is FinishReason.LENGTH else "completed"

    def _place(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[bytes]:
        in_progress = self._response("in_progress")
        return [
            self._event("response.created", response=in_progress),
            self._event("response.in_progress", response=in_progress),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=self._message("in_progress", content=False),
            ),
            self._event("response.content_part.added", **self._place(), part=self._part("")),
        ]

    def events(self, chunk: Chunk) -> list[bytes]:
        if not chunk.text:
            return []
        return [
            self._event(
                "response.output_text.delta", **self._place(), delta=chunk.text, logprobs=[]
            )
        ]

    def closing(self, final: Final) -> list[bytes]:
        status = self._status(final)
        message = self._message(status)
        return [
            self._event("response.output_text.done", **self._place(), text=self.text, logprobs=[]),
            self._event("response.content_part.done", **self._place(), part=self._part(self.text)),
            self._event("response.output_item.done", output_index=0, item=message),
            self._event(
                f"response.{status}",
                response=self._response(status, final=final, output=[message]),
            ),
        ]

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
        return self._response(status, final=final, output=[self._message(status)])
