"""Circuits over loopback TCP: reserve, dial through the relay, end-to-end Noise, limits."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from dbloom.p2p import DialError, Host, HostConfig, KeyPair, NetStream, open_host, ping
from dbloom.p2p.relay import (
    HOP,
    STOP,
    HopMessage,
    HopType,
    Peer,
    RelayClient,
    RelayLimits,
    RelayRefused,
    RelayService,
    Status,
    StopMessage,
    StopType,
    open_voucher,
)
from dbloom.p2p.relay._framing import read_message, write_message

ECHO = "/test/echo/1.0.0"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def echo_handler(stream: NetStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@asynccontextmanager
async def relay_host(limits: RelayLimits | None = None) -> AsyncIterator[RelayService]:
    async with open_host(KeyPair.generate(), listen=LOOPBACK) as host, trio.open_nursery() as n:
        service = RelayService(host, limits)
        await n.start(service.run)
        yield service
        n.cancel_scope.cancel()


@asynccontextmanager
async def natted(config: HostConfig | None = None) -> AsyncIterator[tuple[Host, RelayClient]]:
    """A peer that listens nowhere: reachable only through a relay."""
    async with open_host(KeyPair.generate(), config=config) as host:
        host.set_stream_handler(ECHO, echo_handler)
        yield host, RelayClient(host)


async def echo(stream: NetStream, payload: bytes) -> bytes:
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        got = bytearray()
        while data := await stream.receive_some():
            got += data
    return bytes(got)


async def test_reserve_dial_and_echo_end_to_end() -> None:
    async with relay_host() as relay, natted() as (node, client), open_host() as dialer:
        held = await client.reserve(relay.host.listen_addrs[0])
        assert held.relay == relay.host.peer_id
        assert relay.state.has_reservation(node.peer_id, trio.current_time())
        [target] = [a.with_peer_id(node.peer_id) for a in held.circuit_addrs]
        assert "/p2p-circuit/p2p/" in str(target)
        with trio.fail_after(10):
            conn = await dialer.connect(target)
            assert conn.peer_id == node.peer_id and conn.relayed
            payload = secrets.token_bytes(200_000)
            stream = await conn.new_stream([ECHO])
            assert await echo(stream, payload) == payload
            await ping(dialer, node.peer_id)
        assert relay.circuits_total == 1 and client.circuits_accepted == 1
        # the relay copied Noise frames: more than the payload each way, never fewer
        assert relay.bytes_relayed > 2 * len(payload)
        # the node sees the dialer, authenticated by Noise, through the circuit
        inbound = node.connection(dialer.peer_id)
        assert inbound is not None and inbound.relayed


async def test_voucher_is_signed_by_the_relay() -> None:
    async with relay_host() as relay, natted() as (node, _):
        stream = await node.new_stream(relay.host.listen_addrs[0], [HOP])
        await write_message(stream, HopMessage(type=HopType.RESERVE), timeout=5)
        reply, _ = await read_message(stream, HopMessage.from_bytes, timeout=5)
        assert reply.status is Status.OK and reply.reservation is not None
        assert reply.reservation.voucher is not None
        voucher = open_voucher(reply.reservation.voucher)
        assert voucher.relay == relay.host.peer_id and voucher.peer == node.peer_id
        assert voucher.expiration == reply.reservation.expire
        assert reply.limit == relay.limits.circuit_limit


async def test_no_reservation_is_refused() -> None:
    async with relay_host() as relay, natted() as (node, _), open_host() as dialer:
        await node.connect(relay.host.listen_addrs[0])  # connected, but no reservation
        target = f"{relay.host.listen_addrs[0]}/p2p-circuit/p2p/{node.peer_id}"
        with pytest.raises(DialError, match="NO_RESERVATION"):
            await dialer.connect(target, timeout=5)


async def test_reservation_caps() -> None:
    limits = RelayLimits(max_reservations=1)
    async with relay_host(limits) as relay, natted() as (_, first), natted() as (_, second):
        await first.reserve(relay.host.listen_addrs[0])
        await first.reserve(relay.host.listen_addrs[0])  # a renewal is not a second slot
        with pytest.raises(RelayRefused) as refused:
            await second.reserve(relay.host.listen_addrs[0])
        assert refused.value.status is Status.RESERVATION_REFUSED
        assert relay.state.refused["reservations-total"] == 1


async def test_disconnect_voids_the_reservation() -> None:
    async with relay_host() as relay, natted() as (node, client):
        await client.reserve(relay.host.listen_addrs[0])
        await node.disconnect(relay.host.peer_id)
        with trio.fail_after(5):
            while relay.state.has_reservation(node.peer_id, trio.current_time()):
                await trio.sleep(0.01)


async def test_circuit_byte_limit_resets_both_ends() -> None:
    limits = RelayLimits(circuit_bytes=64 * 1024)
    async with relay_host(limits) as relay, natted() as (node, client), open_host() as dialer:
        held = await client.reserve(relay.host.listen_addrs[0])
        target = held.circuit_addrs[0].with_peer_id(node.peer_id)
        conn = await dialer.connect(target, timeout=5)
        stream = await conn.new_stream([ECHO])
        with trio.fail_after(10), pytest.raises(ExceptionGroup) as broken:
            await echo(stream, secrets.token_bytes(1 << 20))
        assert broken.group_contains(trio.BrokenResourceError)
        with trio.fail_after(5):
            while not conn.is_closed:
                await trio.sleep(0.01)
        assert relay.state.circuits == 0


async def test_circuit_duration_limit() -> None:
    limits = RelayLimits(circuit_seconds=1)
    async with relay_host(limits) as relay, natted() as (node, client), open_host() as dialer:
        held = await client.reserve(relay.host.listen_addrs[0])
        conn = await dialer.connect(held.circuit_addrs[0].with_peer_id(node.peer_id), timeout=5)
        await ping(dialer, node.peer_id)
        with trio.fail_after(5):
            while not conn.is_closed:
                await trio.sleep(0.05)
        assert relay.state.circuits == 0


async def test_per_peer_circuit_cap() -> None:
    limits = RelayLimits(max_circuits_per_peer=1)
    async with (
        relay_host(limits) as relay,
        natted() as (node, client),
        open_host() as a,
        open_host() as b,
    ):
        held = await client.reserve(relay.host.listen_addrs[0])
        target = held.circuit_addrs[0].with_peer_id(node.peer_id)
        await a.connect(target, timeout=5)
        with pytest.raises(DialError, match="RESOURCE_LIMIT_EXCEEDED"):
            await b.connect(target, timeout=5)


async def test_keep_reservation_renews() -> None:
    limits = RelayLimits(reservation_ttl=2.0)
    async with relay_host(limits) as relay, natted() as (node, client):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(client.keep_reservation, relay.host.listen_addrs[0])
            with trio.fail_after(8):
                while client.reservations[relay.host.peer_id].expire <= first.expire:
                    await trio.sleep(0.1)
            assert relay.state.has_reservation(node.peer_id, trio.current_time())
            nursery.cancel_scope.cancel()
        assert not client.reservations


async def test_stop_from_a_stranger_is_refused() -> None:
    async with natted() as (node, _), open_host(listen=LOOPBACK) as stranger:
        node_addr = await node.listen("/ip4/127.0.0.1/tcp/0")
        stream = await stranger.new_stream(node_addr[0], [STOP])
        request = StopMessage(type=StopType.CONNECT, peer=Peer(stranger.peer_id))
        await write_message(stream, request, timeout=5)
        reply, _ = await read_message(stream, StopMessage.from_bytes, timeout=5)
        assert reply.status is Status.PERMISSION_DENIED
