"""Every decoder of untrusted bytes raises our typed error, or succeeds — never anything else."""

from __future__ import annotations

import contextlib

import pytest
from fuzzing import mutations
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dbloom.p2p import (
    DecodeError,
    IdentifyInfo,
    KeyPair,
    Multiaddr,
    PeerId,
    ProtocolError,
    PublicKey,
)
from dbloom.p2p import _protobuf as pb
from dbloom.p2p._wire import FrameReader, decode_uvarint, encode_frame, encode_uvarint
from dbloom.p2p.multistream import NEED_DATA, Negotiator, ProtocolSelected, Role, encode_message
from dbloom.p2p.noise import HandshakePayload

KEY = KeyPair.from_seed(b"\x01" * 32)
VALID_ADDR = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/4001/p2p/{KEY.peer_id}")


@given(st.integers(0, (1 << 63) - 1))
def test_uvarint_round_trip(value: int) -> None:
    raw = encode_uvarint(value)
    assert decode_uvarint(raw) == (value, len(raw))


@given(st.binary(max_size=16))
def test_uvarint_decoder_is_strict(raw: bytes) -> None:
    try:
        result = decode_uvarint(raw)
    except DecodeError:
        return
    if result is not None:
        value, end = result
        assert encode_uvarint(value) == raw[:end]


def test_uvarint_rejects_overlong_and_nonminimal() -> None:
    with pytest.raises(DecodeError):
        decode_uvarint(b"\x80\x00")
    with pytest.raises(DecodeError):
        decode_uvarint(b"\xff" * 10)


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 50))
def test_frames_survive_any_chunking(frames: list[bytes], chunk: int) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    reader = FrameReader(max_size=300)
    out = []
    for i in range(0, len(wire), chunk):
        reader.receive_data(wire[i : i + chunk])
        while (frame := reader.next_frame()) is not None:
            out.append(frame)
    assert out == frames


def test_frame_reader_enforces_its_cap() -> None:
    reader = FrameReader(max_size=10)
    reader.receive_data(encode_uvarint(11))
    with pytest.raises(DecodeError):
        reader.next_frame()


@given(st.binary(max_size=512))
def test_frame_reader_random_bytes(raw: bytes) -> None:
    reader = FrameReader(max_size=128)
    reader.receive_data(raw)
    try:
        while reader.next_frame() is not None:
            pass
    except DecodeError:
        pass


@given(st.binary(max_size=512))
def test_protobuf_random_bytes(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        pb.decode_message(raw)


@given(
    st.lists(
        st.tuples(st.integers(1, 100), st.one_of(st.integers(0, 1 << 62), st.binary(max_size=40)))
    )
)
def test_protobuf_round_trip(fields: list[tuple[int, int | bytes]]) -> None:
    decoded = pb.decode_message(pb.encode_message(fields))
    expected: dict[int, list[int | bytes]] = {}
    for number, value in fields:
        expected.setdefault(number, []).append(value)
    assert decoded == expected


@given(mutations(KEY.public_key.to_bytes()))
@example(KEY.public_key.to_bytes())
def test_public_key_decoder(raw: bytes) -> None:
    try:
        key = PublicKey.from_bytes(raw)
    except DecodeError:
        return
    assert isinstance(key, PublicKey)


@given(mutations(KEY.peer_id.multihash))
def test_peer_id_binary_decoder(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        PeerId.from_bytes(raw)


@given(
    st.one_of(
        st.text(max_size=80),
        mutations(str(KEY.peer_id).encode()).map(lambda b: b.decode("latin-1")),
    )
)
def test_peer_id_text_decoder(text: str) -> None:
    with contextlib.suppress(DecodeError):
        PeerId.from_string(text)


def test_peer_id_forms() -> None:
    peer = KEY.peer_id
    text = str(peer)
    assert text.startswith("12D3KooW")
    assert PeerId.from_string(text) == peer
    assert PeerId.from_string(peer.to_cid()) == peer
    assert peer.extract_public_key() == KEY.public_key
    assert peer.matches(KEY.public_key)
    with pytest.raises(DecodeError):
        PeerId.from_string("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi")


def test_known_peer_id_vector() -> None:
    # The ed25519 test vector from the peer-ids spec's test suite: key -> id.
    key = PublicKey.from_bytes(
        bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
    )
    assert str(key.peer_id) == "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


@given(mutations(VALID_ADDR.to_bytes()))
def test_multiaddr_binary_decoder(raw: bytes) -> None:
    try:
        addr = Multiaddr.from_bytes(raw)
    except DecodeError:
        return
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr


@given(
    st.one_of(
        st.text(max_size=80), mutations(str(VALID_ADDR).encode()).map(lambda b: b.decode("latin-1"))
    )
)
def test_multiaddr_text_decoder(text: str) -> None:
    try:
        addr = Multiaddr.parse(text)
    except DecodeError:
        return
    assert Multiaddr.parse(str(addr)) == addr


@pytest.mark.parametrize(
    "text",
    [
        "/ip4/127.0.0.1/tcp/4001",
        "/ip6/::1/tcp/0",
        "/dns4/localhost/tcp/80",
        "/dns6/example.org/tcp/443",
        "/memory/7",
        f"/ip4/127.0.0.1/tcp/1/p2p/{KEY.peer_id}/p2p-circuit/p2p/{KEY.peer_id}",
    ],
)
def test_multiaddr_round_trips(text: str) -> None:
    addr = Multiaddr.parse(text)
    assert str(addr) == text
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("ip4/1.2.3.4", "must start with"),
        ("/ip4/300.1.1.1/tcp/1", "invalid /ip4"),
        ("/ip4/127.0.0.1/tcp/70000", "port"),
        ("/ip4/127.0.0.1/tcp", "needs a value"),
        ("/foo/1", "unknown protocol"),
        ("/p2p/notapeer", "invalid /p2p"),
    ],
)
def test_multiaddr_errors_are_clear(text: str, needle: str) -> None:
    with pytest.raises(DecodeError, match=needle):
        Multiaddr.parse(text)


