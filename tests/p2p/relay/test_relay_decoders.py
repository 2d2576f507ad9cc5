"""Relay messages and vouchers from strangers: our typed error or a value, never a crash."""

from __future__ import annotations

import contextlib

import pytest
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st

from dbloom.p2p import DecodeError, KeyPair, Multiaddr, MultiaddrError
from dbloom.p2p.relay import (
    HopMessage,
    HopType,
    Limit,
    Peer,
    Reservation,
    Status,
    StopMessage,
    StopType,
    dial_candidates,
    open_voucher,
    seal_voucher,
    split_circuit,
)
from dbloom.p2p.relay._messages import MAX_MESSAGE_BYTES

RELAY = KeyPair.from_seed(b"\x02" * 32)
PEER = KeyPair.from_seed(b"\x03" * 32)
ADDR = Multiaddr.parse(f"/ip4/10.0.0.1/tcp/4001/p2p/{RELAY.peer_id}")
VOUCHER = seal_voucher(RELAY, PEER.peer_id, 1_800_000_000)
RESERVE_OK = HopMessage(
    type=HopType.STATUS,
    status=Status.OK,
    reservation=Reservation(expire=1_800_000_000, addrs=(ADDR,), voucher=VOUCHER),
    limit=Limit(duration=120, data=1 << 17),
)
CONNECT = HopMessage(type=HopType.CONNECT, peer=Peer(PEER.peer_id, (ADDR,)))
STOP_CONNECT = StopMessage(type=StopType.CONNECT, peer=Peer(PEER.peer_id), limit=Limit(60, 0))


@pytest.mark.parametrize(
    "message",
    [RESERVE_OK, CONNECT, HopMessage(type=HopType.RESERVE), HopMessage(type=HopType.STATUS)],
)
def test_hop_round_trip(message: HopMessage) -> None:
    assert HopMessage.from_bytes(message.to_bytes()) == message


@pytest.mark.parametrize(
    "message", [STOP_CONNECT, StopMessage(type=StopType.STATUS, status=Status.OK)]
)
def test_stop_round_trip(message: StopMessage) -> None:
    assert StopMessage.from_bytes(message.to_bytes()) == message


def test_reserve_is_all_zero_type_on_the_wire() -> None:
    # RESERVE is 0; we still write the field, as go-libp2p and js-libp2p do.
    assert HopMessage(type=HopType.RESERVE).to_bytes() == b"\x08\x00"


def test_unknown_status_is_not_ok_and_unknown_type_is_an_error() -> None:
    assert HopMessage.from_bytes(b"\x08\x02\x28\x07").status is Status.UNUSED
    with pytest.raises(DecodeError):
        HopMessage.from_bytes(b"\x08\x09")
    with pytest.raises(DecodeError):
        HopMessage.from_bytes(b"")  # no type


def test_size_caps() -> None:
    with pytest.raises(DecodeError):
        HopMessage.from_bytes(b"\x08\x00" + b"\x32\x00" * MAX_MESSAGE_BYTES)
    many = Reservation(expire=1, addrs=(ADDR,) * 33)
    with pytest.raises(DecodeError):
        Reservation.from_bytes(many.to_bytes())


def test_voucher_round_trip_and_forgery() -> None:
    voucher = open_voucher(VOUCHER)
    assert (voucher.relay, voucher.peer, voucher.expiration) == (
        RELAY.peer_id,
        PEER.peer_id,
        1_800_000_000,
    )
    forged = bytearray(VOUCHER)
    forged[-70] ^= 1  # inside the payload, under the signature
    with pytest.raises(DecodeError):
        open_voucher(bytes(forged))


@given(mutations(RESERVE_OK.to_bytes()) | mutations(CONNECT.to_bytes()))
def test_hop_decoder_is_total(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        HopMessage.from_bytes(raw)


@given(mutations(STOP_CONNECT.to_bytes()))
def test_stop_decoder_is_total(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        StopMessage.from_bytes(raw)


@given(mutations(VOUCHER))
def test_voucher_decoder_is_total(raw: bytes) -> None:
    try:
        voucher = open_voucher(raw)
    except DecodeError:
        return
    assert voucher.relay == RELAY.peer_id  # only the relay's own signature opens


@given(st.binary(max_size=64))
def test_limit_and_peer_decoders_are_total(raw: bytes) -> None:
    for decode in (Limit.from_bytes, Peer.from_bytes, Reservation.from_bytes):
        with contextlib.suppress(DecodeError):
            decode(raw)


CIRCUIT = Multiaddr.parse(f"{ADDR}/p2p-circuit/p2p/{PEER.peer_id}")


def test_split_circuit() -> None:
    relay, target = split_circuit(CIRCUIT)
    assert (relay, target) == (ADDR, PEER.peer_id)
    assert split_circuit(Multiaddr.parse(f"{ADDR}/p2p-circuit")) == (ADDR, None)
    for bad in (
        "/ip4/10.0.0.1/tcp/4001/p2p-circuit",  # no relay id
        f"{ADDR}/p2p-circuit/ip4/1.2.3.4",
        f"{ADDR}/p2p-circuit{ADDR}/p2p-circuit/p2p/{PEER.peer_id}",  # two hops
    ):
        with pytest.raises(MultiaddrError):
            split_circuit(Multiaddr.parse(bad))


@given(mutations(CIRCUIT.to_bytes()))
def test_circuit_addresses_from_strangers(raw: bytes) -> None:
    """Peers hand us circuit addresses (identify, DHT): parsing them never crashes."""
    try:
        addr = Multiaddr.from_bytes(raw)
    except DecodeError:
        return
    with contextlib.suppress(MultiaddrError):
        split_circuit(addr)
    dial_candidates(addr, (addr,))
