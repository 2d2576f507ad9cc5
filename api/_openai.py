"""The Chat Completions and legacy Completions APIs: request parsing and answers.

Shapes follow OpenAI's API reference, so the official SDKs parse them into their own
types: ids `chatcmpl-…`/`cmpl-…` carry the engine's request id (receipts quote it), and
streams end with `[DONE]`, after an empty-choices usage chunk when `include_usage` asks.
"""

from __future__ import annotations

from typing import Any

from dbloom.inference import (
    ChatMessage,
    Chunk,
    Final,
    GenerateRequest,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
)

from ._call import Call
from ._errors import ApiError, invalid
from ._fields import (
    Features,
    Fields,
    Settings,
    build_request,
    chat_message,
    function_tool,
    function_tools,
    reject_unsupported,
    response_format,
    sampling,
    single_choice,
    text_content,
    tool_call,
    tool_features,
)
from ._sse import DONE, sse

CHAT_PART_TYPES = frozenset({"text"})
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default for the legacy endpoint; kept so ported code behaves alike."""


def _streaming(fields: Fields) -> tuple[bool, bool]:
    """`stream` and `stream_options.include_usage`."""
    options = fields.nested("stream_options")
    include_usage = options.boolean("include_usage") if options is not None else None
    return bool(fields.boolean("stream")), bool(include_usage)


def _token_bytes(text: str, raw: bytes) -> list[int]:
    """The token's exact bytes when the node sent them (they differ from its text's for
    part of a UTF-8 character), else its text's."""
    return list(raw or text.encode())


def chat_logprob(logprob: TokenLogprob) -> dict[str, Any]:
    """One token of `choices[].logprobs.content`, with its rivals when asked for."""
    top_bytes = logprob.top_bytes or (b"",) * len(logprob.top)
    return {
        "token": logprob.text,
        "logprob": logprob.logprob,
        "bytes": _token_bytes(logprob.text, logprob.token_bytes),
        "top_logprobs": [
            {"token": text, "logprob": value, "bytes": _token_bytes(text, raw)}
            for text, (_, value), raw in zip(logprob.top_text, logprob.top, top_bytes, strict=True)
        ],
    }


def _tool_calls(message: Fields) -> tuple[ToolCall, ...]:
    """An assistant turn's `tool_calls`, replayed: `{id, type: function, function}`."""
    calls = []
    for index, item in enumerate(message.array("tool_calls") or []):
        call = Fields(item, f"{message.param('tool_calls')}[{index}]")
        kind = call.string("type")
        if kind not in (None, "function"):
            raise invalid(
                f"tool calls of type {kind!r} are not supported",
                param=call.param("type"),
                code="unsupported_parameter",
            )
        function = call.nested("function")
        if function is None:
            raise invalid(f"{call.param('function')} is required", call.param("function"))
        calls.append(
            tool_call(
                function,
                call.required_string("id"),
                function.required_string("name"),
                function.string("arguments") or "",
            )
        )
    return tuple(calls)


def _chat_messages(fields: Fields) -> tuple[ChatMessage, ...]:
    items = fields.array("messages")
    if not items:
        raise invalid("messages must be a non-empty array", param="messages")
    messages = []
    for index, item in enumerate(items):
        message = Fields(item, f"messages[{index}]")
        role = message.required_string("role")
        reject_unsupported(message, "function_call", "audio")
        calls = _tool_calls(message) if role == "assistant" else ()
        if role != "assistant":
            reject_unsupported(message, "tool_calls")
        call_id = message.string("tool_call_id")
        if role == "tool" and call_id is None:
            raise invalid(
                f"{message.param('tool_call_id')} is required", message.param("tool_call_id")
            )
        content = text_content(message, "content", CHAT_PART_TYPES)
        if content is None:
            if role != "assistant":
                raise invalid(f"{message.param('content')} is required", message.param("content"))
            content = ""
        messages.append(
            chat_message(
                message,
                role,
                content,
                tool_calls=calls,
                tool_call_id=call_id if role == "tool" else None,
            )
        )
    return tuple(messages)


