"""The `/dbloom/infer` wire format and its sans-IO endpoints (no model, no trio)."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbloom.inference import (
    CLIENT_CLOSED,
    DEFAULT_MAX_CHUNK,
    NEED_DATA,
    ChatMessage,
    Chunk,
    DecodeError,
    ErrorCode,
    ErrorMessage,
    Final,
    FinishReason,
    GenerateRequest,
    InferClient,
    InferServer,
    LocalProtocolError,
    TokenLogprob,
    decode_payload,
    encode_message,
)

REQUEST = GenerateRequest(
    model="tiny",
    messages=(
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="hi"),
    ),
    max_tokens=12,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    seed=7,
    stop=("\n\n", "END"),
    presence_penalty=0.5,
    frequency_penalty=-0.5,
    repetition_penalty=1.1,
    logit_bias={3: -100, 9: 2.5},
    logprobs=True,
    top_logprobs=2,
    request_id="req-1",
)
CHUNK = Chunk(
    text="héllo",
    token_ids=(5, 6),
    logprobs=(
        TokenLogprob(
            token=5, logprob=-0.25, top=((5, -0.25), (7, -1.5)), text="a", top_text=("a", "é")
        ),
        TokenLogprob(token=6, logprob=-2.0, top=((1, -0.5), (6, -2.0)), text="b"),
    ),
)
FINAL = Final(
    request_id="req-1",
    finish_reason=FinishReason.LENGTH,
    prompt_tokens=10,
    completion_tokens=12,
    receipt=b"\x00sig",
)
ERROR = ErrorMessage(code=ErrorCode.BUSY, message="full")
MESSAGES = [
    REQUEST,
    GenerateRequest(model="m", prompt="plain"),
    CHUNK,
    Chunk(text="", token_ids=()),
    FINAL,
    Final(request_id="x", finish_reason=FinishReason.STOP, prompt_tokens=0, completion_tokens=0),
    ERROR,
]
BIG = 1 << 22


def frame(m: dict[Any, Any]) -> bytes:
    payload = msgpack.packb(m, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Any) -> None:
    data = encode_message(message, max_size=BIG)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode_payload(data[4:]) == message


def payload_of(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = msgpack.unpackb(
        encode_message(message, max_size=BIG)[4:], strict_map_key=False
    )
    return data


@pytest.mark.parametrize(
    ("base", "change", "match"),
    [
        (CHUNK, {"extra": 1}, "unknown fields"),
        (CHUNK, {"v": 2}, "version"),
        (CHUNK, {"v": True}, "version"),
        (CHUNK, {"t": "chunky"}, "type"),
        (CHUNK, {"t": 3}, "type"),
        (CHUNK, {"text": b"bytes"}, "text"),
        (CHUNK, {"tokens": [1, True]}, "token"),
        (CHUNK, {"tokens": [-1]}, "token"),
        (CHUNK, {"logprobs": [[5, -1.0, [], "a", []]]}, "one entry per token"),
        (CHUNK, {"logprobs": [[5, "x", [], "", []], [6, 0.0, [], "", []]]}, "number"),
        (CHUNK, {"logprobs": [[5, float("nan"), [], "", []], [6, 0.0, [], "", []]]}, "number"),
        (CHUNK, {"logprobs": [[5, -1.0, []], [6, 0.0, []]]}, "top_text"),
        (CHUNK, {"logprobs": [[5, -1.0, [], 7, []], [6, 0.0, [], "", []]]}, "token text"),
        (
            CHUNK,
            {"logprobs": [[5, -1.0, [[1, 0.0]], "", ["a", "b"]], [6, 0.0, [], "", []]]},
            "token text",
        ),
        (FINAL, {"finish": "done"}, "finish"),
        (FINAL, {"prompt_tokens": -1}, "prompt_tokens"),
        (FINAL, {"completion_tokens": 1.0}, "completion_tokens"),
        (FINAL, {"receipt": "text"}, "receipt"),
        (FINAL, {"id": 5}, "id"),
        (ERROR, {"code": "teapot"}, "code"),
        (ERROR, {"message": None}, "message"),
        (REQUEST, {"max_tokens": -3}, "max_tokens"),
        (REQUEST, {"temperature": "warm"}, "temperature"),
        (REQUEST, {"messages": [{"role": "user"}]}, "message"),
        (REQUEST, {"messages": "hi"}, "messages"),
        (REQUEST, {"stop": "x"}, "stop"),
        (REQUEST, {"logit_bias": [1, 2]}, "logit_bias"),
        (REQUEST, {"logit_bias": {"1": 2}}, "logit_bias"),
        (REQUEST, {"prompt": "both"}, "exactly one"),
        (REQUEST, {"seed": "x"}, "seed"),
    ],
)
def test_strict_decoding(base: Any, change: dict[str, Any], match: str) -> None:
    m = payload_of(base)
    m.update(change)
    with pytest.raises(DecodeError, match=match):
        decode_payload(frame(m)[4:])


def test_missing_fields_and_non_maps() -> None:
    m = payload_of(FINAL)
    del m["prompt_tokens"]
    with pytest.raises(DecodeError, match="missing"):
        decode_payload(frame(m)[4:])
    for bad in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"\x80\x80"):
        with pytest.raises(DecodeError):
            decode_payload(bad)
    with pytest.raises(DecodeError, match="extension"):
        decode_payload(msgpack.packb({"v": msgpack.ExtType(5, b"x")}))


def test_semantic_request_errors_say_invalid_request() -> None:
    m = payload_of(REQUEST)
    m["top_p"] = 5
    with pytest.raises(DecodeError) as info:
        decode_payload(frame(m)[4:])
    assert info.value.reply is ErrorCode.INVALID_REQUEST


def test_server_reads_one_request_then_watches_for_close() -> None:
    server = InferServer()
    data = InferClient().send_request(REQUEST)
    assert server.next_event() is NEED_DATA
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        event = server.next_event()
        assert event is (NEED_DATA if i < len(data) - 1 else event)
    assert event == REQUEST
    assert server.next_event() is NEED_DATA
    out = server.send(CHUNK) + server.send(FINAL)
    assert server.finished
    with pytest.raises(LocalProtocolError):
        server.send(CHUNK)
    server.receive_data(b"")
    assert server.next_event() is CLIENT_CLOSED
    client = InferClient()
    client.send_request(REQUEST)
    client.receive_data(out)
    assert client.next_event() == CHUNK
    assert client.next_event() == FINAL
    assert client.finished


def test_server_rejects_data_after_request_and_non_requests() -> None:
    server = InferServer()
    server.receive_data(encode_message(REQUEST, max_size=BIG) + b"\x00")
    assert server.next_event() == REQUEST
    with pytest.raises(DecodeError, match="after"):
        server.next_event()
    server = InferServer()
    server.receive_data(encode_message(CHUNK, max_size=BIG))
    with pytest.raises(DecodeError, match="expected a request"):
        server.next_event()
    server = InferServer()
    server.receive_data(b"")
    assert server.next_event() is CLIENT_CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(CHUNK)
    assert server.send(ERROR)


def test_size_caps_apply_before_the_payload_arrives() -> None:
    server = InferServer(max_request_size=100)
    server.receive_data((101).to_bytes(4, "big"))
    with pytest.raises(DecodeError, match="exceeds"):
        server.next_event()
    client = InferClient()
    client.send_request(REQUEST)
    client.receive_data((DEFAULT_MAX_CHUNK + 1).to_bytes(4, "big"))
    with pytest.raises(DecodeError, match="exceeds"):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        InferServer(max_chunk_size=10).send(ERROR)
    with pytest.raises(LocalProtocolError):
        InferClient(max_request_size=10).send_request(REQUEST)


def test_client_errors_on_early_close_and_trailing_data() -> None:
    client = InferClient()
    client.send_request(REQUEST)
    client.receive_data(encode_message(CHUNK, max_size=BIG)[:7])
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(DecodeError, match="inside a frame"):
        client.next_event()
    client = InferClient()
    client.send_request(REQUEST)
    client.receive_data(b"")
    with pytest.raises(DecodeError, match="before the final"):
        client.next_event()
    client = InferClient()
    client.send_request(REQUEST)
    client.receive_data(encode_message(ERROR, max_size=BIG) + b"\x00")
    assert client.next_event() == ERROR
    with pytest.raises(DecodeError, match="after the end"):
        client.next_event()
    client = InferClient()
    client.send_request(REQUEST)
    client.receive_data(encode_message(REQUEST, max_size=BIG))
    with pytest.raises(DecodeError, match="cannot send a request"):
        client.next_event()


def decode_or_typed_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_payload(data)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    decode_or_typed_error(data)
    for endpoint in (InferServer(max_request_size=64), InferClient(max_chunk_size=64)):
        if isinstance(endpoint, InferClient):
            endpoint.send_request(GenerateRequest(model="m", prompt="p"))
        endpoint.receive_data(data)
        endpoint.receive_data(b"")
        try:
            for _ in range(4):
                endpoint.next_event()
        except DecodeError:
            pass


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_message(draw(st.sampled_from(MESSAGES)), max_size=BIG)[4:])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data.insert(pos, draw(st.integers(0, 255)))
        elif op == "delete" and data:
            del data[pos]
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=300)
@given(mutated())
def test_mutated_frames_raise_only_decode_error(data: bytes) -> None:
    decode_or_typed_error(data)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = sorted({k for m in MESSAGES for k in payload_of(m)} | {"messages", "role", "content"})


@settings(max_examples=300)
@given(
    kind=st.sampled_from(["req", "chunk", "final", "error"]),
    base=st.sampled_from(MESSAGES),
    extra=st.dictionaries(st.sampled_from(FIELDS), values, max_size=3),
)
def test_structured_garbage_raises_only_decode_error(
    kind: str, base: Any, extra: dict[str, Any]
) -> None:
    m = payload_of(base)
    m.update(extra)
    m["t"] = kind
    decode_or_typed_error(frame(m)[4:])


@given(
    text=st.text(max_size=50),
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=8),
    finish=st.sampled_from(list(FinishReason)),
    counts=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
def test_round_trip_property(
    text: str, tokens: list[int], finish: FinishReason, counts: tuple[int, int]
) -> None:
    for message in (
        Chunk(text=text, token_ids=tuple(tokens)),
        Final(
            request_id="r",
            finish_reason=finish,
            prompt_tokens=counts[0],
            completion_tokens=counts[1],
        ),
    ):
        assert decode_payload(encode_message(message, max_size=BIG)[4:]) == message


def test_receipt_fields_round_trip_and_are_checked() -> None:
    request = GenerateRequest(
        model="tiny", prompt="x", request_id="ab" * 16, account=b"k" * 32, salt=b"s" * 16
    )
    assert decode_payload(encode_message(request, max_size=1 << 20)[4:]) == request
    for bad in ({"salt": b"short"}, {"account": b"k"}, {"salt": "text"}):
        body = msgpack.unpackb(encode_message(request, max_size=1 << 20)[4:])
        body.update(bad)
        with pytest.raises(DecodeError):
            decode_payload(msgpack.packb(body))
