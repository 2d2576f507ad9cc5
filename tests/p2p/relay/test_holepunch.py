"""DCUtR pieces that loopback can show: messages, address filters, dialing from the
listening port, and hostile peers on `/libp2p/dcutr`. The hole punch itself, through two
NATs, is in tests/netns."""

from __future__ import annotations

import contextlib

import pytest
import trio
from fuzzing import mutations
from hypothesis import given

from dbloom.p2p import DecodeError, KeyPair, Multiaddr, NetStream, TcpTransport, open_host, ping
from dbloom.p2p._wire import encode_frame
from dbloom.p2p.relay import (
    DCUTR,
    HolePunch,
    HolePunchService,
    PunchType,
    RelayClient,
    RelayService,
)
from dbloom.p2p.relay._dcutr import MAX_OBS_ADDRS
from dbloom.p2p.relay._holepunch import direct_tcp

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
CONNECT = HolePunch(PunchType.CONNECT, (Multiaddr.parse("/ip4/203.0.113.9/tcp/4001"),))


def test_messages_round_trip_and_caps() -> None:
    assert HolePunch.from_bytes(CONNECT.to_bytes()) == CONNECT
    assert HolePunch.from_bytes(HolePunch(PunchType.SYNC).to_bytes()).type is PunchType.SYNC
    with pytest.raises(DecodeError):
        HolePunch.from_bytes(b"\x08\x01")  # unknown type
    many = HolePunch(PunchType.CONNECT, CONNECT.addrs * (MAX_OBS_ADDRS + 1))
    with pytest.raises(DecodeError):
        HolePunch.from_bytes(many.to_bytes())


@given(mutations(CONNECT.to_bytes()))
def test_decoder_is_total(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        HolePunch.from_bytes(raw)


@pytest.mark.parametrize(
    ("text", "direct"),
    [
        ("/ip4/203.0.113.9/tcp/4001", True),
        ("/ip6/2001:db8::1/tcp/4001", True),
        ("/ip4/0.0.0.0/tcp/4001", False),
        ("/ip4/127.0.0.1/tcp/4001", False),
        ("/dns4/example.com/tcp/4001", False),
        ("/ip4/203.0.113.9/udp/4001", False),
        (f"/ip4/1.2.3.4/tcp/1/p2p/{KeyPair.from_seed(bytes(32)).peer_id}/p2p-circuit", False),
    ],
)
def test_direct_tcp(text: str, direct: bool) -> None:
    assert direct_tcp(Multiaddr.parse(text)) is direct


async def test_dial_from_uses_the_listening_port() -> None:
    seen: list[Multiaddr] = []

    async def note(stream: NetStream) -> None:
        seen.append(stream.connection.remote_addr)

    tcp = TcpTransport(reuseport=True)
    async with (
        open_host(listen=LOOPBACK) as server,
        open_host(listen=LOOPBACK, transports=[tcp]) as me,
    ):
        server.set_stream_handler("/test/note/1.0.0", note)
        raw = await tcp.dial_from(server.listen_addrs[0])
        conn = await me.adopt(raw, server.peer_id, initiator=True)
        stream = await conn.new_stream(["/test/note/1.0.0"])
        await stream.aclose()
        with trio.fail_after(5):
            while not seen:
                await trio.sleep(0.01)
        assert seen[0] == me.listen_addrs[0].without_peer_id()
    with pytest.raises(OSError):
        await TcpTransport().dial_from(Multiaddr.parse("/ip4/127.0.0.1/tcp/1"))
    with pytest.raises(ValueError):
        async with open_host() as host:
            HolePunchService(host, TcpTransport())


async def send_and_drain(stream: NetStream, wire: bytes) -> None:
    """Send `wire` and read until the peer ends or resets the stream."""
    with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(wire)
        await stream.send_eof()
        while await stream.receive_some():
            pass


async def test_hostile_dcutr_peers_cost_only_their_stream() -> None:
    """We run DCUtR and dial a NATed peer through a relay; that peer is hostile."""
    tcp = TcpTransport(reuseport=True)
    async with (
        open_host(listen=LOOPBACK) as relay,
        open_host(listen=LOOPBACK, transports=[tcp]) as us,
        open_host() as hostile,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RelayService(relay).run)
        punch = HolePunchService(us, tcp)
        await nursery.start(punch.run)
        held = await RelayClient(hostile).reserve(relay.listen_addrs[0])
        circuit = await us.connect(held.circuit_addrs[0].with_peer_id(hostile.peer_id))
        assert circuit.relayed
        with trio.fail_after(5):
            while (inbound := hostile.connection(us.peer_id)) is None:
                await trio.sleep(0.01)
        assert inbound.relayed
        for wire in (
            b"\x05\xff\xff",  # garbage
            encode_frame(HolePunch(PunchType.SYNC).to_bytes()),  # SYNC before CONNECT
            encode_frame(CONNECT.to_bytes()),  # CONNECT, then nothing
        ):
            await send_and_drain(await inbound.new_stream([DCUTR]), wire)
        # over a direct connection, or from a peer that reached us through a relay: refused
        direct = await hostile.new_stream(us.listen_addrs[0], [DCUTR])
        await send_and_drain(direct, encode_frame(CONNECT.to_bytes()))
        await ping(us, hostile.peer_id)
        assert punch.punched == 0
        nursery.cancel_scope.cancel()
