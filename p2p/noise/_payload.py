"""The libp2p Noise handshake payload (protobuf `NoiseHandshakePayload`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError, LimitExceeded

SIGNATURE_PREFIX: Final = b"noise-libp2p-static-key:"
MAX_PAYLOAD: Final = 8192
MAX_MUXERS: Final = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakePayload:
    """Identity key, its signature over our Noise static key, and early-data extensions."""

    identity_key: bytes
    identity_sig: bytes
    stream_muxers: tuple[str, ...] = field(default=())

    def to_bytes(self) -> bytes:
        """Protobuf encoding; extensions only when there is something to say."""
        extensions = None
        if self.stream_muxers:
            extensions = pb.encode_message([(2, m) for m in self.stream_muxers])
        return pb.encode_message([(1, self.identity_key), (2, self.identity_sig), (4, extensions)])

    @classmethod
    def from_bytes(cls, raw: bytes) -> HandshakePayload:
        """Strictly decode a payload from the (untrusted) remote."""
        if len(raw) > MAX_PAYLOAD:
            raise LimitExceeded("noise handshake payload too large")
        fields = pb.decode_message(raw)
        key = pb.get_bytes(fields, 1)
        sig = pb.get_bytes(fields, 2)
        if not key or not sig:
            raise DecodeError("noise handshake payload lacks the identity key or signature")
        muxers: list[str] = []
        extensions = pb.get_bytes(fields, 4)
        if extensions is not None:
            muxers = pb.get_repeated_str(pb.decode_message(extensions), 2)
            if len(muxers) > MAX_MUXERS:
                raise LimitExceeded("too many stream muxers in the noise extensions")
        return cls(identity_key=key, identity_sig=sig, stream_muxers=tuple(muxers))
