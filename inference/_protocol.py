"""The `/dbloom/infer/1.0.0` wire format and its two sans-IO endpoints.

One stream carries one request. Frames are a 4-byte big-endian unsigned length followed
by that many bytes of one msgpack map (a fixed header makes the size cap a single
comparison, before any payload is buffered). Every map has `v` (version, 1) and `t`
(kind). The client sends one `req`; the node answers with `chunk`* and then exactly one
`final` or `error`, then closes. The client keeps its write side open until it has the
final: EOF from the client before that means "cancel".

Decoding is strict: unknown keys, missing keys, wrong types, out-of-range values and
oversized frames all raise `DecodeError`, and nothing else.

`InferServer` and `InferClient` follow h11: `receive_data(bytes)` (`b""` is EOF),
`next_event()` returns a message or `NEED_DATA`, `send(...) -> bytes`. No I/O, no trio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import msgpack

from dbloom.p2p import DecodeError as WireDecodeError
from dbloom.p2p import ErrorCode as WireErrorCode
from dbloom.p2p import LocalProtocolError as WireLocalProtocolError

from ._errors import EngineError, ErrorCode
from ._events import MAX_ARGUMENTS_PIECE, Chunk, Final, FinishReason, TokenLogprob, ToolCallDelta
from ._request import (
    MAX_ID_LENGTH,
    MAX_TOKEN_ID,
    MAX_TOOL_CALLS,
    TOOL_NAME,
    ChatMessage,
    GenerateRequest,
    ResponseFormat,
    Tool,
    ToolCall,
)

PROTOCOL_ID = "/dbloom/infer/1.0.0"
VERSION = 1
HEADER_SIZE = 4
DEFAULT_MAX_REQUEST = 4 << 20
DEFAULT_MAX_CHUNK = 64 << 10
MAX_CHUNK_TOKENS = 4096
MAX_ERROR_MESSAGE = 4096
MAX_RECEIPT = 16 << 10
MAX_COUNT = (1 << 32) - 1
MAX_TOKEN_TEXT = 256
MAX_TOKEN_BYTES = 1024
MAX_CHUNK_TOOL_CALLS = 16

_FINISH_REASONS = frozenset(f.value for f in FinishReason)
_ERROR_CODES = frozenset(c.value for c in ErrorCode)
_REQUEST_FIELDS = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "id",
    "account",
    "salt",
    "tools",
    "tool_choice",
    "tool_name",
    "parallel_tool_calls",
    "format",
}
_MESSAGE_FIELDS = frozenset({"tool_calls", "tool_call_id"})


class DecodeError(WireDecodeError):
    """Bytes from the peer that are not a valid message; `reply` is the Error code to answer.

    It is a `dbloom.p2p.DecodeError`, so shells treat it like any other bad remote input.
    """

    def __init__(
        self, message: str, reply: ErrorCode = ErrorCode.PROTOCOL, *, limit: bool = False
    ) -> None:
        super().__init__(message, WireErrorCode.LIMIT if limit else WireErrorCode.PROTOCOL)
        self.reply = reply


class LocalProtocolError(WireLocalProtocolError):
    """This side tried to send something the protocol does not allow (a bug)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorMessage:
    """The node's refusal or failure, ending the stream; rebuilt client-side as an EngineError."""

    code: ErrorCode
    message: str

    @classmethod
    def from_error(cls, error: EngineError) -> ErrorMessage:
        """The frame for a typed engine error, with its message cut to the cap."""
        return cls(code=error.code, message=error.message[:MAX_ERROR_MESSAGE])


