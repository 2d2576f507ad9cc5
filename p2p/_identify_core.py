"""The identify message (`/ipfs/id/1.0.0`), encoded and strictly decoded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from . import _protobuf as pb
from ._errors import DecodeError, LimitExceeded
from ._identity import PublicKey
from ._multiaddr import Multiaddr

IDENTIFY: Final = "/ipfs/id/1.0.0"
IDENTIFY_PUSH: Final = "/ipfs/id/push/1.0.0"
PROTOCOL_VERSION: Final = "ipfs/0.1.0"
MAX_IDENTIFY_BYTES: Final = 8192  # js-libp2p's default cap; ours must fit in it too
MAX_LISTED: Final = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentifyInfo:
    """What a peer says about itself."""

    protocol_version: str | None = None
    agent_version: str | None = None
    public_key: PublicKey | None = None
    listen_addrs: tuple[Multiaddr, ...] = field(default=())
    observed_addr: Multiaddr | None = None
    protocols: tuple[str, ...] = field(default=())

    def to_bytes(self) -> bytes:
        """Protobuf encoding in field order."""
        return pb.encode_message(
            [
                (1, self.public_key.to_bytes() if self.public_key else None),
                *[(2, addr.to_bytes()) for addr in self.listen_addrs],
                *[(3, proto) for proto in self.protocols],
                (4, self.observed_addr.to_bytes() if self.observed_addr else None),
                (5, self.protocol_version),
                (6, self.agent_version),
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> IdentifyInfo:
        """Decode untrusted bytes; addresses we cannot parse are skipped, not fatal."""
        if len(raw) > MAX_IDENTIFY_BYTES:
            raise LimitExceeded("identify message too large")
        fields = pb.decode_message(raw)
        key_bytes = pb.get_bytes(fields, 1)
        protocols = pb.get_repeated_str(fields, 3)
        addrs_raw = pb.get_repeated_bytes(fields, 2)
        if len(protocols) > MAX_LISTED * 4 or len(addrs_raw) > MAX_LISTED:
            raise LimitExceeded("identify lists too many protocols or addresses")
        observed_raw = pb.get_bytes(fields, 4)
        return cls(
            protocol_version=pb.get_str(fields, 5),
            agent_version=pb.get_str(fields, 6),
            public_key=PublicKey.from_bytes(key_bytes) if key_bytes else None,
            listen_addrs=tuple(a for a in map(_maybe_addr, addrs_raw) if a is not None),
            observed_addr=_maybe_addr(observed_raw) if observed_raw else None,
            protocols=tuple(protocols),
        )


def _maybe_addr(raw: bytes) -> Multiaddr | None:
    try:
        return Multiaddr.from_bytes(raw)
    except DecodeError:
        return None
