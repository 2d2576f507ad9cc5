"""The libp2p kad-dht RPC message, encoded as go/js-libp2p do and strictly decoded.

One protobuf `Message` carries every request and response. We encode proto3
style (zero values and empty fields left out, fields in number order), which is
byte for byte what go-libp2p-kad-dht and js-libp2p send, and we decode untrusted
bytes into typed, bounded objects: every failure is a `DecodeError` (or its
subclass `LimitExceeded`), so the shell resets exactly the stream that lied.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError, LimitExceeded, LocalProtocolError
from .._identity import PeerId
from .._multiaddr import Multiaddr

DEFAULT_MAX_MESSAGE: Final = 256 * 1024  # room for a full record plus k closer peers
DEFAULT_MAX_PEERS: Final = 64  # per list; k=20 is what honest peers send
MAX_RECORD_SIZE: Final = 64 * 1024  # largest record value we carry
MAX_PEER_ADDRS: Final = 16  # addresses kept per peer entry
MAX_ADDR_ATTEMPTS: Final = 2 * MAX_PEER_ADDRS  # addresses we try to parse per peer entry
MAX_PEER_FIELDS: Final = 128  # protobuf fields one peer entry may hold (mostly addrs)
_MESSAGE_OVERHEAD_FIELDS: Final = 16  # type, key, record, clusterLevelRaw, with slack


class MessageType(IntEnum):
    """What an RPC asks for (kad-dht `Message.MessageType`)."""

    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class ConnectionType(IntEnum):
    """What the sender knows about reaching a peer; advisory only."""

    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """A peer named in a response, with the addresses to dial it at."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()
    connection: ConnectionType = ConnectionType.NOT_CONNECTED

    def to_bytes(self) -> bytes:
        """The protobuf `Message.Peer`."""
        return pb.encode_message(
            [
                (1, self.peer_id.multihash),
                *[(2, addr.to_bytes()) for addr in self.addrs],
                (3, int(self.connection) or None),
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerInfo:
        """Decode one peer entry: its id must parse, its addresses need not.

        Stock nodes advertise transports we do not speak (webtransport, webrtc…),
        so an address that does not parse is skipped; of the first
        `MAX_ADDR_ATTEMPTS`, up to `MAX_PEER_ADDRS` that do parse are kept.
        """
        fields = pb.decode_message(raw, max_fields=MAX_PEER_FIELDS)
        id_bytes = pb.get_bytes(fields, 1, required=True)
        assert id_bytes is not None
        addrs: list[Multiaddr] = []
        for addr_bytes in pb.get_repeated_bytes(fields, 2)[:MAX_ADDR_ATTEMPTS]:
            if len(addrs) == MAX_PEER_ADDRS:
                break
            try:
                addrs.append(Multiaddr.from_bytes(addr_bytes))
            except DecodeError:
                continue
        connection = pb.get_int(fields, 3) or 0
        return cls(
            peer_id=PeerId.from_bytes(id_bytes),
            addrs=tuple(addrs),
            connection=_connection_type(connection),
        )


def _connection_type(value: int) -> ConnectionType:
    # Proto3 enums are open: a value from a newer peer must not cost us the peer.
    try:
        return ConnectionType(value)
    except ValueError:
        return ConnectionType.NOT_CONNECTED


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A key/value pair in PUT_VALUE and GET_VALUE (the libp2p `Record`)."""

    key: bytes
    value: bytes
    time_received: str = ""  # RFC 3339, set by whoever stored it; informational

    def __post_init__(self) -> None:
        if len(self.value) > MAX_RECORD_SIZE:
            raise LocalProtocolError(f"record value over {MAX_RECORD_SIZE} bytes")

    def to_bytes(self) -> bytes:
        """The protobuf `Record` (the removed author/signature fields never appear)."""
        return pb.encode_message(
            [(1, self.key or None), (2, self.value or None), (5, self.time_received or None)]
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Record:
        """Decode a record; a value over `MAX_RECORD_SIZE` is refused."""
        fields = pb.decode_message(raw)
        value = pb.get_bytes(fields, 2) or b""
        if len(value) > MAX_RECORD_SIZE:
            raise LimitExceeded(f"record value of {len(value)} bytes exceeds {MAX_RECORD_SIZE}")
        return cls(
            key=pb.get_bytes(fields, 1) or b"",
            value=value,
            time_received=pb.get_str(fields, 5) or "",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class KadMessage:
    """One kad-dht RPC request or response.

    A PUT_VALUE must carry a record whose key equals the message key (go-libp2p
    refuses anything else); other per-type rules depend on the request being
    answered, so the service checks them.
    """

    type: MessageType
    key: bytes = b""
    record: Record | None = None
    closer_peers: tuple[PeerInfo, ...] = ()
    provider_peers: tuple[PeerInfo, ...] = ()

    def __post_init__(self) -> None:
        if self.type is MessageType.PUT_VALUE and (
            self.record is None or self.record.key != self.key
        ):
            raise LocalProtocolError("PUT_VALUE needs a record whose key is the message key")

    def to_bytes(self) -> bytes:
        """The protobuf `Message`, as go-libp2p-kad-dht marshals it."""
        return pb.encode_message(
            [
                (1, int(self.type) or None),
                (2, self.key or None),
                (3, self.record.to_bytes() if self.record is not None else None),
                *[(8, peer.to_bytes()) for peer in self.closer_peers],
                *[(9, peer.to_bytes()) for peer in self.provider_peers],
            ]
        )

    @classmethod
    def from_bytes(
        cls,
        raw: bytes,
        *,
        max_size: int = DEFAULT_MAX_MESSAGE,
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> KadMessage:
        """Strictly decode untrusted bytes (one frame's payload).

        Size and peer counts are checked before any peer is parsed, so a reply
        stuffed with thousands of "closer" peers costs us one scan, not a parse.
        A message with more protobuf fields than `max_peers` could explain is
        refused while scanning, as a plain `DecodeError`.
        """
        if len(raw) > max_size:
            raise LimitExceeded(f"kad message of {len(raw)} bytes exceeds {max_size}")
        fields = pb.decode_message(raw, max_fields=2 * max_peers + _MESSAGE_OVERHEAD_FIELDS)
        closer_raw = pb.get_repeated_bytes(fields, 8)
        provider_raw = pb.get_repeated_bytes(fields, 9)
        if len(closer_raw) > max_peers or len(provider_raw) > max_peers:
            raise LimitExceeded(
                f"kad message lists {len(closer_raw)} closer and {len(provider_raw)} "
                f"provider peers; the limit is {max_peers} each"
            )
        type_number = pb.get_int(fields, 1) or 0
        try:
            message_type = MessageType(type_number)
        except ValueError:
            raise DecodeError(f"unknown kad message type {type_number}") from None
        key = pb.get_bytes(fields, 2) or b""
        record_raw = pb.get_bytes(fields, 3)
        record = Record.from_bytes(record_raw) if record_raw is not None else None
        if message_type is MessageType.PUT_VALUE and (record is None or record.key != key):
            raise DecodeError("PUT_VALUE without a record for the message key")
        return cls(
            type=message_type,
            key=key,
            record=record,
            closer_peers=tuple(PeerInfo.from_bytes(p) for p in closer_raw),
            provider_peers=tuple(PeerInfo.from_bytes(p) for p in provider_raw),
        )
