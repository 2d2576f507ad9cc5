"""DCUtR messages (`/libp2p/dcutr`): the two peers' addresses, then the go signal.

Sans-IO and strict: a message is capped at 4 KiB (the spec's limit) and its addresses
at `MAX_OBS_ADDRS`; anything else raises `DecodeError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError, LimitExceeded
from .._multiaddr import Multiaddr

DCUTR: Final = "/libp2p/dcutr"
MAX_DCUTR_BYTES: Final = 4096
MAX_OBS_ADDRS: Final = 32


class PunchType(enum.IntEnum):
    """CONNECT carries addresses; SYNC says "dial now"."""

    CONNECT = 100
    SYNC = 300


@dataclass(frozen=True, slots=True)
class HolePunch:
    """One DCUtR message."""

    type: PunchType
    addrs: tuple[Multiaddr, ...] = ()

    def to_bytes(self) -> bytes:
        """Protobuf encoding."""
        return pb.encode_message([(1, int(self.type)), *[(2, a.to_bytes()) for a in self.addrs]])

    @classmethod
    def from_bytes(cls, raw: bytes) -> HolePunch:
        """Decode untrusted bytes; addresses we cannot parse are skipped."""
        if len(raw) > MAX_DCUTR_BYTES:
            raise LimitExceeded("dcutr message too large")
        fields = pb.decode_message(raw, max_fields=MAX_OBS_ADDRS + 8)
        kind = pb.get_int(fields, 1, required=True)
        try:
            punch = PunchType(kind or 0)
        except ValueError:
            raise DecodeError(f"unknown dcutr message type {kind}") from None
        raws = pb.get_repeated_bytes(fields, 2)
        if len(raws) > MAX_OBS_ADDRS:
            raise LimitExceeded("dcutr message lists too many addresses")
        addrs = []
        for item in raws:
            try:
                addrs.append(Multiaddr.from_bytes(item))
            except DecodeError:
                continue
        return cls(punch, tuple(addrs))
