"""Hostile peers on hop and stop streams cost only their stream; relay and node keep serving."""

from __future__ import annotations

import secrets

import pytest
import trio
from fuzzing import mutations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbloom.p2p import DecodeError, Host, KeyPair, NetStream, open_host, ping
from dbloom.p2p._wire import encode_frame, encode_uvarint
from dbloom.p2p.relay import (
    HOP,
    STOP,
    HopMessage,
    HopType,
    Peer,
    RelayClient,
    RelayService,
    Reservation,
    Status,
    StopMessage,
    StopType,
    _client,
    _service,
    seal_voucher,
)
from dbloom.p2p.relay._framing import read_message, write_message

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = "/test/echo/1.0.0"
VALID_HOPS = [
    HopMessage(type=HopType.RESERVE).to_bytes(),
    HopMessage(type=HopType.CONNECT, peer=Peer(KeyPair.generate().peer_id)).to_bytes(),
]


async def echo_handler(stream: NetStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def hop_reply(attacker: Host, relay: Host, wire: bytes) -> Status | None:
    """Send raw bytes on a hop stream; the relay's status answer, or None if it reset."""
    stream = await attacker.new_stream(relay.listen_addrs[0], [HOP])
    await stream.send_all(wire)
    await stream.send_eof()
    try:
        reply, _ = await read_message(stream, HopMessage.from_bytes, timeout=5)
    except (trio.BrokenResourceError, DecodeError):
        return None
    finally:
        await stream.aclose()
    return reply.status


async def assert_relay_serves(relay: Host) -> None:
    """A fresh node reserves and a fresh dialer echoes through it."""
    async with open_host() as node, open_host() as dialer:
        node.set_stream_handler(ECHO, echo_handler)
        held = await RelayClient(node).reserve(relay.listen_addrs[0])
        conn = await dialer.connect(held.circuit_addrs[0].with_peer_id(node.peer_id), timeout=5)
        stream = await conn.new_stream([ECHO])
        await stream.send_all(b"still here")
        await stream.send_eof()
        assert await stream.receive_some() == b"still here"


async def test_garbage_on_hop_gets_a_status_not_a_crash() -> None:
    async with (
        open_host(listen=LOOPBACK) as relay,
        open_host() as attacker,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RelayService(relay).run)
        cases = {
            b"\x05\xff\xff\xff\xff\xff": Status.MALFORMED_MESSAGE,  # bad protobuf
            encode_uvarint(1 << 20): Status.MALFORMED_MESSAGE,  # frame past the cap
            encode_frame(b"\x08\x07"): Status.MALFORMED_MESSAGE,  # unknown type
            encode_frame(HopMessage(type=HopType.STATUS).to_bytes()): Status.UNEXPECTED_MESSAGE,
            encode_frame(b"\x08\x01"): Status.UNEXPECTED_MESSAGE,  # CONNECT without a peer
        }
        for wire, status in cases.items():
            assert await hop_reply(attacker, relay, wire) is status
        assert await hop_reply(attacker, relay, b"\x80") is None  # ends mid-message
        await ping(attacker, relay.peer_id)
        await assert_relay_serves(relay)
        nursery.cancel_scope.cancel()


async def test_circuit_to_self_or_relay_is_refused() -> None:
    async with (
        open_host(listen=LOOPBACK) as relay,
        open_host() as attacker,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RelayService(relay).run)
        for target in (attacker.peer_id, relay.peer_id):
            wire = encode_frame(HopMessage(type=HopType.CONNECT, peer=Peer(target)).to_bytes())
            assert await hop_reply(attacker, relay, wire) is Status.PERMISSION_DENIED
        nursery.cancel_scope.cancel()


async def test_silent_hop_and_stop_streams_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_service, "RELAY_TIMEOUT", 0.2)
    monkeypatch.setattr(_client, "RESERVE_TIMEOUT", 0.2)
    async with (
        open_host(listen=LOOPBACK) as relay,
        open_host() as node,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RelayService(relay).run)
        client = RelayClient(node)
        await client.reserve(relay.listen_addrs[0], timeout=5)
        hop = await node.new_stream(relay.peer_id, [HOP])
        conn = relay.connection(node.peer_id)
        assert conn is not None
        stop = await conn.new_stream([STOP])
        with trio.fail_after(5):
            for stream in (hop, stop):
                with pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some()
        await ping(node, relay.peer_id)
        nursery.cancel_scope.cancel()


async def test_hostile_relay_cannot_crash_the_node() -> None:
    """A relay we reserved on sends garbage, wrong types, or a circuit that is not Noise."""
    async with (
        open_host(listen=LOOPBACK) as relay,
        open_host() as node,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RelayService(relay).run)
        node.set_stream_handler(ECHO, echo_handler)
        client = RelayClient(node)
        await client.reserve(relay.listen_addrs[0])
        conn = relay.connection(node.peer_id)
        assert conn is not None
        sends = {
            b"\x03\x08\x00\x12": Status.MALFORMED_MESSAGE,
            encode_frame(StopMessage(type=StopType.STATUS).to_bytes()): Status.UNEXPECTED_MESSAGE,
            encode_frame(StopMessage(type=StopType.CONNECT).to_bytes()): Status.UNEXPECTED_MESSAGE,
        }
        for wire, status in sends.items():
            stream = await conn.new_stream([STOP])
            await stream.send_all(wire)
            reply, _ = await read_message(stream, StopMessage.from_bytes, timeout=5)
            assert reply.status is status
            await stream.aclose()
        # a circuit that then speaks garbage instead of Noise: the node drops just that
        stream = await conn.new_stream([STOP])
        connect = StopMessage(type=StopType.CONNECT, peer=Peer(KeyPair.generate().peer_id))
        await write_message(stream, connect, timeout=5)
        await stream.send_all(secrets.token_bytes(4096))
        reply, _ = await read_message(stream, StopMessage.from_bytes, timeout=5)
        assert reply.status is Status.OK
        with trio.fail_after(15):
            try:
                while await stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass
        await ping(relay, node.peer_id)
        await assert_relay_serves(relay)
        nursery.cancel_scope.cancel()


async def test_relay_with_a_forged_voucher_is_not_believed() -> None:
    async def liar(stream: NetStream) -> None:
        await read_message(stream, HopMessage.from_bytes, timeout=5)
        other = KeyPair.generate()
        reservation = Reservation(expire=2**40, voucher=seal_voucher(other, other.peer_id, 1))
        reply = HopMessage(type=HopType.STATUS, status=Status.OK, reservation=reservation)
        await write_message(stream, reply, timeout=5)

    async with open_host(listen=LOOPBACK) as relay, open_host() as node:
        relay.set_stream_handler(HOP, liar)
        client = RelayClient(node)
        with pytest.raises(DecodeError):
            await client.reserve(relay.listen_addrs[0])
        assert not client.reservations


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(VALID_HOPS).flatmap(mutations))
def test_mutated_hop_messages_over_the_wire(raw: bytes) -> None:
    """Each mutated message gets an answer or a reset; the relay then still answers ping."""

    async def main() -> None:
        async with (
            open_host(listen=LOOPBACK) as relay,
            open_host() as attacker,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(RelayService(relay).run)
            with trio.fail_after(10):
                await hop_reply(attacker, relay, encode_frame(raw))
                await ping(attacker, relay.peer_id)
            nursery.cancel_scope.cancel()

    trio.run(main)
