"""Message signing and checking under the pubsub `StrictSign` policy.

The author signs `"libp2p-pubsub:"` followed by the message's protobuf without
its `signature` and `key` fields; `from` is the author's peer id and `seqno` an
8-byte big-endian counter, so `from ‖ seqno` names the message. The key rides
along only when the peer id cannot hold it (Ed25519 ids inline their key). We
check the bytes as they arrived, minus those two fields, which is what go and js
re-marshal for every message an honest peer signed.
"""

from __future__ import annotations

from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError
from .._identity import KeyPair, PeerId, PublicKey
from .._wire import decode_uvarint
from ._rpc import Message

SIGN_PREFIX: Final = b"libp2p-pubsub:"
SEQNO_BYTES: Final = 8
_UNSIGNED_FIELDS: Final = frozenset({5, 6})  # signature, key


class MessageRejected(Exception):
    """A message breaks the signing policy; `reason` says how (for logs and stats)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sign_message(identity: KeyPair, topic: str, data: bytes, seqno: int) -> Message:
    """A message from `identity`, signed, with the key inlined only if its peer id lacks it."""
    unsigned = Message(
        topic=topic,
        data=data,
        from_peer=identity.peer_id.multihash,
        seqno=seqno.to_bytes(SEQNO_BYTES, "big"),
    )
    signature = identity.sign(SIGN_PREFIX + unsigned.raw)
    inlined = identity.peer_id.extract_public_key() is not None
    return Message(
        topic=topic,
        data=data,
        from_peer=unsigned.from_peer,
        seqno=unsigned.seqno,
        signature=signature,
        key=None if inlined else identity.public_key.to_bytes(),
    )


def verify_message(message: Message) -> PeerId:
    """The author of a correctly signed message; raises `MessageRejected` otherwise."""
    if message.from_peer is None or message.seqno is None or message.signature is None:
        raise MessageRejected("unsigned message (StrictSign wants from, seqno and signature)")
    if len(message.seqno) != SEQNO_BYTES:
        raise MessageRejected(f"seqno of {len(message.seqno)} bytes, not {SEQNO_BYTES}")
    try:
        author = PeerId.from_bytes(message.from_peer)
        if message.key is not None:
            key = PublicKey.from_bytes(message.key)
            if not author.matches(key):
                raise MessageRejected("key does not match the author's peer id")
        else:
            inlined = author.extract_public_key()
            if inlined is None:
                raise MessageRejected("no key and the author's peer id does not inline one")
            key = inlined
    except DecodeError as exc:
        raise MessageRejected(f"bad author or key: {exc}") from None
    if not key.verify(SIGN_PREFIX + signed_bytes(message.raw), message.signature):
        raise MessageRejected("bad signature")
    return author


def signed_bytes(raw: bytes) -> bytes:
    """The message's encoding without its signature and key fields, order kept."""
    out = bytearray()
    pos = 0
    end = len(raw)
    while pos < end:
        start = pos
        tag = decode_uvarint(raw, pos)
        if tag is None:
            raise DecodeError("truncated protobuf tag")
        key, pos = tag
        wire_type = key & 7
        if wire_type == pb.VARINT:
            item = decode_uvarint(raw, pos)
            if item is None:
                raise DecodeError("truncated protobuf varint")
            pos = item[1]
        elif wire_type == pb.LEN:
            item = decode_uvarint(raw, pos)
            if item is None:
                raise DecodeError("truncated protobuf length")
            pos = item[1] + item[0]
        elif wire_type in (pb.I64, pb.I32):
            pos += 8 if wire_type == pb.I64 else 4
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire_type}")
        if pos > end:
            raise DecodeError("protobuf field runs past the end")
        if key >> 3 not in _UNSIGNED_FIELDS:
            out += raw[start:pos]
    return bytes(out)
