"""Noise_XX_25519_ChaChaPoly_SHA256 with the libp2p handshake payload, sans-IO.

`NoiseHandshake` drives noiseprotocol's state machine over our framing and checks
that the remote's identity key signed its Noise static key (and, when dialing,
that it is the peer we meant to reach). It ends with a `NoiseSession`, which
frames and encrypts transport messages with ChaCha20-Poly1305 directly.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection

from .._errors import DecodeError, ErrorCode, LocalProtocolError, RemoteProtocolError
from .._identity import KeyPair, PeerId, PublicKey
from ._payload import SIGNATURE_PREFIX, HandshakePayload

PROTOCOL_ID: Final = "/noise"
NOISE_NAME: Final = b"Noise_XX_25519_ChaChaPoly_SHA256"
MAX_NOISE_MESSAGE: Final = 65535
TAG_SIZE: Final = 16
MAX_PLAINTEXT: Final = MAX_NOISE_MESSAGE - TAG_SIZE
MAX_NONCE: Final = (1 << 64) - 1


class Role(enum.Enum):
    """The dialer is the Noise initiator."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


class AuthenticationError(RemoteProtocolError):
    """The remote is not who it claims to be, or not who we dialed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.AUTH)


class StaticKey:
    """A Noise static X25519 key, made fresh per process and never written to disk."""

    __slots__ = ("private", "public")

    def __init__(self) -> None:
        key = X25519PrivateKey.generate()
        self.private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeComplete:
    """The channel is up and authenticated as `peer_id`."""

    peer_id: PeerId
    public_key: PublicKey
    muxer: str | None
    session: NoiseSession


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA


def _frame(message: bytes | bytearray) -> bytes:
    return len(message).to_bytes(2, "big") + message


def choose_muxer(initiator: Sequence[str], responder: Sequence[str]) -> str | None:
    """The muxer agreed in early data (inlined-muxer-negotiation spec), if any.

    Only when both sides list muxers: the first of the initiator's that the responder
    offers. A side that lists none negotiates the muxer with multistream afterwards.
    """
    if not initiator or not responder:
        return None
    offered = set(responder)
    chosen = next((m for m in initiator if m in offered), None)
    if chosen is None:
        raise RemoteProtocolError("no stream muxer in common", ErrorCode.UNSUPPORTED)
    return chosen


class NoiseHandshake:
    """XX handshake; the initiator writes message 1 as soon as it is built."""

    def __init__(
        self,
        role: Role,
        identity: KeyPair,
        *,
        static_key: StaticKey | None = None,
        expected_peer: PeerId | None = None,
        muxers: Sequence[str] = (),
    ) -> None:
        self.role = role
        self._identity = identity
        self._static = static_key or StaticKey()
        self._expected = expected_peer
        self._muxers = tuple(muxers)
        self._buf = bytearray()
        self._out = bytearray()
        self._remote: HandshakePayload | None = None
        self._remote_key: PublicKey | None = None
        self._done: HandshakeComplete | None = None
        self._noise: Any = NoiseConnection.from_name(NOISE_NAME)
        self._noise.set_keypair_from_private_bytes(NoiseKeypair.STATIC, self._static.private)
        if role is Role.INITIATOR:
            self._noise.set_as_initiator()
        else:
            self._noise.set_as_responder()
        self._noise.start_handshake()
        self._state: Any = self._noise.noise_protocol.handshake_state  # outlives handshake_done()
        self._messages_read = 0
        if role is Role.INITIATOR:
            self._write(b"")

    def data_to_send(self) -> bytes:
        """Framed handshake messages for the shell to write."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes read from the transport."""
        self._buf += data

    def trailing_data(self) -> bytes:
        """Bytes read past the last handshake message (the first transport frames)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_event(self) -> HandshakeComplete | _NeedData:
        """Process buffered handshake messages; finish when the pattern is done."""
        while self._done is None:
            message = self._next_message()
            if message is None:
                return NEED_DATA
            self._on_message(message)
        return self._done

    def _next_message(self) -> bytes | None:
        if len(self._buf) < 2:
            return None
        length = int.from_bytes(self._buf[:2], "big")
        if len(self._buf) < 2 + length:
            return None
        message = bytes(self._buf[2 : 2 + length])
        del self._buf[: 2 + length]
        return message

    def _read(self, message: bytes) -> bytes:
        try:
            return bytes(self._noise.read_message(message))
        except Exception as exc:  # noiseprotocol raises several unrelated types
            raise RemoteProtocolError(f"noise handshake message rejected: {exc!r}") from None

    def _write(self, payload: bytes) -> None:
        self._out += _frame(self._noise.write_message(payload))

    def _payload(self) -> bytes:
        signature = self._identity.sign(SIGNATURE_PREFIX + self._static.public)
        return HandshakePayload(
            identity_key=self._identity.public_key.to_bytes(),
            identity_sig=signature,
            stream_muxers=self._muxers,
        ).to_bytes()

    def _on_message(self, message: bytes) -> None:
        self._messages_read += 1
        if self.role is Role.RESPONDER and self._messages_read == 1:
            if self._read(message):
                raise RemoteProtocolError("noise message 1 must carry no payload")
            self._write(self._payload())
            return
        payload = self._read(message)
        self._authenticate(payload)
        if self.role is Role.INITIATOR:
            self._write(self._payload())
        self._finish()

    def _authenticate(self, raw: bytes) -> None:
        try:
            payload = HandshakePayload.from_bytes(raw)
            key = PublicKey.from_bytes(payload.identity_key)
        except DecodeError as exc:
            raise AuthenticationError(f"bad noise handshake payload: {exc}") from None
        remote_static = self._state.rs.public_bytes
        if not key.verify(SIGNATURE_PREFIX + remote_static, payload.identity_sig):
            raise AuthenticationError(
                "the remote's identity signature over its noise key is invalid"
            )
        peer = PeerId.from_public_key(key)
        if self._expected is not None and peer != self._expected:
            raise AuthenticationError(f"dialed {self._expected} but reached {peer}")
        self._remote = payload
        self._remote_key = key

    def _finish(self) -> None:
        if not self._noise.handshake_finished:
            raise LocalProtocolError("noise pattern did not finish after three messages")
        assert self._remote is not None and self._remote_key is not None
        protocol = self._noise.noise_protocol
        if self.role is Role.INITIATOR:
            muxer = choose_muxer(self._muxers, self._remote.stream_muxers)
        else:
            muxer = choose_muxer(self._remote.stream_muxers, self._muxers)
        self._done = HandshakeComplete(
            peer_id=PeerId.from_public_key(self._remote_key),
            public_key=self._remote_key,
            muxer=muxer,
            session=NoiseSession(protocol.cipher_state_encrypt.k, protocol.cipher_state_decrypt.k),
        )


class NoiseSession:
    """Transport phase: frames and seals outgoing bytes, opens incoming frames."""

    __slots__ = ("_buf", "_recv", "_recv_n", "_send", "_send_n")

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(receive_key)
        self._send_n = 0
        self._recv_n = 0
        self._buf = bytearray()

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """Seal `data` into as many framed Noise messages as it needs."""
        view = memoryview(data)
        if len(view) <= MAX_PLAINTEXT:
            return self._seal(view)
        return b"".join(
            self._seal(view[i : i + MAX_PLAINTEXT]) for i in range(0, len(view), MAX_PLAINTEXT)
        )

    def _seal(self, chunk: memoryview) -> bytes:
        if self._send_n >= MAX_NONCE:
            raise LocalProtocolError("noise send nonce exhausted; the connection must close")
        nonce = b"\0\0\0\0" + self._send_n.to_bytes(8, "little")
        self._send_n += 1
        sealed = self._send.encrypt(nonce, chunk, None)
        return len(sealed).to_bytes(2, "big") + sealed

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ciphertext read from the transport."""
        self._buf += data

    def decrypt_available(self) -> bytes:
        """Open every complete buffered frame; b"" when none is complete yet."""
        buf = self._buf
        pieces: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            length = buf[pos] << 8 | buf[pos + 1]
            if end - pos - 2 < length:
                break
            if length < TAG_SIZE:
                raise DecodeError("noise message shorter than its tag")
            if self._recv_n >= MAX_NONCE:
                raise RemoteProtocolError("noise receive nonce exhausted")
            nonce = b"\0\0\0\0" + self._recv_n.to_bytes(8, "little")
            try:
                pieces.append(
                    self._recv.decrypt(nonce, bytes(buf[pos + 2 : pos + 2 + length]), None)
                )
            except InvalidTag:
                raise RemoteProtocolError("noise message failed authentication") from None
            self._recv_n += 1
            pos += 2 + length
        if pos:
            del buf[:pos]
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    @property
    def buffered(self) -> int:
        """Ciphertext bytes waiting for the rest of their frame."""
        return len(self._buf)
