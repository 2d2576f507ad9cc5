"""The host over real TCP on 127.0.0.1 and over the in-memory network."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing

from dbloom.p2p import (
    DialError,
    Host,
    HostConfig,
    KeyPair,
    LinkProfile,
    MemoryNetwork,
    Multiaddr,
    NetStream,
    identify,
    open_host,
    ping,
)
from dbloom.p2p.multistream import NegotiationFailed

ECHO = "/test/echo/1.0.0"
HostFactory = Callable[..., AbstractAsyncContextManager[Host]]


async def echo_handler(stream: NetStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@pytest.fixture(params=["tcp", "memory"])
def make_host(request: pytest.FixtureRequest) -> HostFactory:
    """Hosts listening on loopback TCP, or on one shared in-memory network."""
    network = MemoryNetwork()

    @asynccontextmanager
    async def factory(config: HostConfig | None = None) -> AsyncIterator[Host]:
        if request.param == "tcp":
            listen, transports = ["/ip4/127.0.0.1/tcp/0"], None
        else:
            listen, transports = ["/memory/0"], [network.transport()]
        async with open_host(
            KeyPair.generate(), listen=listen, transports=transports, config=config
        ) as host:
            host.set_stream_handler(ECHO, echo_handler)
            yield host

    return factory


async def test_connect_ping_identify(make_host: HostFactory) -> None:
    async with make_host() as a, make_host() as b:
        addr = b.listen_addrs[0]
        assert addr.peer_id == b.peer_id
        conn = await a.connect(addr)
        assert conn.peer_id == b.peer_id
        rtts = await ping(a, b.peer_id, count=3)
        assert len(rtts) == 3 and all(r >= 0 for r in rtts)
        info = await identify(a, b.peer_id)
        assert info.public_key == b.identity.public_key
        assert info.agent_version and info.agent_version.startswith("dbloom/")
        assert "/ipfs/ping/1.0.0" in info.protocols and ECHO in info.protocols
        assert [str(x) for x in info.listen_addrs] == [str(addr.without_peer_id())]
        assert info.observed_addr == conn.local_addr
        # and the reverse direction reuses the same connection
        await ping(b, a.peer_id)
        assert a.num_connections == 1 and b.num_connections == 1


async def test_echo_large_payload_and_half_close(make_host: HostFactory) -> None:
    async with make_host() as a, make_host() as b:
        stream = await a.new_stream(b.listen_addrs[0], [ECHO])
        assert stream.protocol == ECHO
        payload = bytes(range(256)) * 8192  # 2 MiB
        received = bytearray()

        async def reader() -> None:
            while data := await stream.receive_some():
                received.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await stream.send_all(payload)
            await stream.send_eof()
        assert bytes(received) == payload
        await stream.aclose()


async def test_dial_with_wrong_peer_id_fails(make_host: HostFactory) -> None:
    async with make_host() as a, make_host() as b:
        wrong = b.listen_addrs[0].with_peer_id(KeyPair.generate().peer_id)
        with pytest.raises(DialError, match="authentication failed"):
            await a.connect(wrong)
        assert a.num_connections == 0
        await ping(a, b.listen_addrs[0])  # the right id still works


async def test_unsupported_protocol(make_host: HostFactory) -> None:
    async with make_host() as a, make_host() as b:
        with pytest.raises(NegotiationFailed):
            await a.new_stream(b.listen_addrs[0], ["/nope/1.0.0"])
        await ping(a, b.peer_id)


async def test_concurrent_dials_share_one_connection(make_host: HostFactory) -> None:
    async with make_host() as a, make_host() as b:
        a.peerstore.add_addrs(b.peer_id, [b.listen_addrs[0]], 60, trio.current_time())
        conns = []

        async def dial() -> None:
            conns.append(await a.connect(b.peer_id))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(dial)
        assert len({id(c) for c in conns}) == 1
        assert a.num_connections == 1


async def test_simultaneous_open_converges_to_one_connection(make_host: HostFactory) -> None:
    config = HostConfig(duplicate_idle_timeout=0.2)
    async with make_host(config) as a, make_host(config) as b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.connect, b.listen_addrs[0])
            nursery.start_soon(b.connect, a.listen_addrs[0])
        # Both ends prefer the same connection; the other closes once idle.
        with trio.fail_after(10):
            while a.num_connections > 1 or b.num_connections > 1:
                await trio.sleep(0.05)
        ca, cb = a.connection(b.peer_id), b.connection(a.peer_id)
        assert ca is not None and cb is not None
        assert ca.local_addr == cb.remote_addr
        await ping(a, b.peer_id)


async def test_failing_handler_costs_only_its_stream(
    make_host: HostFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(stream: NetStream) -> None:
        await stream.receive_some()
        raise RuntimeError("handler bug")

    async with make_host() as a, make_host() as b:
        b.set_stream_handler("/broken/1", broken)
        with caplog.at_level(logging.WARNING, logger="dbloom.p2p"):
            stream = await a.new_stream(b.listen_addrs[0], ["/broken/1"])
            await stream.send_all(b"x")
            with pytest.raises(trio.BrokenResourceError):
                with trio.fail_after(5):
                    while await stream.receive_some():
                        pass
        failures = [r for r in caplog.records if "handler for /broken/1 failed" in r.getMessage()]
        assert len(failures) == 1 and str(a.peer_id) in failures[0].getMessage()
        await ping(a, b.peer_id)  # same connection still works
        assert a.num_connections == 1


async def test_idle_connection_is_closed(make_host: HostFactory) -> None:
    config = HostConfig(idle_timeout=0.3, identify_on_connect=False)
    async with make_host(config) as a, make_host(config) as b:
        await ping(a, b.listen_addrs[0])
        with trio.fail_after(10):
            while a.num_connections or b.num_connections:
                await trio.sleep(0.05)
        await ping(a, b.peer_id)  # redials from the peerstore


async def test_closing_a_host_closes_its_connections(make_host: HostFactory) -> None:
    async with make_host() as a:
        async with make_host() as b:
            await ping(a, b.listen_addrs[0])
            assert a.num_connections == 1
        with trio.fail_after(5):
            while a.num_connections:
                await trio.sleep(0.02)
        with pytest.raises(DialError):
            await a.connect(b.peer_id, timeout=5)


async def test_unreachable_address_gives_a_clear_error() -> None:
    async with open_host(KeyPair.generate()) as a:
        with pytest.raises(DialError, match="connection refused"):
            await a.connect(Multiaddr.parse("/ip4/127.0.0.1/tcp/1"))


async def test_memory_network_latency_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(default=LinkProfile(latency=0.05))
    async with (
        open_host(KeyPair.generate(), listen=["/memory/0"], transports=[network.transport()]) as a,
        open_host(KeyPair.generate(), listen=["/memory/0"], transports=[network.transport()]) as b,
    ):
        start = trio.current_time()
        await a.connect(b.listen_addrs[0])
        # TCP-like connect (1 RTT), then Noise XX with the multistream proposal riding on
        # message 1 and yamux agreed in early data: the dialer is done after 1 more RTT.
        assert abs(trio.current_time() - start - 0.2) < 1e-6
        rtts = await ping(a, b.peer_id, count=3)
        assert all(abs(r - 0.1) < 1e-6 for r in rtts), rtts


async def test_memory_network_bandwidth_and_loss(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(
        default=LinkProfile(bandwidth=1_000_000, loss=0.2), rng=random.Random(1)
    )
    async with (
        open_host(KeyPair.generate(), listen=["/memory/0"], transports=[network.transport()]) as a,
        open_host(KeyPair.generate(), listen=["/memory/0"], transports=[network.transport()]) as b,
    ):
        b.set_stream_handler(ECHO, echo_handler)
        stream = await a.new_stream(b.listen_addrs[0], [ECHO])
        start = trio.current_time()
        payload = random.Random(2).randbytes(500_000)
        received = bytearray()

        async def reader() -> None:
            while data := await stream.receive_some():
                received.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await stream.send_all(payload)
            await stream.send_eof()
        assert bytes(received) == payload
        # 500 kB each way at 1 MB/s is 0.5 s of serialisation per direction, plus retransmissions.
        assert trio.current_time() - start > 0.5


async def test_plaintext_only_on_the_memory_network() -> None:
    config = HostConfig(insecure_plaintext=True)
    with pytest.raises(ValueError, match="only allowed on the in-memory network"):
        async with open_host(KeyPair.generate(), config=config):
            pass
    network = MemoryNetwork()
    async with (
        open_host(
            KeyPair.generate(),
            listen=["/memory/0"],
            transports=[network.transport()],
            config=config,
        ) as a,
        open_host(
            KeyPair.generate(),
            listen=["/memory/0"],
            transports=[network.transport()],
            config=config,
        ) as b,
    ):
        conn = await a.connect(b.listen_addrs[0])
        assert conn.peer_id == b.peer_id
        assert await ping(a, b.peer_id, count=2)
        wrong = b.listen_addrs[0].with_peer_id(KeyPair.generate().peer_id)
        await a.disconnect(b.peer_id)
        with pytest.raises(DialError):
            await a.connect(wrong)


async def test_lazy_stream_sends_its_request_with_the_proposal(make_host: HostFactory) -> None:
    async with make_host() as a, make_host() as b:
        stream = await a.new_stream(b.listen_addrs[0], [ECHO], lazy=True)
        await stream.send_all(b"hello")
        assert await stream.receive_some() == b"hello"
        refused = await a.new_stream(b.peer_id, ["/nope/1.0.0"], lazy=True)
        await refused.send_all(b"request")
        with pytest.raises(NegotiationFailed):
            await refused.receive_some()
        await ping(a, b.peer_id)
