"""HTTP-level behaviour of the shim that SDKs hide: connection handling, odd framing."""

from __future__ import annotations

import json

import pytest
import trio
from shim_helpers import MODEL_ID, Shim

CHAT = json.dumps(
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
).encode()


async def exchange(shim: Shim, request: bytes, timeout: float = 10) -> bytes:
    """Send `request` raw and read until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", shim.port)
    received = b""
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(timeout):
            while data := await stream.receive_some(65536):
                received += data
    return received


def post(path: str, body: bytes, *, version: str = "1.1", close: bool = True) -> bytes:
    head = (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (CHAT, b"200"),
        (json.dumps({**json.loads(CHAT), "stream": True}).encode(), b"200"),
        (json.dumps({**json.loads(CHAT), "model": "nope"}).encode(), b"404"),
    ],
)
async def test_a_generation_response_closes_a_connection_close_request(
    shim: Shim, body: bytes, status: bytes
) -> None:
    answer = await exchange(shim, post("/v1/chat/completions", body))
    assert answer.split(b" ", 2)[1] == status


async def test_an_http_1_0_client_gets_its_whole_answer(shim: Shim) -> None:
    # HTTP/1.0 has no chunking: the body ends where the connection does.
    answer = await exchange(shim, post("/v1/chat/completions", CHAT, version="1.0", close=False))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["object"] == "chat.completion"


async def test_a_body_announced_but_never_sent_is_answered_without_an_error_log(
    shim: Shim, caplog: pytest.LogCaptureFixture
) -> None:
    # The answer goes out while the server still waits for the body; the server then
    # drops the connection under the response. That is the client's doing, not ours.
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n\r\n"
    with caplog.at_level("WARNING", logger="dbloom.api"):
        for _ in range(30):
            # Hang up as soon as the answer is complete, as most clients do.
            stream = await trio.open_tcp_stream("127.0.0.1", shim.port)
            async with stream:
                await stream.send_all(request)
                answer = b""
                with trio.fail_after(10):
                    while not complete(answer) and (data := await stream.receive_some(65536)):
                        answer += data
            assert answer.startswith(b"HTTP/1.1 200")
        await trio.sleep(0.3)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False
