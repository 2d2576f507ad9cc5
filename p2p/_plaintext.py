"""`/plaintext/2.0.0`: identities exchanged, nothing encrypted — for simulations only.

Thousands of hosts in one process on the in-memory network spend most of their
CPU in Noise handshakes that protect nothing (no byte leaves the process). The
host accepts this security only when every transport it has is in-memory, so it
can never carry real traffic. The exchange follows the libp2p plaintext spec.
"""

from __future__ import annotations

from typing import Final

import trio

from . import _protobuf as pb
from ._errors import DecodeError, ErrorCode, RemoteProtocolError
from ._identity import KeyPair, PeerId, PublicKey
from ._wire import FrameReader, encode_frame
from .multistream import LazyProposal

PROTOCOL_ID: Final = "/plaintext/2.0.0"
MAX_EXCHANGE: Final = 4096


def encode_exchange(identity: KeyPair) -> bytes:
    """Our `Exchange {id, pubkey}` message, length-prefixed."""
    return encode_frame(
        pb.encode_message([(1, identity.peer_id.multihash), (2, identity.public_key.to_bytes())])
    )


def decode_exchange(raw: bytes) -> tuple[PeerId, PublicKey]:
    """The remote's claimed identity; its id must match its key."""
    fields = pb.decode_message(raw)
    peer_bytes = pb.get_bytes(fields, 1, required=True)
    key_bytes = pb.get_bytes(fields, 2, required=True)
    assert peer_bytes is not None and key_bytes is not None
    peer = PeerId.from_bytes(peer_bytes)
    key = PublicKey.from_bytes(key_bytes)
    if not peer.matches(key):
        raise DecodeError("plaintext exchange: peer id does not match the public key")
    return peer, key


async def exchange(
    stream: trio.abc.Stream,
    identity: KeyPair,
    *,
    expected_peer: PeerId | None,
    pending: bytes = b"",
    preamble: LazyProposal | None = None,
    then_send: bytes = b"",
) -> tuple[PeerId, PublicKey, bytes]:
    """Swap identities; returns the remote's and any bytes read past its message.

    The initiator's lazy `/plaintext/2.0.0` proposal (`preamble`) and whatever it
    wants to pipeline behind its identity (`then_send`) go out in one write.
    """
    head = preamble.data if preamble is not None else b""
    await stream.send_all(head + encode_exchange(identity) + then_send)
    reader = FrameReader(max_size=MAX_EXCHANGE)
    reader.receive_data(pending)
    while (frame := reader.next_frame()) is None:
        data: bytes | bytearray | None = await stream.receive_some()
        if not data:
            raise RemoteProtocolError("connection closed during the plaintext exchange")
        if preamble is not None and not preamble.confirmed:
            data = preamble.confirm(data)
        if data:
            reader.receive_data(data)
    peer, key = decode_exchange(frame)
    if expected_peer is not None and peer != expected_peer:
        raise RemoteProtocolError(f"dialed {expected_peer} but reached {peer}", ErrorCode.AUTH)
    return peer, key, reader.trailing_data()
