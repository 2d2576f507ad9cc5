"""Reservation vouchers: the relay's signed word that it will relay for a peer until a time.

A libp2p signed envelope (RFC 0002) with domain `libp2p-relay-rsvp` and payload type
0x0302, as go-libp2p writes it, so a voucher from either implementation opens in the
other. Vouchers are advisory today (the spec does not require them to dial), but a
client checks its own: a relay that signs for the wrong peer or time is misbehaving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError, LimitExceeded
from .._identity import KeyPair, KeyType, PeerId, PublicKey
from .._wire import encode_uvarint

VOUCHER_DOMAIN: Final = b"libp2p-relay-rsvp"
VOUCHER_PAYLOAD_TYPE: Final = b"\x03\x02"
MAX_VOUCHER_BYTES: Final = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Voucher:
    """Who relays (`relay`), for whom (`peer`), until when (UTC Unix seconds)."""

    relay: PeerId
    peer: PeerId
    expiration: int


def _signed_bytes(payload: bytes) -> bytes:
    return b"".join(
        encode_uvarint(len(part)) + part for part in (VOUCHER_DOMAIN, VOUCHER_PAYLOAD_TYPE, payload)
    )


def seal_voucher(relay: KeyPair, peer: PeerId, expiration: int) -> bytes:
    """The envelope a relay hands to the peer it reserved a slot for."""
    payload = pb.encode_message(
        [(1, relay.peer_id.multihash), (2, peer.multihash), (3, expiration)]
    )
    return pb.encode_message(
        [
            (1, relay.public_key.to_bytes()),
            (2, VOUCHER_PAYLOAD_TYPE),
            (3, payload),
            (5, relay.sign(_signed_bytes(payload))),
        ]
    )


def open_voucher(raw: bytes) -> Voucher:
    """Check the signature and that the signer is the relay named inside; DecodeError if not."""
    if len(raw) > MAX_VOUCHER_BYTES:
        raise LimitExceeded("voucher too large")
    fields = pb.decode_message(raw, max_fields=16)
    key_bytes = pb.get_bytes(fields, 1, required=True)
    signature = pb.get_bytes(fields, 5, required=True)
    assert key_bytes is not None and signature is not None
    if pb.get_bytes(fields, 2) != VOUCHER_PAYLOAD_TYPE:
        raise DecodeError("not a reservation voucher")
    payload = pb.get_bytes(fields, 3) or b""
    key = PublicKey.from_bytes(key_bytes)
    if key.key_type is not KeyType.ED25519:
        raise DecodeError("voucher signed with an unsupported key type")
    if not key.verify(_signed_bytes(payload), signature):
        raise DecodeError("voucher signature does not verify")
    inner = pb.decode_message(payload, max_fields=16)
    relay = pb.get_bytes(inner, 1, required=True)
    peer = pb.get_bytes(inner, 2, required=True)
    expiration = pb.get_int(inner, 3, required=True)
    assert relay is not None and peer is not None and expiration is not None
    voucher = Voucher(
        relay=PeerId.from_bytes(relay), peer=PeerId.from_bytes(peer), expiration=expiration
    )
    if not voucher.relay.matches(key):
        raise DecodeError("voucher names a relay other than its signer")
    return voucher
