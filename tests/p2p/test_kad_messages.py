"""kad-dht messages and signed node records: go/js-identical bytes, strict bounded decoding."""

from __future__ import annotations

import contextlib

import nacl.signing
import pytest
from fuzzing import mutations
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dbloom.p2p import _protobuf as pb
from dbloom.p2p._errors import DecodeError, LimitExceeded, LocalProtocolError
from dbloom.p2p._identity import KeyPair, KeyType, PeerId, PublicKey
from dbloom.p2p._multiaddr import Multiaddr
from dbloom.p2p._wire import encode_uvarint
from dbloom.p2p.kad._envelope import (
    MAX_SEQ,
    NODE_RECORD_DOMAIN,
    NODE_RECORD_PAYLOAD_TYPE,
    NodeEnvelope,
    RecordRejected,
    open_node_record,
    seal_node_record,
)
from dbloom.p2p.kad._messages import (
    DEFAULT_MAX_MESSAGE,
    MAX_PEER_ADDRS,
    MAX_RECORD_SIZE,
    ConnectionType,
    KadMessage,
    MessageType,
    PeerInfo,
    Record,
)

KEY = KeyPair.from_seed(b"\x01" * 32)
OTHER = KeyPair.from_seed(b"\x02" * 32)
PID = KEY.peer_id.multihash
ADDR = Multiaddr.parse("/ip4/127.0.0.1/tcp/4001")
ADDR_BYTES = b"\x04\x7f\x00\x00\x01\x06\x0f\xa1"  # /ip4 127.0.0.1 /tcp 4001
UNKNOWN_ADDR = b"\xff\xff\x03\x00"  # protocol code 0xffff: not one we speak