def _chat_tools(fields: Fields) -> Features:
    """`tools` (functions only), `tool_choice`, `parallel_tool_calls` and `response_format`."""
    tools: list[Tool] = []
    for tool in function_tools(fields):
        function = tool.nested("function")
        if function is None:
            raise invalid(f"{tool.param('function')} is required", tool.param("function"))
        tools.append(function_tool(function))
    features = tool_features(fields, tuple(tools), _named_function)
    spec = fields.nested("response_format")
    if spec is not None:
        kind = spec.required_string("type")
        features["response_format"] = response_format(spec, kind, spec.nested("json_schema"))
    return features


def _named_function(choice: Fields) -> str:
    """`{"type": "function", "function": {"name": ...}}`."""
    function = choice.nested("function")
    if choice.string("type") != "function" or function is None:
        raise invalid(
            'tool_choice must be none, auto, required or {"type": "function", "function": '
            '{"name": ...}}',
            param="tool_choice",
        )
    return function.required_string("name")


def _chat_logprobs(fields: Fields) -> Settings:
    logprobs = fields.boolean("logprobs")
    top = fields.integer("top_logprobs")
    settings: Settings = {}
    if top:
        if not logprobs:
            raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
        settings["top_logprobs"] = ("top_logprobs", top)
    if logprobs:
        settings["logprobs"] = ("logprobs", True)
    return settings


def parse_chat(body: object, *, request_id: str, default_max_tokens: int) -> ChatCall:
    """A `POST /v1/chat/completions` body as a call; raises `ApiError` (400) if malformed."""
    fields = Fields(body)
    model = fields.required_string("model")
    single_choice(fields)
    reject_unsupported(fields, "functions", "function_call", "audio", "prediction")
    features = _chat_tools(fields)
    messages = _chat_messages(fields)
    settings = sampling(fields, ("max_completion_tokens", "max_tokens"))
    settings.setdefault("max_tokens", ("max_completion_tokens", default_max_tokens))
    settings.update(_chat_logprobs(fields))
    stream, include_usage = _streaming(fields)
    request = build_request(
        model=model, request_id=request_id, settings=settings, messages=messages, features=features
    )
    return ChatCall(request, stream=stream, include_usage=include_usage)


def _prompt(fields: Fields) -> str:
    value = fields.raw("prompt")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise invalid(
            "prompt must be a string (or an array of exactly one string)",
            param="prompt",
            code="invalid_type",
        )
    if not value:
        raise invalid("prompt must not be empty", param="prompt")
    return value


