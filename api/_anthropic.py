"""Anthropic's Messages API (`POST /v1/messages`): request parsing and answers.

Apps written for Anthropic's SDKs change only their base URL. An answer is one `message`
holding one text block, its id `msg_…` carrying the engine's request id (receipts quote
it); a stream is Anthropic's event sequence: `message_start`, `content_block_start`,
`ping`, a `content_block_delta` per piece of text, `content_block_stop`, `message_delta`
(stop reason and usage) and `message_stop`. What the engine cannot honour (tools, images,
documents, thinking, output formats, continuing a final assistant message) is refused
with a 400 rather than ignored, since the answer would silently differ. `metadata` is
ignored. Errors take Anthropic's shape on their way out (`_anthropic_errors.py`).
"""

from __future__ import annotations

from typing import Any

from dbloom.inference import ChatMessage, Chunk, Final, FinishReason, GenerateRequest

from ._anthropic_errors import error_event
from ._call import Call
from ._errors import ApiError, invalid
from ._fields import Fields, Settings, build_request, reject_unsupported, text_content
from ._sse import sse

PART_TYPES = frozenset({"text"})
ROLES = ("user", "assistant")
STOP_FIELDS = ("stop_reason", "stop_sequence")
SWITCHES = (("thinking", "disabled"), ("tool_choice", "none"))
"""Objects accepted only when they switch their feature off (`{"type": "disabled"}`)."""


def _messages(fields: Fields) -> list[ChatMessage]:
    items = fields.array("messages")
    if not items:
        raise invalid("messages must be a non-empty array", param="messages")
    messages = []
    for index, item in enumerate(items):
        message = Fields(item, f"messages[{index}]")
        role = message.required_string("role")
        if role not in ROLES:
            raise invalid(
                f"{message.param('role')} must be 'user' or 'assistant', got {role[:32]!r}",
                param=message.param("role"),
            )
        content = text_content(message, "content", PART_TYPES)
        if content is None:
            raise invalid(f"{message.param('content')} is required", message.param("content"))
        messages.append(ChatMessage(role=role, content=content))
    if messages[-1].role == "assistant":
        raise invalid(
            "continuing a final assistant message is not supported: end with a user message",
            param=f"messages[{len(messages) - 1}].role",
            code="unsupported_parameter",
        )
    return messages


def _stop_sequences(fields: Fields) -> tuple[str, ...]:
    value = fields.array("stop_sequences") or []
    if not all(isinstance(s, str) for s in value):
        raise fields.wrong_type("stop_sequences", "an array of strings")
    return tuple(value)


def _settings(fields: Fields) -> Settings:
    """Anthropic's sampling fields. Stop sequences also ask for logprobs: their texts are
    how `MessagesCall` tells which sequence stopped the generation."""
    max_tokens = fields.integer("max_tokens")
    if max_tokens is None:
        raise invalid("max_tokens is required", param="max_tokens")
    settings: Settings = {"max_tokens": ("max_tokens", max_tokens)}
    for name in ("temperature", "top_p"):
        if (number := fields.number(name)) is not None:
            settings[name] = (name, number)
    if (top_k := fields.integer("top_k")) is not None:
        settings["top_k"] = ("top_k", top_k)
    if stops := _stop_sequences(fields):
        settings["stop"] = ("stop_sequences", stops)
        settings["logprobs"] = ("stop_sequences", True)
    return settings


def parse_messages(body: object, *, request_id: str) -> MessagesCall:
    """A `POST /v1/messages` body as a call; raises `ApiError` (400) if malformed."""
    fields = Fields(body)
    model = fields.required_string("model")
    reject_unsupported(fields, "tools", "mcp_servers", "container", "output_format")
    for name, off in SWITCHES:
        switch = fields.nested(name)
        if switch is None or switch.string("type") != off:
            reject_unsupported(fields, name)
    output = fields.nested("output_config")
    if output is not None:
        reject_unsupported(output, "format")
    messages = _messages(fields)
    system = text_content(fields, "system", PART_TYPES)
    if system:
        messages.insert(0, ChatMessage(role="system", content=system))
    request = build_request(
        model=model,
        request_id=request_id,
        settings=_settings(fields),
        messages=tuple(messages),
    )
    return MessagesCall(request, stream=bool(fields.boolean("stream")))


class MessagesCall(Call):
    """One message: a single text block, and the reason the generation stopped."""

    def __init__(self, request: GenerateRequest, *, stream: bool) -> None:
        super().__init__(request, stream=stream)
        self._token_texts: list[str] = []

    @property
    def id(self) -> str:
        """The message id, which embeds the engine request id."""
        return f"msg_{self.request_id}"

    def add(self, chunk: Chunk) -> None:
        super().add(chunk)
        self._token_texts.extend(logprob.text for logprob in chunk.logprobs or ())

    def _stop_sequence(self, final: Final) -> str | None:
        """The stop sequence that ended the generation, or None for the end of the turn.

        The engine says only `stop` for both, and never emits a stop sequence's text; but
        its tokens are sent, decoded alone in their logprobs. No stop sequence can occur
        earlier in what was decoded (generation would have ended there), so the first one
        found in the tokens' texts is the one that matched.
        """
        if final.finish_reason is not FinishReason.STOP or not self._token_texts:
            return None
        decoded = "".join(self._token_texts)
        found = [(decoded.find(s), s) for s in self.request.stop if s in decoded]
        return min(found)[1] if found else None

    def _usage(self, final: Final | None) -> dict[str, int]:
        """Usage so far: the prompt is counted only in the final, so a stream reports its
        input tokens in `message_delta` (whose counts replace those of `message_start`)."""
        return {
            "input_tokens": final.prompt_tokens if final is not None else 0,
            "output_tokens": self.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    def _stop(self, final: Final) -> dict[str, str | None]:
        if final.finish_reason is FinishReason.LENGTH:
            return {"stop_reason": "max_tokens", "stop_sequence": None}
        sequence = self._stop_sequence(final)
        reason = "end_turn" if sequence is None else "stop_sequence"
        return {"stop_reason": reason, "stop_sequence": sequence}

    def _message(self, content: list[dict[str, str]], final: Final | None) -> dict[str, Any]:
        stop = self._stop(final) if final is not None else dict.fromkeys(STOP_FIELDS)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": content,
            **stop,
            "usage": self._usage(final),
        }

    def _event(self, kind: str, **data: Any) -> bytes:
        return sse({"type": kind, **data}, event=kind)

    def opening(self) -> list[bytes]:
        return [
            self._event("message_start", message=self._message([], None)),
            self._event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            self._event("ping"),
        ]

    def events(self, chunk: Chunk) -> list[bytes]:
        if not chunk.text:
            return []
        delta = {"type": "text_delta", "text": chunk.text}
        return [self._event("content_block_delta", index=0, delta=delta)]

    def closing(self, final: Final) -> list[bytes]:
        return [
            self._event("content_block_stop", index=0),
            self._event("message_delta", delta=self._stop(final), usage=self._usage(final)),
            self._event("message_stop"),
        ]

    def failure(self, error: ApiError) -> list[bytes]:
        return [sse(error_event(error), event="error")]

    def body(self, final: Final) -> dict[str, Any]:
        return self._message([{"type": "text", "text": self.text}], final)
