"""Noise over a trio stream: the handshake under a deadline, then `NoiseStream`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

from .._errors import ErrorCode, RemoteProtocolError
from .._identity import KeyPair, PeerId
from .._streams import InterruptibleReceiveStream, NowaitSendStream
from ..multistream import LazyProposal
from ._core import (
    MAX_PLAINTEXT,
    HandshakeComplete,
    NoiseHandshake,
    NoiseSession,
    Role,
    StaticKey,
)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
RECEIVE_CHUNK = 1 << 18


async def _nothing() -> None:
    pass


class NoiseStream(trio.abc.Stream):
    """An encrypted, authenticated byte stream over any trio stream."""

    def __init__(
        self, transport: trio.abc.Stream, session: NoiseSession, pending: bytes = b""
    ) -> None:
        self.transport = transport
        self._session = session
        self._plain = bytearray()
        self._unsent = bytearray()
        self._nowait: Callable[[bytes], bool] | None = None
        self._flush_transport: Callable[[], Awaitable[None]] = _nothing
        if isinstance(transport, NowaitSendStream):
            self._nowait = transport.send_all_nowait
            self._flush_transport = transport.flush
        if pending:
            session.receive_data(pending)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and write; callers serialise their own writes (yamux holds a lock)."""
        await self.flush()
        await self.transport.send_all(self._session.encrypt(data))

    def send_all_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt and hand to the transport without waiting; False means `flush` is due.

        Over a transport with its own fast path (TcpStream, MemoryStream) a small
        write completes here, with no yield; otherwise the ciphertext waits for `flush`.
        """
        sealed = self._session.encrypt(data)
        if self._unsent or self._nowait is None:
            self._unsent += sealed
            return False
        return self._nowait(sealed)

    async def flush(self) -> None:
        """Finish what `send_all_nowait` started."""
        if self._unsent:
            pending = bytes(self._unsent)
            self._unsent.clear()
            await self.transport.send_all(pending)
        elif self._nowait is not None:
            await self._flush_transport()

    @property
    def can_interrupt_receive(self) -> bool:
        """When the transport can."""
        transport = self.transport
        return isinstance(transport, InterruptibleReceiveStream) and transport.can_interrupt_receive

    def interrupt_receive(self) -> None:
        """Delegates: a read the transport abandons has consumed nothing of a frame."""
        if isinstance(self.transport, InterruptibleReceiveStream):
            self.transport.interrupt_receive()

    async def wait_send_all_might_not_block(self) -> None:
        """Delegates to the transport."""
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` of plaintext; b"" at a clean end of the transport."""
        while not self._plain:
            plain = self._session.decrypt_available()
            if plain:
                if max_bytes is None or len(plain) <= max_bytes:
                    return plain
                self._plain += plain
                break
            data = await self.transport.receive_some(RECEIVE_CHUNK)
            if not data:
                if self._session.buffered:
                    raise RemoteProtocolError("connection closed inside a noise frame")
                return b""
            self._session.receive_data(data)
        size = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
        out = bytes(self._plain[:size])
        del self._plain[:size]
        return out

    async def aclose(self) -> None:
        """Close the transport."""
        await self.transport.aclose()


async def secure(
    transport: trio.abc.Stream,
    role: Role,
    identity: KeyPair,
    *,
    static_key: StaticKey | None = None,
    expected_peer: PeerId | None = None,
    muxers: Sequence[str] = (),
    pending: bytes = b"",
    preamble: LazyProposal | None = None,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> tuple[HandshakeComplete, NoiseStream]:
    """Run the XX handshake; return who the remote is and the encrypted stream.

    With a `preamble` (the initiator's lazy multistream proposal of `/noise`), the
    proposal travels with message 1 and its answer is checked on the way back.
    """
    handshake = NoiseHandshake(
        role, identity, static_key=static_key, expected_peer=expected_peer, muxers=muxers
    )
    if pending:
        handshake.receive_data(pending)
    out = preamble.data if preamble is not None else b""
    try:
        with trio.fail_after(timeout):
            while True:
                event = handshake.next_event()
                out += handshake.data_to_send()
                if out:
                    await transport.send_all(out)
                    out = b""
                if isinstance(event, HandshakeComplete):
                    stream = NoiseStream(transport, event.session, handshake.trailing_data())
                    return event, stream
                data: bytes | bytearray | None = await transport.receive_some(MAX_PLAINTEXT)
                if not data:
                    raise RemoteProtocolError("connection closed during the noise handshake")
                if preamble is not None and not preamble.confirmed:
                    data = preamble.confirm(data)
                if data:
                    handshake.receive_data(data)
    except trio.TooSlowError:
        raise RemoteProtocolError(
            f"noise handshake timed out after {timeout}s", ErrorCode.TIMEOUT
        ) from None
