"""AutoNAT v1 messages (`/libp2p/autonat/1.0.0`): "dial me back at these addresses".

The wire format is go-libp2p's and js-libp2p's, so any of their peers can check us
and we them. Decoding is capped and raises only `DecodeError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError, LimitExceeded
from .._identity import PeerId
from .._multiaddr import Multiaddr

AUTONAT: Final = "/libp2p/autonat/1.0.0"
MAX_AUTONAT_BYTES: Final = 4096
MAX_DIAL_ADDRS: Final = 32
MAX_STATUS_TEXT: Final = 256


class DialStatus(enum.IntEnum):
    """The outcome of a dial-back."""

    OK = 0
    E_DIAL_ERROR = 100
    E_DIAL_REFUSED = 101
    E_BAD_REQUEST = 200
    E_INTERNAL_ERROR = 300


@dataclass(frozen=True, slots=True)
class DialRequest:
    """Who asks (`peer`) and where to dial them."""

    peer: PeerId
    addrs: tuple[Multiaddr, ...]

    def to_bytes(self) -> bytes:
        """Message{type=DIAL, dial={peer={id, addrs}}}."""
        info = pb.encode_message(
            [(1, self.peer.multihash), *[(2, a.to_bytes()) for a in self.addrs]]
        )
        return pb.encode_message([(1, 0), (2, pb.encode_message([(1, info)]))])


@dataclass(frozen=True, slots=True)
class DialResponse:
    """The server's answer: the status and, on success, the address that worked."""

    status: DialStatus
    text: str = ""
    addr: Multiaddr | None = None

    def to_bytes(self) -> bytes:
        """Message{type=DIAL_RESPONSE, dialResponse={status, statusText, addr}}."""
        body = pb.encode_message(
            [
                (1, int(self.status)),
                (2, self.text[:MAX_STATUS_TEXT] or None),
                (3, self.addr.to_bytes() if self.addr else None),
            ]
        )
        return pb.encode_message([(1, 1), (3, body)])


def decode_autonat(raw: bytes) -> DialRequest | DialResponse:
    """Decode either message from untrusted bytes; raises only DecodeError."""
    if len(raw) > MAX_AUTONAT_BYTES:
        raise LimitExceeded("autonat message too large")
    fields = pb.decode_message(raw, max_fields=16)
    kind = pb.get_int(fields, 1, required=True)
    if kind == 0:
        dial = pb.decode_message(pb.get_bytes(fields, 2, required=True) or b"", max_fields=16)
        info = pb.decode_message(pb.get_bytes(dial, 1, required=True) or b"", max_fields=64)
        peer = pb.get_bytes(info, 1, required=True)
        assert peer is not None
        raws = pb.get_repeated_bytes(info, 2)
        if len(raws) > MAX_DIAL_ADDRS:
            raise LimitExceeded("autonat request lists too many addresses")
        addrs = []
        for item in raws:
            try:
                addrs.append(Multiaddr.from_bytes(item))
            except DecodeError:
                continue
        return DialRequest(PeerId.from_bytes(peer), tuple(addrs))
    if kind == 1:
        body = pb.decode_message(pb.get_bytes(fields, 3, required=True) or b"", max_fields=16)
        code = pb.get_int(body, 1)
        try:
            status = DialStatus(code or 0)
        except ValueError:
            status = DialStatus.E_INTERNAL_ERROR
        text = pb.get_str(body, 2) or ""
        addr = pb.get_bytes(body, 3)
        return DialResponse(
            status, text[:MAX_STATUS_TEXT], Multiaddr.from_bytes(addr) if addr else None
        )
    raise DecodeError(f"unknown autonat message type {kind}")