def parse_completion(body: object, *, request_id: str) -> CompletionCall:
    """A `POST /v1/completions` body as a call; raises `ApiError` (400) if malformed."""
    fields = Fields(body)
    model = fields.required_string("model")
    single_choice(fields)
    reject_unsupported(fields, "echo", "suffix")
    best_of = fields.integer("best_of")
    if best_of is not None and best_of != 1:
        raise invalid("best_of must be 1", param="best_of")
    prompt = _prompt(fields)
    settings = sampling(fields, ("max_tokens",))
    settings.setdefault("max_tokens", ("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS))
    top = fields.integer("logprobs")
    if top is not None:
        settings["logprobs"] = ("logprobs", True)
        settings["top_logprobs"] = ("logprobs", top)
    stream, include_usage = _streaming(fields)
    request = build_request(model=model, request_id=request_id, settings=settings, prompt=prompt)
    return CompletionCall(request, stream=stream, include_usage=include_usage)


class _OpenAICall(Call):
    """What chat and completions share: the chunk envelope and the usage chunk."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, request: GenerateRequest, *, stream: bool, include_usage: bool) -> None:
        super().__init__(request, stream=stream)
        self.include_usage = include_usage

    @property
    def id(self) -> str:
        """The answer's id, which embeds the engine request id."""
        return self.id_prefix + self.request_id

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.request.model,
            "system_fingerprint": None,
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        data = self._envelope(self.chunk_object_name) | {"choices": choices}
        if self.include_usage:
            data["usage"] = usage
        return sse(data)

    def _usage_chunk(self, final: Final | None) -> list[bytes]:
        return [self._chunk([], self.usage(final))] if self.include_usage else []

    def failure(self, error: ApiError) -> list[bytes]:
        return [*self._usage_chunk(None), sse(error.body())]


def _tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """One streamed `delta.tool_calls` entry: the first of a call names it, later ones
    carry argument text only, as OpenAI streams them."""
    if piece.id:
        return {
            "index": piece.index,
            "id": piece.id,
            "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments},
        }
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


class ChatCall(_OpenAICall):
    """A chat completion: message deltas, per-token logprobs in `logprobs.content`."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, request: GenerateRequest, *, stream: bool, include_usage: bool) -> None:
        super().__init__(request, stream=stream, include_usage=include_usage)
        self._logprobs: list[dict[str, Any]] = []

    def add(self, chunk: Chunk) -> None:
        super().add(chunk)
        self._logprobs.extend(chat_logprob(lp) for lp in chunk.logprobs or ())

    def _choice(
        self, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None, finish: str | None
    ) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish,
        }

    def opening(self) -> list[bytes]:
        return [self._chunk([self._choice({"role": "assistant", "content": ""}, None, None)])]

    def events(self, chunk: Chunk) -> list[bytes]:
        events = [
            self._chunk([self._choice({"tool_calls": [_tool_call_delta(piece)]}, None, None)])
            for piece in chunk.tool_calls
        ]
        if not chunk.text and not chunk.logprobs:
            return events
        tail = len(chunk.logprobs) if chunk.logprobs else 0
        logprobs = self._logprobs[len(self._logprobs) - tail :] if tail else None
        return [self._chunk([self._choice({"content": chunk.text}, logprobs, None)]), *events]

    def closing(self, final: Final) -> list[bytes]:
        finish = self._choice({}, None, final.finish_reason.value)
        return [self._chunk([finish]), *self._usage_chunk(final), DONE]

    def body(self, final: Final) -> dict[str, Any]:
        logprobs = {"content": self._logprobs, "refusal": None} if self.request.logprobs else None
        message: dict[str, Any] = {
            "role": "assistant",
            "content": self.text if self.text or not self.tool_calls else None,
            "refusal": None,
            "annotations": [],
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in self.tool_calls
            ]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": final.finish_reason.value,
        }
        return self._envelope(self.object_name) | {
            "choices": [choice],
            "usage": self.usage(final),
        }


class CompletionCall(_OpenAICall):
    """A legacy text completion: text deltas, logprobs as four parallel lists.

    `text_offset` counts characters from the start of the completion (there is no echo).
    """

    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, request: GenerateRequest, *, stream: bool, include_usage: bool) -> None:
        super().__init__(request, stream=stream, include_usage=include_usage)
        self._tokens: list[str] = []
        self._token_logprobs: list[float] = []
        self._top: list[dict[str, float]] = []
        self._offsets: list[int] = []
        self._offset = 0

    def add(self, chunk: Chunk) -> None:
        super().add(chunk)
        for lp in chunk.logprobs or ():
            self._tokens.append(lp.text)
            self._token_logprobs.append(lp.logprob)
            # Reversed so that of two rivals decoding to the same text the likelier stays.
            pairs = zip(reversed(lp.top_text), reversed(lp.top), strict=True)
            self._top.append({text: value for text, (_, value) in pairs})
            self._offsets.append(self._offset)
            self._offset += len(lp.text)

    def _logprobs(self, start: int) -> dict[str, Any]:
        return {
            "tokens": self._tokens[start:],
            "token_logprobs": self._token_logprobs[start:],
            "top_logprobs": self._top[start:],
            "text_offset": self._offsets[start:],
        }

    def _choice(
        self, text: str, logprobs: dict[str, Any] | None, finish: str | None
    ) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}

    def opening(self) -> list[bytes]:
        return []

    def events(self, chunk: Chunk) -> list[bytes]:
        if not chunk.text and not chunk.logprobs:
            return []
        tail = len(chunk.logprobs) if chunk.logprobs else 0
        logprobs = self._logprobs(len(self._tokens) - tail) if tail else None
        return [self._chunk([self._choice(chunk.text, logprobs, None)])]

    def closing(self, final: Final) -> list[bytes]:
        finish = self._choice("", None, final.finish_reason.value)
        return [self._chunk([finish]), *self._usage_chunk(final), DONE]

    def body(self, final: Final) -> dict[str, Any]:
        logprobs = self._logprobs(0) if self.request.logprobs else None
        choice = self._choice(self.text, logprobs, final.finish_reason.value)
        return self._envelope(self.object_name) | {
            "choices": [choice],
            "usage": self.usage(final),
        }