Message = GenerateRequest | Chunk | Final | ErrorMessage


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""`next_event()` needs more bytes before it can return a message."""
CLIENT_CLOSED = _Sentinel("CLIENT_CLOSED")
"""The client closed its side: before a request, it gave up; after, it cancels."""


# ---- encoding -------------------------------------------------------------------------


def _chat_message_map(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [[c.id, c.name, c.arguments] for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _request_map(r: GenerateRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"v": VERSION, "t": "req", "model": r.model}
    if r.prompt is not None:
        out["prompt"] = r.prompt
    if r.messages is not None:
        out["messages"] = [_chat_message_map(m) for m in r.messages]
    out.update(
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        min_p=r.min_p,
        stop=list(r.stop),
        presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty,
        repetition_penalty=r.repetition_penalty,
        logit_bias=dict(r.logit_bias),
        logprobs=r.logprobs,
        top_logprobs=r.top_logprobs,
    )
    if r.seed is not None:
        out["seed"] = r.seed
    if r.request_id is not None:
        out["id"] = r.request_id
    if r.account is not None:
        out["account"] = r.account
    if r.salt is not None:
        out["salt"] = r.salt
    if r.tools:
        out["tools"] = [[t.name, t.description, t.parameters] for t in r.tools]
    if r.tool_choice != "auto":
        out["tool_choice"] = r.tool_choice
    if r.tool_name is not None:
        out["tool_name"] = r.tool_name
    if not r.parallel_tool_calls:
        out["parallel_tool_calls"] = False
    if r.response_format is not None:
        out["format"] = {"type": r.response_format.kind}
        if r.response_format.schema is not None:
            out["format"]["schema"] = r.response_format.schema
    return out


def _message_map(message: Message) -> dict[str, Any]:
    if isinstance(message, GenerateRequest):
        return _request_map(message)
    if isinstance(message, Chunk):
        out: dict[str, Any] = {
            "v": VERSION,
            "t": "chunk",
            "text": message.text,
            "tokens": list(message.token_ids),
        }
        if message.logprobs is not None:
            out["logprobs"] = [
                [
                    lp.token,
                    lp.logprob,
                    [list(pair) for pair in lp.top],
                    lp.text,
                    list(lp.top_text),
                    lp.token_bytes,
                    list(lp.top_bytes),
                ]
                for lp in message.logprobs
            ]
        if message.tool_calls:
            out["tool_calls"] = [[d.index, d.id, d.name, d.arguments] for d in message.tool_calls]
        return out
    if isinstance(message, Final):
        out = {
            "v": VERSION,
            "t": "final",
            "id": message.request_id,
            "finish": message.finish_reason.value,
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens,
        }
        if message.receipt is not None:
            out["receipt"] = message.receipt
        return out
    if isinstance(message, ErrorMessage):
        return {"v": VERSION, "t": "error", "code": message.code.value, "message": message.message}
    raise LocalProtocolError(f"not a protocol message: {type(message).__name__}")


def encode_message(message: Message, *, max_size: int) -> bytes:
    """One length-prefixed frame; `LocalProtocolError` if it would exceed `max_size`."""
    payload: bytes = msgpack.packb(_message_map(message), use_bin_type=True)
    if len(payload) > max_size:
        raise LocalProtocolError(
            f"{type(message).__name__} of {len(payload)} bytes exceeds {max_size}"
        )
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


# ---- decoding -------------------------------------------------------------------------


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def _int(m: dict[str, Any], key: str, low: int, high: int) -> int:
    value = m[key]
    if type(value) is not int or not low <= value <= high:
        raise DecodeError(f"{key} must be an integer in [{low}, {high}]")
    return value


def _str(m: dict[str, Any], key: str, max_len: int) -> str:
    value = m[key]
    if type(value) is not str or len(value) > max_len:
        raise DecodeError(f"{key} must be a string of at most {max_len} characters")
    return value


def _number(value: Any, what: str) -> float:
    if type(value) not in (int, float) or math.isnan(value):
        raise DecodeError(f"{what} must be a number")
    return float(value)


def _keys(m: dict[str, Any], required: set[str], optional: Set[str] = frozenset()) -> None:
    keys = set(m)
    missing = required - keys
    if missing:
        raise DecodeError(f"missing fields: {sorted(missing)}")
    unknown = keys - required - optional
    if unknown:
        raise DecodeError(f"unknown fields: {sorted(map(str, unknown))}")


def _rows(value: Any, width: int, what: str) -> list[list[Any]]:
    """An array of fixed-width arrays (the compact form of lists of records)."""
    if not isinstance(value, list) or not all(
        isinstance(row, list) and len(row) == width for row in value
    ):
        raise DecodeError(f"{what} must be an array of {width}-element arrays")
    return value


def _decode_message(item: Any) -> ChatMessage:
    if not isinstance(item, dict) or not {"role", "content"} <= set(item) <= (
        {"role", "content"} | _MESSAGE_FIELDS
    ):
        raise DecodeError("each message must be a map of role and content (and tool fields)")
    calls = _rows(item.get("tool_calls", []), 3, "tool_calls")
    return ChatMessage(
        role=item["role"],
        content=item["content"],
        tool_calls=tuple(ToolCall(id=i, name=n, arguments=a) for i, n, a in calls),
        tool_call_id=item.get("tool_call_id"),
    )


def _decode_format(value: Any) -> ResponseFormat:
    if not isinstance(value, dict) or not {"type"} <= set(value) <= {"type", "schema"}:
        raise DecodeError("format must be a map of type and, for a schema, schema")
    return ResponseFormat(kind=value["type"], schema=value.get("schema"))


def _decode_request(m: dict[str, Any]) -> GenerateRequest:
    """Shapes are checked here (`DecodeError`); values by the request's own validation,
    whose `InvalidRequest` becomes a `DecodeError` answered with `invalid_request`."""
    _keys(m, {"v", "t", "model"}, _REQUEST_FIELDS)
    nested = {"v", "t", "id", "messages", "stop", "logit_bias", "tools", "format"}
    fields = {k: v for k, v in m.items() if k not in nested}
    if "id" in m:
        fields["request_id"] = m["id"]
    if "messages" in m and not isinstance(m["messages"], list):
        raise DecodeError("messages must be an array", ErrorCode.INVALID_REQUEST)
    if "stop" in m:
        if not isinstance(m["stop"], list):
            raise DecodeError("stop must be an array", ErrorCode.INVALID_REQUEST)
        fields["stop"] = tuple(m["stop"])
    if "logit_bias" in m:
        if not isinstance(m["logit_bias"], dict):
            raise DecodeError("logit_bias must be a map", ErrorCode.INVALID_REQUEST)
        fields["logit_bias"] = tuple(m["logit_bias"].items())
    try:
        if "messages" in m:
            fields["messages"] = tuple(_decode_message(item) for item in m["messages"])
        if "tools" in m:
            fields["tools"] = tuple(
                Tool(name=name, description=description, parameters=parameters)
                for name, description, parameters in _rows(m["tools"], 3, "tools")
            )
        if "format" in m:
            fields["response_format"] = _decode_format(m["format"])
        return GenerateRequest(**fields)
    except EngineError as exc:
        raise DecodeError(exc.message, ErrorCode.INVALID_REQUEST) from None


def _decode_logprobs(raw: Any, n_tokens: int) -> tuple[TokenLogprob, ...]:
    if not isinstance(raw, list) or len(raw) != n_tokens:
        raise DecodeError("logprobs must have one entry per token")
    out = []
    for entry in raw:
        if (
            not isinstance(entry, list)
            or len(entry) not in (5, 7)
            or not isinstance(entry[2], list)
        ):
            raise DecodeError(
                "a logprob entry is [token, logprob, top, text, top_text(, bytes, top_bytes)]"
            )
        token, logprob, top_raw, text, top_text = entry[:5]
        token_bytes, top_bytes = (entry[5], entry[6]) if len(entry) == 7 else (b"", [])
        if (
            type(token_bytes) is not bytes
            or len(token_bytes) > MAX_TOKEN_BYTES
            or not isinstance(top_bytes, list)
            or len(top_bytes) not in (0, len(top_raw))
            or not all(type(b) is bytes and len(b) <= MAX_TOKEN_BYTES for b in top_bytes)
        ):
            raise DecodeError("bad token bytes in logprobs")
        if type(token) is not int or not 0 <= token <= MAX_TOKEN_ID or len(top_raw) > 64:
            raise DecodeError("bad logprob entry")
        if (
            not isinstance(text, str)
            or len(text) > MAX_TOKEN_TEXT
            or not isinstance(top_text, list)
            or len(top_text) not in (0, len(top_raw))
            or not all(isinstance(t, str) and len(t) <= MAX_TOKEN_TEXT for t in top_text)
        ):
            raise DecodeError("bad token text in logprobs")
        top = []
        for pair in top_raw:
            if not isinstance(pair, list) or len(pair) != 2:
                raise DecodeError("a top logprob is [token, logprob]")
            if type(pair[0]) is not int or not 0 <= pair[0] <= MAX_TOKEN_ID:
                raise DecodeError("bad token id in top logprobs")
            top.append((pair[0], _number(pair[1], "logprob")))
        out.append(
            TokenLogprob(
                token=token,
                logprob=_number(logprob, "logprob"),
                top=tuple(top),
                text=text,
                top_text=tuple(top_text),
                token_bytes=token_bytes,
                top_bytes=tuple(top_bytes),
            )
        )
    return tuple(out)


def _decode_tool_calls(raw: Any) -> tuple[ToolCallDelta, ...]:
    rows = _rows(raw, 4, "tool_calls")
    if len(rows) > MAX_CHUNK_TOOL_CALLS:
        raise DecodeError(f"a chunk holds at most {MAX_CHUNK_TOOL_CALLS} tool call pieces")
    out = []
    for index, call_id, name, arguments in rows:
        if type(index) is not int or not 0 <= index < MAX_TOOL_CALLS:
            raise DecodeError(f"a tool call index must be in [0, {MAX_TOOL_CALLS})")
        if type(call_id) is not str or len(call_id) > MAX_ID_LENGTH:
            raise DecodeError("bad tool call id")
        if type(name) is not str or (name and TOOL_NAME.fullmatch(name) is None):
            raise DecodeError("bad tool call name")
        if type(arguments) is not str or len(arguments) > MAX_ARGUMENTS_PIECE:
            raise DecodeError(f"tool call arguments come in pieces of {MAX_ARGUMENTS_PIECE}")
        out.append(ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments))
    return tuple(out)


def _decode_chunk(m: dict[str, Any]) -> Chunk:
    _keys(m, {"v", "t", "text", "tokens"}, {"logprobs", "tool_calls"})
    text = _str(m, "text", DEFAULT_MAX_CHUNK)
    tokens = m["tokens"]
    if not isinstance(tokens, list) or len(tokens) > MAX_CHUNK_TOKENS:
        raise DecodeError("tokens must be an array")
    if any(type(t) is not int or not 0 <= t <= MAX_TOKEN_ID for t in tokens):
        raise DecodeError("tokens must be token ids")
    logprobs = _decode_logprobs(m["logprobs"], len(tokens)) if "logprobs" in m else None
    calls = _decode_tool_calls(m["tool_calls"]) if "tool_calls" in m else ()
    return Chunk(text=text, token_ids=tuple(tokens), logprobs=logprobs, tool_calls=calls)


def _decode_final(m: dict[str, Any]) -> Final:
    _keys(m, {"v", "t", "id", "finish", "prompt_tokens", "completion_tokens"}, {"receipt"})
    request_id = _str(m, "id", MAX_ID_LENGTH)
    finish = m["finish"]
    if type(finish) is not str or finish not in _FINISH_REASONS:
        raise DecodeError(f"finish must be one of {sorted(_FINISH_REASONS)}")
    receipt = m.get("receipt")
    if receipt is not None and (type(receipt) is not bytes or len(receipt) > MAX_RECEIPT):
        raise DecodeError(f"receipt must be at most {MAX_RECEIPT} bytes")
    return Final(
        request_id=request_id,
        finish_reason=FinishReason(finish),
        prompt_tokens=_int(m, "prompt_tokens", 0, MAX_COUNT),
        completion_tokens=_int(m, "completion_tokens", 0, MAX_COUNT),
        receipt=receipt,
    )


def _decode_error(m: dict[str, Any]) -> ErrorMessage:
    _keys(m, {"v", "t", "code", "message"})
    code = m["code"]
    if type(code) is not str or code not in _ERROR_CODES:
        raise DecodeError("unknown error code")
    return ErrorMessage(code=ErrorCode(code), message=_str(m, "message", MAX_ERROR_MESSAGE))


_DECODERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "req": _decode_request,
    "chunk": _decode_chunk,
    "final": _decode_final,
    "error": _decode_error,
}


def decode_payload(payload: bytes) -> Message:
    """Strictly decode one frame's payload (without its length prefix)."""
    try:
        m = msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_no_ext)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"not a msgpack value: {type(exc).__name__}") from None
    if not isinstance(m, dict):
        raise DecodeError("a message must be a map")
    if not all(type(k) is str for k in m):
        raise DecodeError("message keys must be strings")
    if "v" not in m or type(m["v"]) is not int:
        raise DecodeError("missing version field v")
    if m["v"] != VERSION:
        raise DecodeError(f"unsupported version {m['v']}")
    kind = m.get("t")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise DecodeError("unknown message type t")
    return decoder(m)


