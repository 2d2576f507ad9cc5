"""AutoNAT dial-backs, the reachability verdict, and AutoRelay over loopback TCP."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from fuzzing import mutations
from hypothesis import given

from dbloom.p2p import DecodeError, Host, KeyPair, Multiaddr, NetStream, identify, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key
from dbloom.p2p.relay import (
    AUTONAT,
    RELAY_KEY,
    AutoNatService,
    AutoRelay,
    AutoRelayConfig,
    DialRequest,
    DialResponse,
    DialStatus,
    Reachability,
    ReachabilityTracker,
    RelayService,
    decode_autonat,
    dial_candidates,
    probe,
)
from dbloom.p2p.relay._framing import read_message, write_message

ME = KeyPair.from_seed(b"\x05" * 32).peer_id
SERVERS = [KeyPair.from_seed(bytes([i + 9]) * 32).peer_id for i in range(3)]
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = "/test/echo/1.0.0"


def addr(text: str) -> Multiaddr:
    return Multiaddr.parse(text)


def test_autonat_round_trip() -> None:
    request = DialRequest(ME, (addr("/ip4/1.2.3.4/tcp/4001"), addr("/ip6/::1/tcp/5")))
    assert decode_autonat(request.to_bytes()) == request
    response = DialResponse(DialStatus.OK, "", addr("/ip4/1.2.3.4/tcp/4001"))
    assert decode_autonat(response.to_bytes()) == response
    refused = DialResponse(DialStatus.E_DIAL_REFUSED, "busy")
    assert decode_autonat(refused.to_bytes()) == refused


@given(
    mutations(DialRequest(ME, (addr("/ip4/1.2.3.4/tcp/4001"),)).to_bytes())
    | mutations(DialResponse(DialStatus.OK, "x", addr("/ip4/1.2.3.4/tcp/1")).to_bytes())
)
def test_autonat_decoder_is_total(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_autonat(raw)


def test_dial_candidates_use_only_the_observed_ip() -> None:
    observed = addr("/ip4/203.0.113.7/tcp/51234")
    asked = (
        addr("/ip4/0.0.0.0/tcp/4001"),
        addr("/ip4/10.0.0.2/tcp/4001"),  # same port: one candidate
        addr("/ip4/198.51.100.1/tcp/4002"),  # a third party's IP: its port only
        addr("/ip6/::/tcp/4003"),  # another family
        addr(f"/ip4/1.2.3.4/tcp/1/p2p/{SERVERS[0]}/p2p-circuit"),
        addr("/ip4/1.2.3.4/tcp/0"),
    )
    assert dial_candidates(observed, asked) == [
        addr("/ip4/203.0.113.7/tcp/4001"),
        addr("/ip4/203.0.113.7/tcp/4002"),
    ]
    many = tuple(addr(f"/ip4/1.1.1.1/tcp/{port}") for port in range(1, 20))
    assert len(dial_candidates(observed, many)) == 4
    assert dial_candidates(addr("/memory/5"), many) == []


def test_tracker_needs_two_servers_to_say_private() -> None:
    tracker = ReachabilityTracker(confidence=2)
    error = DialResponse(DialStatus.E_DIAL_ERROR)
    assert tracker.record(SERVERS[0], error) is Reachability.UNKNOWN
    assert tracker.record(SERVERS[0], error) is Reachability.UNKNOWN  # same server again
    assert tracker.record(SERVERS[1], DialResponse(DialStatus.E_DIAL_REFUSED)) is (
        Reachability.UNKNOWN
    )
    assert tracker.record(SERVERS[1], error) is Reachability.PRIVATE
    ok = DialResponse(DialStatus.OK, addr=addr("/ip4/1.2.3.4/tcp/1"))
    assert tracker.record(SERVERS[2], ok) is Reachability.PUBLIC
    assert tracker.public_addr == addr("/ip4/1.2.3.4/tcp/1")
    assert tracker.record(SERVERS[0], error) is Reachability.PUBLIC  # one failure is not enough
    assert tracker.unlistened() is Reachability.PRIVATE


async def test_probe_reaches_a_listening_peer() -> None:
    async with open_host(listen=LOOPBACK) as server, open_host(listen=LOOPBACK) as me:
        AutoNatService(server)
        await me.connect(server.listen_addrs[0])
        response = await probe(me, server.peer_id)
        assert response.status is DialStatus.OK
        assert response.addr == me.listen_addrs[0].without_peer_id()


async def ask(server: Host, asker: Host, request: DialRequest) -> DialResponse:
    stream = await asker.new_stream(server.listen_addrs[0], [AUTONAT])
    await write_message(stream, request, timeout=5)
    reply, _ = await read_message(stream, decode_autonat, timeout=5)
    assert isinstance(reply, DialResponse)
    return reply


async def test_dial_back_failures_and_refusals() -> None:
    async with open_host(listen=LOOPBACK) as server, open_host() as asker:
        AutoNatService(server)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there now
        dead = DialRequest(asker.peer_id, (addr(f"/ip4/127.0.0.1/tcp/{port}"),))
        assert (await ask(server, asker, dead)).status is DialStatus.E_DIAL_ERROR
        other = DialRequest(SERVERS[0], (addr(f"/ip4/127.0.0.1/tcp/{port}"),))
        assert (await ask(server, asker, other)).status is DialStatus.E_BAD_REQUEST
        nowhere = DialRequest(asker.peer_id, ())
        assert (await ask(server, asker, nowhere)).status is DialStatus.E_DIAL_REFUSED


async def echo_handler(stream: NetStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@asynccontextmanager
async def relay_peer(bootstrap: tuple[Multiaddr, ...] = ()) -> AsyncIterator[Host]:
    """What `dbloom relay` runs: relay, AutoNAT, a DHT server providing `dbloom:relay`."""
    async with open_host(listen=LOOPBACK) as host, trio.open_nursery() as nursery:
        await nursery.start(RelayService(host).run)
        AutoNatService(host)
        dht = KademliaDHT(host, KadConfig(mode="server", bootstrap=bootstrap))
        await nursery.start(dht.run)
        await dht.provide(provider_key(RELAY_KEY))
        yield host
        nursery.cancel_scope.cancel()


async def test_autorelay_reserves_on_two_relays_and_advertises_circuits() -> None:
    async with (
        relay_peer() as first,
        relay_peer((first.listen_addrs[0],)) as second,
        open_host() as node,  # listens nowhere: private without asking anyone
        open_host() as dialer,
        trio.open_nursery() as nursery,
    ):
        node.set_stream_handler(ECHO, echo_handler)
        dht = KademliaDHT(node, KadConfig(mode="client", bootstrap=(first.listen_addrs[0],)))
        await nursery.start(dht.run)
        auto = AutoRelay(node, dht, config=AutoRelayConfig(retry_interval=0.1))
        await nursery.start(auto.run)
        with trio.fail_after(10):
            while len(auto.client.reservations) < 2:
                await auto.changed.wait()
        assert auto.reachability is Reachability.PRIVATE
        assert set(auto.client.reservations) == {first.peer_id, second.peer_id}
        circuits = [a for a in node.advertised_addrs if "p2p-circuit" in a.protocols()]
        assert len(circuits) == 2
        # identify, asked through one circuit, names both
        learned = await identify(dialer, circuits[0])
        assert set(learned.listen_addrs) == {c.without_peer_id() for c in circuits}
        nursery.cancel_scope.cancel()


async def test_autorelay_stays_away_from_relays_when_public() -> None:
    async with (
        relay_peer() as first,
        relay_peer((first.listen_addrs[0],)),
        open_host(listen=LOOPBACK) as node,
        trio.open_nursery() as nursery,
    ):
        dht = KademliaDHT(node, KadConfig(mode="client", bootstrap=(first.listen_addrs[0],)))
        await nursery.start(dht.run)
        auto = AutoRelay(node, dht, config=AutoRelayConfig(retry_interval=0.1))
        await nursery.start(auto.run)
        with trio.fail_after(10):
            while auto.reachability is not Reachability.PUBLIC:
                await auto.changed.wait()
        assert not auto.client.reservations
        nursery.cancel_scope.cancel()


async def test_autorelay_replaces_a_relay_that_goes_away() -> None:
    async def run_relay(
        bootstrap: tuple[Multiaddr, ...],
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[Host],
    ) -> None:
        with scope:
            async with relay_peer(bootstrap) as host:
                task_status.started(host)
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        scopes = [trio.CancelScope() for _ in range(3)]
        first = await nursery.start(run_relay, (), scopes[0])
        seed = (first.listen_addrs[0],)
        relays = [first, *[await nursery.start(run_relay, seed, s) for s in scopes[1:]]]
        async with open_host() as node:
            dht = KademliaDHT(node, KadConfig(mode="client", bootstrap=seed))
            await nursery.start(dht.run)
            config = AutoRelayConfig(retry_interval=0.1, give_up_after=1)
            auto = AutoRelay(node, dht, config=config)
            await nursery.start(auto.run)
            with trio.fail_after(10):
                while len(auto.client.reservations) < 2:
                    await auto.changed.wait()
            held = set(auto.client.reservations)
            # stop a held relay other than the DHT's seed
            victim = next(i for i, r in enumerate(relays) if r.peer_id in held and i)
            scopes[victim].cancel()
            spare = next(r.peer_id for r in relays if r.peer_id not in held)
            with trio.fail_after(15):
                while set(auto.client.reservations) != held - {relays[victim].peer_id} | {spare}:
                    await auto.changed.wait()
            nursery.cancel_scope.cancel()