def test_multiaddr_accepts_ipfs_and_cid_peer_ids() -> None:
    addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/1/ipfs/{KEY.peer_id.to_cid()}")
    assert addr.peer_id == KEY.peer_id
    assert str(addr).endswith(f"/p2p/{KEY.peer_id}")


def _run_responder(raw: bytes) -> None:
    negotiator = Negotiator(Role.RESPONDER, ["/a/1.0.0"])
    negotiator.receive_data(raw)
    while True:
        event = negotiator.next_event()
        if event is NEED_DATA or isinstance(event, ProtocolSelected):
            return


VALID_PROPOSAL = (
    encode_message("/multistream/1.0.0") + encode_message("/b") + encode_message("/a/1.0.0")
)


@given(mutations(VALID_PROPOSAL))
def test_multistream_responder_random_input(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        _run_responder(raw)


@given(
    mutations(encode_message("/multistream/1.0.0") + encode_message("na") + encode_message("/b"))
)
def test_multistream_initiator_random_input(raw: bytes) -> None:
    negotiator = Negotiator(Role.INITIATOR, ["/a", "/b"])
    negotiator.receive_data(raw)
    with contextlib.suppress(ProtocolError):
        negotiator.next_event()


def test_multistream_pipelined_agreement_and_trailing_data() -> None:
    initiator = Negotiator(Role.INITIATOR, ["/x", "/a/1.0.0"])
    responder = Negotiator(Role.RESPONDER, ["/a/1.0.0"])
    responder.receive_data(initiator.data_to_send())
    assert responder.next_event() is NEED_DATA  # answered /x with na
    initiator.receive_data(responder.data_to_send())
    assert initiator.next_event() is NEED_DATA  # proposes /a/1.0.0 next
    responder.receive_data(initiator.data_to_send() + b"early bytes")
    assert responder.next_event() == ProtocolSelected(protocol="/a/1.0.0")
    assert responder.trailing_data() == b"early bytes"
    initiator.receive_data(responder.data_to_send())
    assert initiator.next_event() == ProtocolSelected(protocol="/a/1.0.0")


def test_multistream_limits_attempts() -> None:
    negotiator = Negotiator(Role.RESPONDER, ["/a"], max_attempts=3)
    negotiator.receive_data(encode_message("/multistream/1.0.0") + encode_message("/z") * 5)
    with pytest.raises(ProtocolError, match="proposals"):
        negotiator.next_event()


VALID_PAYLOAD = HandshakePayload(
    identity_key=KEY.public_key.to_bytes(), identity_sig=b"s" * 64, stream_muxers=("/yamux/1.0.0",)
).to_bytes()


@given(mutations(VALID_PAYLOAD))
@example(VALID_PAYLOAD)
def test_noise_payload_decoder(raw: bytes) -> None:
    try:
        payload = HandshakePayload.from_bytes(raw)
    except DecodeError:
        return
    assert HandshakePayload.from_bytes(payload.to_bytes()) == payload


VALID_IDENTIFY = IdentifyInfo(
    protocol_version="ipfs/0.1.0",
    agent_version="dbloom/test",
    public_key=KEY.public_key,
    listen_addrs=(VALID_ADDR.without_peer_id(),),
    observed_addr=Multiaddr.parse("/ip4/127.0.0.1/tcp/5555"),
    protocols=("/ipfs/ping/1.0.0", "/ipfs/id/1.0.0"),
).to_bytes()


@given(mutations(VALID_IDENTIFY))
@example(VALID_IDENTIFY)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_identify_decoder(raw: bytes) -> None:
    try:
        info = IdentifyInfo.from_bytes(raw)
    except DecodeError:
        return
    assert IdentifyInfo.from_bytes(info.to_bytes()) == info
