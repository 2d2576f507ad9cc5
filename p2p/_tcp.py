"""A TCP stream with a synchronous send fast path.

trio's SocketStream always yields on send. Ours first offers bytes to the kernel
without awaiting (`send_all_nowait`), which lets a multiplexer put a small frame
on the wire with no task switch and no cancel scope, and only falls back to an
awaited write when the socket buffer is full. It reads the same way: try the
socket first, wait for readability only when it is empty.
"""

from __future__ import annotations

import errno
import socket

import trio

from ._streams import ReceiveInterrupted

RECEIVE_SIZE = 256 * 1024


class TcpStream(trio.abc.HalfCloseableStream):
    """Owns a non-blocking stdlib socket; trio waits on it when it must."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._unsent = bytearray()
        self._closed = False
        self._send_busy = False
        self._recv_busy = False
        self._receive_waiting = False
        self._receive_interrupted = False

    @property
    def can_interrupt_receive(self) -> bool:
        """Always: see `interrupt_receive`."""
        return True

    def interrupt_receive(self) -> None:
        """Stop a `receive_some` in progress: it raises ReceiveInterrupted instead of waiting.

        Done with `notify_closing`, which wakes every waiter on the socket without
        closing it; a write waiting for room (`flush`) just waits again.
        """
        if self._recv_busy and not self._closed:
            # Kept until the next wait if the read is not waiting now (it may be
            # about to return part of a frame, and a layer above read on): at worst
            # one later read of that caller is interrupted for nothing.
            self._receive_interrupted = True
            if self._receive_waiting:
                trio.lowlevel.notify_closing(self.socket)

    def _raise_closed(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TCP stream is closed")

    def _send_now(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"TCP send failed: {exc.strerror}") from exc

    def send_all_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Give `data` to the kernel now; True if it all went, else the rest waits for `flush`."""
        self._raise_closed()
        if self._unsent:
            self._unsent += data
            return False
        sent = self._send_now(data)
        if sent == len(data):
            return True
        self._unsent += memoryview(data)[sent:]
        return False

    async def flush(self) -> None:
        """Write out what `send_all_nowait` could not."""
        while self._unsent:
            self._raise_closed()
            sent = self._send_now(self._unsent)
            if sent:
                del self._unsent[:sent]
            else:
                await self._wait_writable()

    async def _wait_writable(self) -> None:
        try:
            await trio.lowlevel.wait_writable(self.socket)
        except trio.ClosedResourceError:
            if self._closed:
                raise
            # Woken by interrupt_receive, not by a close: the caller looks again.

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write everything (after anything left over by `send_all_nowait`)."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._raise_closed()
            if self.send_all_nowait(data):
                await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                await self.flush()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        """Waits for socket buffer space."""
        self._raise_closed()
        await self._wait_writable()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes available; b"" at end of stream."""
        if self._recv_busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._recv_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            size = RECEIVE_SIZE if max_bytes is None else max_bytes
            waited = False
            while True:
                self._raise_closed()
                try:
                    data = self.socket.recv(size)
                except BlockingIOError:
                    if self._receive_interrupted:
                        self._receive_interrupted = False
                        raise ReceiveInterrupted from None
                    self._receive_waiting = True
                    try:
                        await trio.lowlevel.wait_readable(self.socket)
                    except trio.ClosedResourceError:
                        if self._receive_interrupted and not self._closed:
                            self._receive_interrupted = False
                            raise ReceiveInterrupted from None
                        raise
                    finally:
                        self._receive_waiting = False
                    waited = True
                    continue
                except OSError as exc:
                    if self._closed or exc.errno == errno.EBADF:
                        raise trio.ClosedResourceError("TCP stream is closed") from None
                    raise trio.BrokenResourceError(f"TCP receive failed: {exc.strerror}") from exc
                if not waited:  # we have not yielded yet: be fair to other tasks
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        finally:
            self._recv_busy = False

    async def send_eof(self) -> None:
        """Half-close after anything still unsent."""
        await self.flush()
        self._raise_closed()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"TCP shutdown failed: {exc.strerror}") from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close at once; tasks blocked on the socket wake with ClosedResourceError."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