class _Frames:
    """Length-prefixed frame splitter with a size cap and EOF tracking."""

    __slots__ = ("_buf", "eof", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self.eof = False
        self.max_size = max_size

    def receive_data(self, data: bytes | bytearray) -> None:
        if self.eof and data:
            raise LocalProtocolError("data received after EOF")
        if data:
            self._buf += data
        else:
            self.eof = True

    def next_frame(self) -> bytes | None:
        if len(self._buf) < HEADER_SIZE:
            if self.eof and self._buf:
                raise DecodeError("stream ended inside a frame header")
            return None
        size = int.from_bytes(self._buf[:HEADER_SIZE], "big")
        if size > self.max_size:
            raise DecodeError(
                f"frame of {size} bytes exceeds the limit of {self.max_size}", limit=True
            )
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            if self.eof:
                raise DecodeError("stream ended inside a frame")
            return None
        frame = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return frame

    @property
    def buffered(self) -> int:
        return len(self._buf)


class InferServer:
    """Node side of one `/dbloom/infer` stream: read one request, send the response."""

    def __init__(
        self,
        *,
        max_request_size: int = DEFAULT_MAX_REQUEST,
        max_chunk_size: int = DEFAULT_MAX_CHUNK,
    ) -> None:
        self._frames = _Frames(max_request_size)
        self._max_chunk = max_chunk_size
        self._request: GenerateRequest | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        """A final or error has been sent; nothing more may be sent."""
        return self._finished

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes from the client; `b""` means the client closed its side."""
        self._frames.receive_data(data)

    def next_event(self) -> GenerateRequest | _Sentinel:
        """The request, `CLIENT_CLOSED`, or `NEED_DATA`; raises `DecodeError`."""
        if self._request is not None:
            if self._frames.buffered:
                raise DecodeError("the client sent data after its request")
            return CLIENT_CLOSED if self._frames.eof else NEED_DATA
        if self._frames.eof and not self._frames.buffered:
            return CLIENT_CLOSED
        frame = self._frames.next_frame()
        if frame is None:
            return NEED_DATA
        message = decode_payload(frame)
        if not isinstance(message, GenerateRequest):
            raise DecodeError("expected a request")
        self._request = message
        return message

    def send(self, message: Chunk | Final | ErrorMessage) -> bytes:
        """Bytes for the next response frame; errors may be sent at any time before the end."""
        if self._finished:
            raise LocalProtocolError("the response is already complete")
        if not isinstance(message, ErrorMessage) and self._request is None:
            raise LocalProtocolError("no request to answer yet")
        if not isinstance(message, Chunk | Final | ErrorMessage):
            raise LocalProtocolError(f"a node cannot send {type(message).__name__}")
        data = encode_message(message, max_size=self._max_chunk)
        if not isinstance(message, Chunk):
            self._finished = True
        return data


class InferClient:
    """Client side of one `/dbloom/infer` stream: send a request, read chunks and the end."""

    def __init__(
        self,
        *,
        max_request_size: int = DEFAULT_MAX_REQUEST,
        max_chunk_size: int = DEFAULT_MAX_CHUNK,
    ) -> None:
        self._frames = _Frames(max_chunk_size)
        self._max_request = max_request_size
        self._sent = False
        self._finished = False

    @property
    def finished(self) -> bool:
        """The final or error has arrived."""
        return self._finished

    def send_request(self, request: GenerateRequest) -> bytes:
        """The request frame; only one per stream."""
        if self._sent:
            raise LocalProtocolError("one request per stream")
        self._sent = True
        return encode_message(request, max_size=self._max_request)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes from the node; `b""` means the node closed its side."""
        self._frames.receive_data(data)

    def next_event(self) -> Chunk | Final | ErrorMessage | _Sentinel:
        """The next chunk, the final or an error, or `NEED_DATA`; raises `DecodeError`."""
        if not self._sent:
            raise LocalProtocolError("send the request first")
        if self._finished:
            if self._frames.buffered:
                raise DecodeError("the node sent data after the end of the response")
            return NEED_DATA
        frame = self._frames.next_frame()
        if frame is None:
            if self._frames.eof:
                raise DecodeError("the node closed the stream before the final")
            return NEED_DATA
        message = decode_payload(frame)
        if isinstance(message, GenerateRequest):
            raise DecodeError("a node cannot send a request")
        if not isinstance(message, Chunk):
            self._finished = True
        return message