def peers(n: int) -> tuple[PeerInfo, ...]:
    return tuple(
        PeerInfo(peer_id=KeyPair.from_seed(bytes([i % 256, i // 256]) * 16).peer_id)
        for i in range(n)
    )


# --- exact bytes, as go-libp2p-kad-dht (proto3) and js-libp2p (protons) produce them ---


def test_find_node_request_bytes() -> None:
    msg = KadMessage(type=MessageType.FIND_NODE, key=PID)
    assert len(PID) == 0x26
    assert msg.to_bytes() == b"\x08\x04" + b"\x12\x26" + PID


def test_ping_bytes() -> None:
    assert KadMessage(type=MessageType.PING).to_bytes() == b"\x08\x05"


def test_put_value_bytes_leave_out_the_zero_type() -> None:
    record = Record(key=b"/v/k", value=b"hi", time_received="2024-01-01T00:00:00Z")
    msg = KadMessage(type=MessageType.PUT_VALUE, key=b"/v/k", record=record)
    record_bytes = b"\x0a\x04/v/k" + b"\x12\x02hi" + b"\x2a\x142024-01-01T00:00:00Z"
    assert len(record_bytes) == 0x20
    assert msg.to_bytes() == b"\x12\x04/v/k" + b"\x1a\x20" + record_bytes


def test_get_providers_response_bytes() -> None:
    msg = KadMessage(
        type=MessageType.GET_PROVIDERS,
        key=b"\x12\x20" + b"\xaa" * 32,
        closer_peers=(
            PeerInfo(peer_id=KEY.peer_id, addrs=(ADDR,), connection=ConnectionType.CONNECTED),
        ),
        provider_peers=(PeerInfo(peer_id=KEY.peer_id),),
    )
    closer = b"\x0a\x26" + PID + b"\x12\x08" + ADDR_BYTES + b"\x18\x01"
    provider = b"\x0a\x26" + PID  # NOT_CONNECTED is the zero value: left out
    assert len(closer) == 0x34 and len(provider) == 0x28
    assert msg.to_bytes() == (
        b"\x08\x03"
        + b"\x12\x22\x12\x20"
        + b"\xaa" * 32
        + b"\x42\x34"
        + closer
        + b"\x4a\x28"
        + provider
    )


def test_decodes_proto2_and_js_encodings() -> None:
    # rust-libp2p writes the zero type and clusterLevelRaw; js writes connection=0 explicitly.
    peer = b"\x0a\x26" + PID + b"\x12\x08" + ADDR_BYTES + b"\x18\x00"
    raw = b"\x08\x00" + b"\x50\x00" + b"\x12\x01k" + b"\x1a\x07\x0a\x01k\x12\x02hi" + b"\x42\x34"
    msg = KadMessage.from_bytes(raw + peer)
    assert msg == KadMessage(
        type=MessageType.PUT_VALUE,
        key=b"k",
        record=Record(key=b"k", value=b"hi"),
        closer_peers=(PeerInfo(peer_id=KEY.peer_id, addrs=(ADDR,)),),
    )


# --- round trips ---

ALL_KINDS = [
    KadMessage(type=MessageType.PUT_VALUE, key=b"/a/b", record=Record(key=b"/a/b", value=b"v")),
    KadMessage(type=MessageType.GET_VALUE, key=b"/a/b"),
    KadMessage(
        type=MessageType.GET_VALUE,
        key=b"/a/b",
        record=Record(key=b"/a/b", value=b"v", time_received="2025-06-01T12:00:00Z"),
        closer_peers=peers(20),
    ),
    KadMessage(type=MessageType.ADD_PROVIDER, key=b"cid", provider_peers=peers(1)),
    KadMessage(type=MessageType.GET_PROVIDERS, key=b"cid"),
    KadMessage(
        type=MessageType.GET_PROVIDERS,
        key=b"cid",
        closer_peers=peers(3),
        provider_peers=(
            PeerInfo(peer_id=OTHER.peer_id, addrs=(ADDR,), connection=ConnectionType.CAN_CONNECT),
        ),
    ),
    KadMessage(type=MessageType.FIND_NODE, key=PID),
    KadMessage(
        type=MessageType.FIND_NODE,
        key=PID,
        closer_peers=(
            PeerInfo(
                peer_id=KEY.peer_id,
                addrs=(ADDR, Multiaddr.parse(f"/dns4/example.com/tcp/1/p2p/{KEY.peer_id}")),
                connection=ConnectionType.CANNOT_CONNECT,
            ),
        ),
    ),
    KadMessage(type=MessageType.PING),
]


@pytest.mark.parametrize("msg", ALL_KINDS)
def test_round_trip(msg: KadMessage) -> None:
    assert KadMessage.from_bytes(msg.to_bytes()) == msg


def test_every_message_type_is_covered() -> None:
    assert {m.type for m in ALL_KINDS} == set(MessageType)


connection_types = st.sampled_from(ConnectionType)
peer_infos = st.builds(
    PeerInfo,
    peer_id=st.sampled_from([KEY.peer_id, OTHER.peer_id]),
    addrs=st.lists(st.just(ADDR), max_size=MAX_PEER_ADDRS).map(tuple),
    connection=connection_types,
)


@st.composite
def kad_messages(draw: st.DrawFn) -> KadMessage:
    kind = draw(st.sampled_from(MessageType))
    key = draw(st.binary(max_size=64))
    record = None
    if kind is MessageType.PUT_VALUE or draw(st.booleans()):
        record = Record(
            key=key if kind is MessageType.PUT_VALUE else draw(st.binary(max_size=64)),
            value=draw(st.binary(max_size=256)),
            time_received=draw(st.text(max_size=30)),
        )
    return KadMessage(
        type=kind,
        key=key,
        record=record,
        closer_peers=tuple(draw(st.lists(peer_infos, max_size=5))),
        provider_peers=tuple(draw(st.lists(peer_infos, max_size=5))),
    )


@given(kad_messages())
def test_any_message_round_trips(msg: KadMessage) -> None:
    assert KadMessage.from_bytes(msg.to_bytes()) == msg


# --- hostile input ---

VALID = ALL_KINDS[5].to_bytes()


@given(st.binary(max_size=512))
@example(b"\x08\x06")  # unknown type
@example(b"\x08\x04\x42\x00")  # peer without an id
def test_random_bytes_raise_only_decode_errors(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        KadMessage.from_bytes(raw)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mutations(VALID))
def test_mutated_messages_raise_only_decode_errors(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        KadMessage.from_bytes(raw)


def test_unknown_message_type_is_refused() -> None:
    with pytest.raises(DecodeError, match="unknown kad message type 6"):
        KadMessage.from_bytes(b"\x08\x06")


def test_wrongly_typed_fields_are_refused() -> None:
    with pytest.raises(DecodeError):
        KadMessage.from_bytes(b"\x0a\x01x")  # type as bytes
    with pytest.raises(DecodeError):
        KadMessage.from_bytes(b"\x08\x04\x10\x01")  # key as a varint


def test_peer_with_undecodable_id_is_refused() -> None:
    for bad_id in (b"", b"\x00\x03abc", b"\x12\x05short", b"\x99\x01\x02ab"):
        peer = pb.encode_message([(1, bad_id), (2, ADDR_BYTES)])
        with pytest.raises(DecodeError):
            KadMessage.from_bytes(pb.encode_message([(1, 4), (8, peer)]))
    no_id = pb.encode_message([(2, ADDR_BYTES)])
    with pytest.raises(DecodeError):
        KadMessage.from_bytes(pb.encode_message([(1, 4), (9, no_id)]))


def test_unparsable_addrs_are_skipped_and_at_most_16_kept() -> None:
    addrs = [UNKNOWN_ADDR, b"\x04\x7f", ADDR_BYTES]
    addrs += [Multiaddr.parse(f"/ip4/10.0.0.{i}/tcp/1").to_bytes() for i in range(20)]
    peer = pb.encode_message([(1, PID), *[(2, a) for a in addrs], (3, 2)])
    msg = KadMessage.from_bytes(pb.encode_message([(1, 4), (8, peer)]))
    (info,) = msg.closer_peers
    assert info.peer_id == KEY.peer_id
    assert info.connection is ConnectionType.CAN_CONNECT
    assert len(info.addrs) == MAX_PEER_ADDRS
    assert info.addrs[0] == ADDR
    assert info.addrs[-1] == Multiaddr.parse("/ip4/10.0.0.14/tcp/1")


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=40))
def test_bad_addrs_never_cost_the_peer(addrs: list[bytes]) -> None:
    peer = pb.encode_message([(1, PID), *[(2, a) for a in addrs]])
    info = PeerInfo.from_bytes(peer)
    assert info.peer_id == KEY.peer_id
    assert len(info.addrs) <= MAX_PEER_ADDRS


def test_unknown_connection_type_means_not_connected() -> None:
    peer = pb.encode_message([(1, PID), (3, 9)])
    msg = KadMessage.from_bytes(pb.encode_message([(1, 4), (8, peer)]))
    assert msg.closer_peers[0].connection is ConnectionType.NOT_CONNECTED


def test_ignored_fields() -> None:
    # clusterLevelRaw (10), the removed Record author/signature (3, 4), unknown fields.
    record = pb.encode_message([(1, b"k"), (2, b"v"), (3, b"author"), (4, b"sig"), (9, 1)])
    raw = pb.encode_message([(1, 1), (10, 7), (2, b"k"), (3, record), (15, b"future")])
    assert KadMessage.from_bytes(raw) == KadMessage(
        type=MessageType.GET_VALUE, key=b"k", record=Record(key=b"k", value=b"v")
    )


def test_time_received_must_be_utf8() -> None:
    record = pb.encode_message([(1, b"k"), (2, b"v"), (5, b"\xff")])
    with pytest.raises(DecodeError):
        KadMessage.from_bytes(pb.encode_message([(1, 1), (3, record)]))


def test_put_value_needs_a_record_for_its_key() -> None:
    with pytest.raises(DecodeError):
        KadMessage.from_bytes(b"\x12\x01k")
    mismatched = pb.encode_message([(2, b"k"), (3, Record(key=b"j", value=b"v").to_bytes())])
    with pytest.raises(DecodeError):
        KadMessage.from_bytes(mismatched)
    with pytest.raises(LocalProtocolError):
        KadMessage(type=MessageType.PUT_VALUE, key=b"k")
    with pytest.raises(LocalProtocolError):
        KadMessage(type=MessageType.PUT_VALUE, key=b"k", record=Record(key=b"j", value=b"v"))


def test_64_peers_per_list_are_accepted_65_refused() -> None:
    for field in ("closer_peers", "provider_peers"):
        ok = KadMessage(type=MessageType.GET_PROVIDERS, key=b"k", **{field: peers(64)})
        assert KadMessage.from_bytes(ok.to_bytes()) == ok
        too_many = KadMessage(type=MessageType.GET_PROVIDERS, key=b"k", **{field: peers(65)})
        with pytest.raises(LimitExceeded):
            KadMessage.from_bytes(too_many.to_bytes())
    both = KadMessage(
        type=MessageType.GET_PROVIDERS, key=b"k", closer_peers=peers(64), provider_peers=peers(64)
    )
    assert KadMessage.from_bytes(both.to_bytes()) == both
    assert KadMessage.from_bytes(too_many.to_bytes(), max_peers=65) == too_many


def test_ten_thousand_closer_peers_are_refused_unparsed() -> None:
    entry = pb.encode_message([(8, b"\x0a\x26" + PID)])
    flood = b"\x08\x04" + entry * 10_000
    with pytest.raises(LimitExceeded):
        KadMessage.from_bytes(flood)  # over the size limit
    with pytest.raises(DecodeError):
        KadMessage.from_bytes(flood, max_size=len(flood))  # over the field count


def test_record_of_64_kib_is_accepted_bigger_refused() -> None:
    key = b"/dbloom/node/x"
    ok = KadMessage(
        type=MessageType.GET_VALUE, key=key, record=Record(key=key, value=b"\x00" * MAX_RECORD_SIZE)
    )
    assert KadMessage.from_bytes(ok.to_bytes()) == ok
    big = pb.encode_message([(1, key), (2, b"\x00" * (MAX_RECORD_SIZE + 1))])
    with pytest.raises(LimitExceeded):
        KadMessage.from_bytes(pb.encode_message([(1, 1), (2, key), (3, big)]))
    with pytest.raises(LocalProtocolError):
        Record(key=key, value=b"\x00" * (MAX_RECORD_SIZE + 1))


def test_oversize_message_is_refused() -> None:
    raw = pb.encode_message([(1, 1), (2, b"\x00" * DEFAULT_MAX_MESSAGE)])
    with pytest.raises(LimitExceeded):
        KadMessage.from_bytes(raw)
    small = KadMessage(type=MessageType.GET_VALUE, key=b"k" * 100).to_bytes()
    with pytest.raises(LimitExceeded):
        KadMessage.from_bytes(small, max_size=50)


# --- signed node records ---


def test_seal_and_open() -> None:
    sealed = seal_node_record(KEY, 7, b"hello")
    assert open_node_record(sealed) == NodeEnvelope(
        peer_id=KEY.peer_id, public_key=KEY.public_key, seq=7, data=b"hello"
    )
    empty = open_node_record(seal_node_record(KEY, 0, b""))
    assert (empty.seq, empty.data) == (0, b"")
    assert open_node_record(seal_node_record(KEY, MAX_SEQ, b"x")).seq == MAX_SEQ


def test_envelope_layout_follows_rfc_0002() -> None:
    sealed = seal_node_record(KEY, 300, b"data")
    fields = pb.decode_message(sealed)
    assert sorted(fields) == [1, 2, 3, 5]
    assert pb.get_bytes(fields, 1) == KEY.public_key.to_bytes()
    assert pb.get_bytes(fields, 2) == b"/dbloom/node-record/1"
    payload = pb.get_bytes(fields, 3)
    assert payload == b"\x08\xac\x02" + b"\x12\x04data"
    signed = b"\x12dbloom-node-record" + b"\x15/dbloom/node-record/1" + b"\x09" + payload
    signature = pb.get_bytes(fields, 5)
    assert signature is not None
    nacl.signing.VerifyKey(KEY.public_key.data).verify(signed, signature)


def _envelope(
    key: bytes, payload_type: bytes, payload: bytes, signer: KeyPair, signed_type: bytes
) -> bytes:
    signed = b"".join(
        encode_uvarint(len(p)) + p for p in (NODE_RECORD_DOMAIN, signed_type, payload)
    )
    return pb.encode_message([(1, key), (2, payload_type), (3, payload), (5, signer.sign(signed))])


def reason(raw: bytes) -> str:
    with pytest.raises(RecordRejected) as info:
        open_node_record(raw)
    return info.value.reason


def test_tampered_records_are_refused() -> None:
    sealed = seal_node_record(KEY, 1, b"hello")
    assert reason(sealed.replace(b"hello", b"jello")) == "bad-signature"
    payload = pb.encode_message([(1, 1), (2, b"hello")])
    pub = KEY.public_key.to_bytes()
    assert (
        reason(_envelope(pub, NODE_RECORD_PAYLOAD_TYPE, payload, OTHER, NODE_RECORD_PAYLOAD_TYPE))
        == "bad-signature"
    )
    other_type = b"/libp2p/routing-state-record"
    assert reason(_envelope(pub, other_type, payload, KEY, other_type)) == "wrong-type"
    # Signed for another payload type, relabelled as ours: the signature no longer matches.
    assert (
        reason(_envelope(pub, NODE_RECORD_PAYLOAD_TYPE, payload, KEY, other_type))
        == "bad-signature"
    )
    # A signature under another domain (e.g. a libp2p peer record) is not ours either.
    foreign = pb.encode_message(
        [(1, pub), (2, NODE_RECORD_PAYLOAD_TYPE), (3, payload), (5, KEY.sign(payload))]
    )
    assert reason(foreign) == "bad-signature"


def test_truncated_records_are_refused() -> None:
    sealed = seal_node_record(KEY, 1, b"hello")
    for end in range(len(sealed)):
        with pytest.raises(RecordRejected):
            open_node_record(sealed[:end])
    assert reason(sealed[:-1]) == "malformed"


def test_other_refusals() -> None:
    assert reason(b"\xff") == "malformed"
    big = seal_node_record(KEY, 1, b"x" * 60_000)
    assert open_node_record(big).data == b"x" * 60_000
    with pytest.raises(RecordRejected) as info:
        open_node_record(big, max_size=1000)
    assert info.value.reason == "too-large"
    rsa = PublicKey(KeyType.RSA, b"\x30" * 40).to_bytes()
    payload = pb.encode_message([(1, 1)])
    rsa_env = _envelope(rsa, NODE_RECORD_PAYLOAD_TYPE, payload, KEY, NODE_RECORD_PAYLOAD_TYPE)
    assert reason(rsa_env) == "unsupported-key"
    bad_payload = b"\x0a\x05abc"  # a field running past the payload's end
    pub = KEY.public_key.to_bytes()
    signed_junk = _envelope(
        pub, NODE_RECORD_PAYLOAD_TYPE, bad_payload, KEY, NODE_RECORD_PAYLOAD_TYPE
    )
    assert reason(signed_junk) == "malformed"


def test_seal_refuses_what_open_would_refuse() -> None:
    with pytest.raises(ValueError):
        seal_node_record(KEY, -1, b"")
    with pytest.raises(ValueError):
        seal_node_record(KEY, MAX_SEQ + 1, b"")
    with pytest.raises(LocalProtocolError):
        seal_node_record(KEY, 1, b"x" * 65_536)


SEALED = seal_node_record(KEY, 5, b"node record data")


@given(st.binary(max_size=256))
def test_random_envelopes_raise_only_record_rejected(raw: bytes) -> None:
    with contextlib.suppress(RecordRejected):
        open_node_record(raw)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mutations(SEALED))
def test_mutated_envelopes_raise_only_record_rejected(raw: bytes) -> None:
    try:
        env = open_node_record(raw)
    except RecordRejected:
        return
    # Anything that opens is exactly what KEY signed (mutations outside the signed part).
    assert (env.peer_id, env.seq, env.data) == (KEY.peer_id, 5, b"node record data")


def test_peer_id_of_envelope_is_the_signer() -> None:
    env = open_node_record(seal_node_record(OTHER, 1, b""))
    assert env.peer_id == OTHER.peer_id == PeerId.from_public_key(env.public_key)
