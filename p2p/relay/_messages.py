"""Circuit relay v2 messages (HopMessage, StopMessage and their parts), strictly decoded.

Every message on a hop or stop stream comes from a stranger, so decoding is capped
(`MAX_MESSAGE_BYTES`, `MAX_ADDRS`) and raises only `DecodeError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeVar

from .. import _protobuf as pb
from .._errors import DecodeError, LimitExceeded
from .._identity import PeerId
from .._multiaddr import Multiaddr

HOP: Final = "/libp2p/circuit/relay/0.2.0/hop"
STOP: Final = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE_BYTES: Final = 4096  # go-libp2p's and js-libp2p's cap
MAX_ADDRS: Final = 32
MAX_UINT32: Final = (1 << 32) - 1
MAX_UINT64: Final = (1 << 64) - 1
_E = TypeVar("_E", bound=enum.IntEnum)


class HopType(enum.IntEnum):
    """What a hop message asks for."""

    RESERVE = 0
    CONNECT = 1
    STATUS = 2


class StopType(enum.IntEnum):
    """What a stop message says."""

    CONNECT = 0
    STATUS = 1


class Status(enum.IntEnum):
    """Outcome codes shared by hop and stop."""

    UNUSED = 0
    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


@dataclass(frozen=True, slots=True)
class Limit:
    """Per-circuit limits: seconds and bytes per direction; 0 means none."""

    duration: int = 0
    data: int = 0

    def to_bytes(self) -> bytes:
        """Protobuf encoding."""
        return pb.encode_message([(1, self.duration or None), (2, self.data or None)])

    @classmethod
    def from_bytes(cls, raw: bytes) -> Limit:
        """Decode; values out of their protobuf range are refused."""
        fields = pb.decode_message(raw, max_fields=16)
        duration = pb.get_int(fields, 1) or 0
        data = pb.get_int(fields, 2) or 0
        if duration > MAX_UINT32 or data > MAX_UINT64:
            raise DecodeError("relay limit out of range")
        return cls(duration, data)


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer id and, optionally, addresses (which we never dial: no active relay)."""

    id: PeerId
    addrs: tuple[Multiaddr, ...] = ()

    def to_bytes(self) -> bytes:
        """Protobuf encoding."""
        return pb.encode_message([(1, self.id.multihash), *[(2, a.to_bytes()) for a in self.addrs]])

    @classmethod
    def from_bytes(cls, raw: bytes) -> Peer:
        """Decode; a missing or malformed id is an error, bad addresses are skipped."""
        fields = pb.decode_message(raw, max_fields=MAX_ADDRS + 8)
        id_bytes = pb.get_bytes(fields, 1, required=True)
        assert id_bytes is not None
        return cls(PeerId.from_bytes(id_bytes), _addrs(pb.get_repeated_bytes(fields, 2)))


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted slot: UTC expiry (Unix seconds), the relay's addresses, a voucher."""

    expire: int
    addrs: tuple[Multiaddr, ...] = ()
    voucher: bytes | None = None

    def to_bytes(self) -> bytes:
        """Protobuf encoding."""
        return pb.encode_message(
            [(1, self.expire), *[(2, a.to_bytes()) for a in self.addrs], (3, self.voucher)]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Reservation:
        """Decode; an expiry is required."""
        fields = pb.decode_message(raw, max_fields=MAX_ADDRS + 8)
        expire = pb.get_int(fields, 1, required=True)
        assert expire is not None
        if expire > MAX_UINT64:
            raise DecodeError("reservation expiry out of range")
        addrs = _addrs(pb.get_repeated_bytes(fields, 2))
        return cls(expire, addrs, pb.get_bytes(fields, 3))


@dataclass(frozen=True, slots=True, kw_only=True)
class HopMessage:
    """A message on `/libp2p/circuit/relay/0.2.0/hop`."""

    type: HopType
    peer: Peer | None = None
    reservation: Reservation | None = None
    limit: Limit | None = None
    status: Status | None = None

    def to_bytes(self) -> bytes:
        """Protobuf encoding in field order."""
        return pb.encode_message(
            [
                (1, int(self.type)),
                (2, self.peer.to_bytes() if self.peer else None),
                (3, self.reservation.to_bytes() if self.reservation else None),
                (4, self.limit.to_bytes() if self.limit else None),
                (5, None if self.status is None else int(self.status)),
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> HopMessage:
        """Decode untrusted bytes; raises only DecodeError."""
        fields = _fields(raw)
        peer = pb.get_bytes(fields, 2)
        reservation = pb.get_bytes(fields, 3)
        limit = pb.get_bytes(fields, 4)
        return cls(
            type=_enum(HopType, pb.get_int(fields, 1, required=True)),
            peer=None if peer is None else Peer.from_bytes(peer),
            reservation=None if reservation is None else Reservation.from_bytes(reservation),
            limit=None if limit is None else Limit.from_bytes(limit),
            status=_status(pb.get_int(fields, 5)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StopMessage:
    """A message on `/libp2p/circuit/relay/0.2.0/stop`."""

    type: StopType
    peer: Peer | None = None
    limit: Limit | None = None
    status: Status | None = None

    def to_bytes(self) -> bytes:
        """Protobuf encoding in field order."""
        return pb.encode_message(
            [
                (1, int(self.type)),
                (2, self.peer.to_bytes() if self.peer else None),
                (3, self.limit.to_bytes() if self.limit else None),
                (4, None if self.status is None else int(self.status)),
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> StopMessage:
        """Decode untrusted bytes; raises only DecodeError."""
        fields = _fields(raw)
        peer = pb.get_bytes(fields, 2)
        limit = pb.get_bytes(fields, 3)
        return cls(
            type=_enum(StopType, pb.get_int(fields, 1, required=True)),
            peer=None if peer is None else Peer.from_bytes(peer),
            limit=None if limit is None else Limit.from_bytes(limit),
            status=_status(pb.get_int(fields, 4)),
        )


def _fields(raw: bytes) -> pb.Fields:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise LimitExceeded(f"relay message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return pb.decode_message(raw, max_fields=64)


def _enum(kind: type[_E], value: int | None) -> _E:
    if value is None:
        raise DecodeError(f"relay message without a {kind.__name__}")
    try:
        return kind(value)
    except ValueError:
        raise DecodeError(f"unknown relay {kind.__name__} {value}") from None


def _status(value: int | None) -> Status | None:
    if value is None:
        return None
    try:
        return Status(value)
    except ValueError:
        # An unknown code from a newer peer still means "not OK".
        return Status.UNUSED


def _addrs(raws: list[bytes]) -> tuple[Multiaddr, ...]:
    if len(raws) > MAX_ADDRS:
        raise LimitExceeded(f"relay message lists more than {MAX_ADDRS} addresses")
    out = []
    for raw in raws:
        try:
            out.append(Multiaddr.from_bytes(raw))
        except DecodeError:
            continue
    return tuple(out)
