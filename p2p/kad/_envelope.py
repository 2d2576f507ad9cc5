"""Signed node records: the value a peer stores under `/dbloom/node/<peer-id>`.

The DHT holds them on behalf of their signer, so anyone may relay one but only
the signer can write one. The wrapping is a libp2p signed envelope (RFC 0002):
the signature covers a domain string and a payload type as well as the payload,
so a signature made for another purpose can never pass as a node record. Only
Ed25519 signers are accepted: every dbloom identity is Ed25519, and it keeps a
hostile RSA key from costing us an expensive verification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError, LocalProtocolError
from .._identity import KeyPair, KeyType, PeerId, PublicKey
from .._wire import encode_uvarint

NODE_RECORD_DOMAIN: Final = b"dbloom-node-record"
NODE_RECORD_PAYLOAD_TYPE: Final = b"/dbloom/node-record/1"
DEFAULT_MAX_NODE_RECORD: Final = 64 * 1024
MAX_SEQ: Final = (1 << 63) - 1  # the largest varint libp2p's codec reads back


class RecordRejected(Exception):
    """A DHT record we will not store or believe; `reason` is short and machine-readable.

    Reasons are counters in logs and metrics: "too-large", "malformed",
    "unsupported-key", "wrong-type", "bad-signature", "wrong-key", "worse",
    "quota-peer", "quota-total", "no-validator".
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeEnvelope:
    """An opened, signature-checked node record: who signed it, which version, what."""

    peer_id: PeerId
    public_key: PublicKey
    seq: int
    data: bytes


def _signed_bytes(payload: bytes) -> bytes:
    """What the signature covers (RFC 0002): length-prefixed domain, type and payload."""
    return b"".join(
        encode_uvarint(len(part)) + part
        for part in (NODE_RECORD_DOMAIN, NODE_RECORD_PAYLOAD_TYPE, payload)
    )


def seal_node_record(identity: KeyPair, seq: int, data: bytes) -> bytes:
    """Sign `data` as version `seq` of `identity`'s node record; higher seq replaces lower."""
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"node record seq must be within 0..{MAX_SEQ}")
    payload = pb.encode_message([(1, seq or None), (2, data or None)])
    sealed = pb.encode_message(
        [
            (1, identity.public_key.to_bytes()),
            (2, NODE_RECORD_PAYLOAD_TYPE),
            (3, payload or None),
            (5, identity.sign(_signed_bytes(payload))),
        ]
    )
    if len(sealed) > DEFAULT_MAX_NODE_RECORD:
        raise LocalProtocolError(f"node record over {DEFAULT_MAX_NODE_RECORD} bytes")
    return sealed


def open_node_record(raw: bytes, *, max_size: int = DEFAULT_MAX_NODE_RECORD) -> NodeEnvelope:
    """Check and unwrap a node record from untrusted bytes; raises only RecordRejected."""
    if len(raw) > max_size:
        raise RecordRejected("too-large", f"{len(raw)} bytes exceeds {max_size}")
    try:
        fields = pb.decode_message(raw)
        key_bytes = pb.get_bytes(fields, 1, required=True)
        payload_type = pb.get_bytes(fields, 2) or b""
        payload = pb.get_bytes(fields, 3) or b""
        signature = pb.get_bytes(fields, 5, required=True)
        assert key_bytes is not None and signature is not None
        public_key = PublicKey.from_bytes(key_bytes)
    except DecodeError as exc:
        raise RecordRejected("malformed", str(exc)) from None
    if public_key.key_type is not KeyType.ED25519:
        raise RecordRejected("unsupported-key", public_key.key_type.name)
    if payload_type != NODE_RECORD_PAYLOAD_TYPE:
        raise RecordRejected("wrong-type", repr(payload_type[:64]))
    if not public_key.verify(_signed_bytes(payload), signature):
        raise RecordRejected("bad-signature")
    try:
        inner = pb.decode_message(payload)
        seq = pb.get_int(inner, 1) or 0
        data = pb.get_bytes(inner, 2) or b""
    except DecodeError as exc:
        raise RecordRejected("malformed", str(exc)) from None
    return NodeEnvelope(peer_id=public_key.peer_id, public_key=public_key, seq=seq, data=data)
