"""Reading and writing one relay message on a stream, under a deadline and a size cap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from .._errors import RemoteProtocolError
from .._wire import FrameReader, encode_frame
from ._messages import MAX_MESSAGE_BYTES

T = TypeVar("T")


class _Message(Protocol):
    def to_bytes(self) -> bytes: ...


async def read_message(
    stream: trio.abc.ReceiveStream, decode: Callable[[bytes], T], *, timeout: float
) -> tuple[T, bytes]:
    """The next message and any bytes the peer sent after it (the circuit's first bytes)."""
    reader = FrameReader(max_size=MAX_MESSAGE_BYTES)
    with trio.fail_after(timeout):
        while (frame := reader.next_frame()) is None:
            data = await stream.receive_some()
            if not data:
                raise RemoteProtocolError("relay stream ended before a whole message")
            reader.receive_data(data)
    return decode(frame), reader.trailing_data()


async def write_message(stream: trio.abc.SendStream, message: _Message, *, timeout: float) -> None:
    """Send one length-prefixed message."""
    with trio.fail_after(timeout):
        await stream.send_all(encode_frame(message.to_bytes()))
