"""Small stream adapters used between layers."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import trio


@runtime_checkable
class NowaitSendStream(Protocol):
    """A stream that can take bytes without yielding when its buffer has room.

    `send_all_nowait` returns True when everything was handed on; otherwise the
    stream keeps the rest and `flush` must be awaited before the next write.
    """

    def send_all_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Hand `data` on now if possible."""
        ...

    async def flush(self) -> None:
        """Write out whatever `send_all_nowait` kept."""
        ...


class ReceiveInterrupted(Exception):
    """`receive_some` was woken by `interrupt_receive` and consumed nothing."""


@runtime_checkable
class InterruptibleReceiveStream(Protocol):
    """A stream whose blocked `receive_some` another task can wake without a cancel scope.

    A multiplexer whose streams read the transport themselves uses it to stop
    such a read when the stream is closed from another task; entering a cancel
    scope around every read instead would cost about 5 µs each.
    """

    @property
    def can_interrupt_receive(self) -> bool:
        """False when this stream (or one it wraps) cannot do it."""
        ...

    def interrupt_receive(self) -> None:
        """Make a `receive_some` blocked now raise ReceiveInterrupted, losing nothing."""
        ...


class PrefixedStream(trio.abc.Stream):
    """A stream whose first bytes were already read by a lower layer (e.g. multistream)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Delegates."""
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Delegates."""
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The prefix first, then the inner stream."""
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:size], self._prefix[size:]
            return out
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        """Delegates."""
        await self.inner.aclose()


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    """Read exactly `size` bytes; raises EOFError if the stream ends first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.receive_some(size - len(buf))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


async def receive_until_eof(stream: trio.abc.Stream, max_size: int) -> bytes:
    """Read to EOF; raises ValueError past `max_size` bytes."""
    buf = bytearray()
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_size:
            raise ValueError(f"more than {max_size} bytes before end of stream")
