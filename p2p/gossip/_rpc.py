"""The pubsub RPC with gossipsub v1.1 control messages, encoded as go/js-libp2p do.

One protobuf `RPC` carries subscriptions, published messages and control
messages. Untrusted bytes are decoded strictly into typed, bounded objects: the
frame size, the number of subscriptions, messages, control entries and message
ids are checked before anything is copied, and every failure is a `DecodeError`
(or its subclass `LimitExceeded`), so the shell resets exactly the stream that
lied. A `Message` keeps the exact bytes it arrived in: they are what its author
signed and what we forward, unknown fields included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .. import _protobuf as pb
from .._errors import DecodeError, LimitExceeded
from .._identity import PeerId
from .._wire import decode_uvarint

DEFAULT_MAX_RPC: Final = 1 << 20  # go-libp2p-pubsub's default; js uses the same
_RPC_OVERHEAD_FIELDS: Final = 16  # control plus fields of newer versions we skip
_MESSAGE_FIELDS: Final = 32  # the six known fields and room for extensions


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcLimits:
    """Caps on one decoded RPC; honest peers stay far below every one."""

    max_size: int = DEFAULT_MAX_RPC
    max_subscriptions: int = 1024
    max_messages: int = 1024
    max_control_entries: int = 1024  # IHAVE + IWANT + GRAFT + PRUNE entries
    max_message_ids: int = 5000  # over all IHAVE and IWANT entries (go's MaxIHaveLength)
    max_topic_bytes: int = 1024
    max_message_id_bytes: int = 256
    max_prune_peers: int = 64


@dataclass(frozen=True, slots=True)
class SubOpts:
    """A peer joins (`subscribe`) or leaves a topic."""

    subscribe: bool
    topic: str

    def to_bytes(self) -> bytes:
        """The protobuf `RPC.SubOpts` (proto2: `subscribe` is always present)."""
        return pb.encode_message([(1, int(self.subscribe)), (2, self.topic)])


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """A published message, and `raw`, the exact encoding that travels.

    `from_peer` is the author's binary peer id and `seqno` 8 big-endian bytes,
    kept raw because a message is checked (`verify_message`) only after the
    cheap dedup by id. Only the decoder passes `raw`; otherwise it is the
    canonical encoding (fields in number order, as go and js sign). A copy made
    with `dataclasses.replace` keeps the original `raw`: build a new one instead.
    """

    topic: str
    data: bytes = b""
    from_peer: bytes | None = None
    seqno: bytes | None = None
    signature: bytes | None = None
    key: bytes | None = None
    raw: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.raw:
            raw = pb.encode_message(
                [
                    (1, self.from_peer),
                    (2, self.data),
                    (3, self.seqno),
                    (4, self.topic),
                    (5, self.signature),
                    (6, self.key),
                ]
            )
            object.__setattr__(self, "raw", raw)

    @property
    def author(self) -> PeerId:
        """Who published it: safe on delivered messages, which were verified; on others
        a missing or malformed `from` raises `DecodeError`."""
        if self.from_peer is None:
            raise DecodeError("message has no author")
        return PeerId.from_bytes(self.from_peer)

    @property
    def id(self) -> bytes:
        """The default libp2p message id: author peer id bytes then seqno bytes."""
        return (self.from_peer or b"") + (self.seqno or b"")

    @classmethod
    def from_bytes(cls, raw: bytes, limits: RpcLimits) -> Message:
        """Decode one message; a repeated known field is refused (ambiguous to sign)."""
        fields = _message_fields(raw)
        topic_raw = fields[4]
        if topic_raw is None:
            raise DecodeError("pubsub message without a topic")
        try:
            topic = topic_raw.decode()
        except UnicodeDecodeError:
            raise DecodeError("pubsub topic is not UTF-8") from None
        _check_topic(topic, limits)
        return cls(
            topic=topic,
            data=fields[2] or b"",
            from_peer=fields[1],
            seqno=fields[3],
            signature=fields[5],
            key=fields[6],
            raw=raw,
        )


def _message_fields(raw: bytes) -> list[bytes | None]:
    """Fields 1-6 of a `Message` by number, in one pass (every copy of every message
    is parsed, duplicates included, so this is the hot path); others are skipped."""
    values: list[bytes | None] = [None] * 7
    pos = 0
    end = len(raw)
    count = 0
    while pos < end:
        count += 1
        if count > _MESSAGE_FIELDS:
            raise DecodeError("pubsub message has too many fields")
        if raw[pos] < 0x80:  # one-byte tags and lengths are the rule: skip the general decoder
            key = raw[pos]
            pos += 1
        else:
            item = decode_uvarint(raw, pos)
            if item is None:
                raise DecodeError("truncated protobuf tag")
            key, pos = item
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("protobuf field number 0")
        known = number <= 6
        if wire_type == pb.LEN:
            if pos < end and raw[pos] < 0x80:
                length = raw[pos]
                pos += 1
            else:
                item = decode_uvarint(raw, pos)
                if item is None:
                    raise DecodeError("truncated protobuf length")
                length, pos = item
            stop = pos + length
            if stop > end:
                raise DecodeError("protobuf field runs past the end")
            if known:
                if values[number] is not None:
                    raise DecodeError(f"pubsub message repeats field {number}")
                values[number] = raw[pos:stop]
            pos = stop
            continue
        if known:
            raise DecodeError(f"pubsub message field {number} has wire type {wire_type}")
        if wire_type == pb.VARINT:
            item = decode_uvarint(raw, pos)
            if item is None:
                raise DecodeError("truncated protobuf varint")
            pos = item[1]
        elif wire_type in (pb.I64, pb.I32):
            pos += 8 if wire_type == pb.I64 else 4
            if pos > end:
                raise DecodeError("truncated protobuf fixed field")
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire_type}")
    return values


@dataclass(frozen=True, slots=True)
class IHave:
    """Gossip: ids of messages on `topic` the sender holds in its cache."""

    topic: str
    message_ids: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        """The protobuf `ControlIHave`."""
        return pb.encode_message([(1, self.topic), *[(2, mid) for mid in self.message_ids]])


@dataclass(frozen=True, slots=True)
class IWant:
    """A request for the full messages behind ids announced in an IHAVE."""

    message_ids: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        """The protobuf `ControlIWant`."""
        return pb.encode_message([(1, mid) for mid in self.message_ids])


@dataclass(frozen=True, slots=True)
class Graft:
    """The sender added us to its mesh for `topic`."""

    topic: str

    def to_bytes(self) -> bytes:
        """The protobuf `ControlGraft`."""
        return pb.encode_message([(1, self.topic)])


@dataclass(frozen=True, slots=True)
class PrunePeer:
    """A peer offered in a PRUNE for peer exchange (v1.1 PX), carried but not acted on."""

    peer_id: bytes | None = None
    signed_peer_record: bytes | None = None

    def to_bytes(self) -> bytes:
        """The protobuf `PeerInfo` of gossipsub v1.1."""
        return pb.encode_message([(1, self.peer_id), (2, self.signed_peer_record)])


@dataclass(frozen=True, slots=True)
class Prune:
    """The sender removed us from its mesh for `topic`; do not graft back for `backoff` s."""

    topic: str
    peers: tuple[PrunePeer, ...] = ()
    backoff: int | None = None

    def to_bytes(self) -> bytes:
        """The protobuf `ControlPrune` (v1.1 fields only when set)."""
        return pb.encode_message(
            [(1, self.topic), *[(2, p.to_bytes()) for p in self.peers], (3, self.backoff)]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Control:
    """The gossipsub control messages riding in one RPC."""

    ihave: tuple[IHave, ...] = ()
    iwant: tuple[IWant, ...] = ()
    graft: tuple[Graft, ...] = ()
    prune: tuple[Prune, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ihave or self.iwant or self.graft or self.prune)

    def to_bytes(self) -> bytes:
        """The protobuf `ControlMessage`."""
        return pb.encode_message(
            [
                *[(1, x.to_bytes()) for x in self.ihave],
                *[(2, x.to_bytes()) for x in self.iwant],
                *[(3, x.to_bytes()) for x in self.graft],
                *[(4, x.to_bytes()) for x in self.prune],
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes, limits: RpcLimits) -> Control:
        """Decode control messages, counting entries and ids against `limits` before parsing."""
        fields = pb.decode_message(
            raw, max_fields=limits.max_control_entries + _RPC_OVERHEAD_FIELDS
        )
        entries = [pb.get_repeated_bytes(fields, n) for n in (1, 2, 3, 4)]
        if sum(len(e) for e in entries) > limits.max_control_entries:
            raise LimitExceeded(
                f"control message has more than {limits.max_control_entries} entries"
            )
        ids_left = limits.max_message_ids
        ihaves = []
        for item in entries[0]:
            f = pb.decode_message(item, max_fields=ids_left + _RPC_OVERHEAD_FIELDS)
            ids = _message_ids(pb.get_repeated_bytes(f, 2), ids_left, limits)
            ids_left -= len(ids)
            ihaves.append(IHave(_required_topic(f, limits), ids))
        iwants = []
        for item in entries[1]:
            f = pb.decode_message(item, max_fields=ids_left + _RPC_OVERHEAD_FIELDS)
            ids = _message_ids(pb.get_repeated_bytes(f, 1), ids_left, limits)
            ids_left -= len(ids)
            iwants.append(IWant(ids))
        grafts = [
            Graft(_required_topic(pb.decode_message(item, max_fields=_MESSAGE_FIELDS), limits))
            for item in entries[2]
        ]
        prunes = [_prune_from_bytes(item, limits) for item in entries[3]]
        return cls(
            ihave=tuple(ihaves), iwant=tuple(iwants), graft=tuple(grafts), prune=tuple(prunes)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RPC:
    """One pubsub RPC: what travels in each length-prefixed frame."""

    subscriptions: tuple[SubOpts, ...] = ()
    publish: tuple[Message, ...] = ()
    control: Control | None = None

    def to_bytes(self) -> bytes:
        """The protobuf `RPC`; published messages go out in their exact original bytes."""
        return pb.encode_message(
            [
                *[(1, sub.to_bytes()) for sub in self.subscriptions],
                *[(2, msg.raw) for msg in self.publish],
                (3, self.control.to_bytes() if self.control else None),
            ]
        )

    @classmethod
    def from_bytes(cls, raw: bytes, limits: RpcLimits | None = None) -> RPC:
        """Strictly decode untrusted bytes (one frame's payload) within `limits`."""
        limits = limits or RpcLimits()
        if len(raw) > limits.max_size:
            raise LimitExceeded(f"pubsub RPC of {len(raw)} bytes exceeds {limits.max_size}")
        fields = pb.decode_message(
            raw,
            max_fields=limits.max_subscriptions + limits.max_messages + _RPC_OVERHEAD_FIELDS,
        )
        subs_raw = pb.get_repeated_bytes(fields, 1)
        messages_raw = pb.get_repeated_bytes(fields, 2)
        if len(subs_raw) > limits.max_subscriptions:
            raise LimitExceeded(f"RPC has more than {limits.max_subscriptions} subscriptions")
        if len(messages_raw) > limits.max_messages:
            raise LimitExceeded(f"RPC has more than {limits.max_messages} messages")
        control_parts = pb.get_repeated_bytes(fields, 3)  # repeats merge, as protobuf says
        control = Control.from_bytes(b"".join(control_parts), limits) if control_parts else None
        return cls(
            subscriptions=tuple(_subopts_from_bytes(s, limits) for s in subs_raw),
            publish=tuple(Message.from_bytes(m, limits) for m in messages_raw),
            control=control if control else None,
        )


def _subopts_from_bytes(raw: bytes, limits: RpcLimits) -> SubOpts:
    fields = pb.decode_message(raw, max_fields=_MESSAGE_FIELDS)
    return SubOpts(bool(pb.get_int(fields, 1)), _required_topic(fields, limits, 2))


def _prune_from_bytes(raw: bytes, limits: RpcLimits) -> Prune:
    fields = pb.decode_message(raw, max_fields=limits.max_prune_peers + _RPC_OVERHEAD_FIELDS)
    peers_raw = pb.get_repeated_bytes(fields, 2)
    if len(peers_raw) > limits.max_prune_peers:
        raise LimitExceeded(f"PRUNE offers more than {limits.max_prune_peers} peers")
    peers = []
    for item in peers_raw:
        f = pb.decode_message(item, max_fields=_MESSAGE_FIELDS)
        peers.append(PrunePeer(pb.get_bytes(f, 1), pb.get_bytes(f, 2)))
    return Prune(_required_topic(fields, limits), tuple(peers), pb.get_int(fields, 3))


def _required_topic(fields: pb.Fields, limits: RpcLimits, number: int = 1) -> str:
    topic = pb.get_str(fields, number)
    if topic is None:
        raise DecodeError("pubsub entry without a topic")
    _check_topic(topic, limits)
    return topic


def _check_topic(topic: str, limits: RpcLimits) -> None:
    if len(topic) > limits.max_topic_bytes or len(topic.encode()) > limits.max_topic_bytes:
        raise LimitExceeded(f"topic longer than {limits.max_topic_bytes} bytes")


def _message_ids(ids: list[bytes], ids_left: int, limits: RpcLimits) -> tuple[bytes, ...]:
    if len(ids) > ids_left:
        raise LimitExceeded(f"RPC names more than {limits.max_message_ids} message ids")
    for mid in ids:
        if len(mid) > limits.max_message_id_bytes:
            raise LimitExceeded(f"message id longer than {limits.max_message_id_bytes} bytes")
    return tuple(ids)
