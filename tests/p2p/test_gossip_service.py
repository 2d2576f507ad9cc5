"""The gossip service end to end: in-memory networks in virtual time, hostile peers, real TCP."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from dbloom.p2p import Host, HostConfig, KeyPair, LinkProfile, MemoryNetwork, NetStream, open_host
from dbloom.p2p._wire import encode_frame, encode_uvarint
from dbloom.p2p.gossip import (
    GOSSIPSUB_V11,
    RPC,
    Gossip,
    GossipConfig,
    Message,
    SubOpts,
    sign_message,
)

TOPIC = "dbloom/receipts/1"


@dataclass
class Net:
    hosts: list[Host]
    gossips: list[Gossip]
    nursery: trio.Nursery
    rng: random.Random
    received: list[list[bytes]] = field(default_factory=list)


@asynccontextmanager
async def gossip_network(
    n: int,
    memory: MemoryNetwork | None,
    *,
    config: GossipConfig | None = None,
    seed: int = 1,
) -> AsyncIterator[Net]:
    """`n` hosts running gossip, not yet connected (plaintext in memory, Noise on TCP)."""
    rng = random.Random(seed)
    host_config = HostConfig(insecure_plaintext=memory is not None)
    async with AsyncExitStack() as stack:
        hosts = []
        for _ in range(n):
            if memory is not None:
                host = open_host(
                    KeyPair.from_seed(rng.randbytes(32)),
                    listen=["/memory/0"],
                    transports=[memory.transport()],
                    config=host_config,
                )
            else:
                host = open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"])
            hosts.append(await stack.enter_async_context(host))
        async with trio.open_nursery() as nursery:
            gossips = []
            for i, host in enumerate(hosts):
                gossip = Gossip(host, config, rng=random.Random(seed * 1000 + i))
                await nursery.start(gossip.run)
                gossips.append(gossip)
            yield Net(hosts, gossips, nursery, rng)
            nursery.cancel_scope.cancel()


async def connect_sparsely(net: Net, degree: int) -> None:
    """Peer i dials i+1 (so the graph is connected) and `degree - 1` random others."""
    n = len(net.hosts)
    edges = set()
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for j in {(i + 1) % n, *net.rng.sample(others, degree - 1)}:
            edges.add((min(i, j), max(i, j)))
    async with trio.open_nursery() as nursery:
        for i, j in sorted(edges):
            nursery.start_soon(net.hosts[i].connect, net.hosts[j].listen_addrs[0])


def subscribe_all(net: Net, topic: str = TOPIC) -> None:
    """Every peer subscribes; a task per peer records the ids it receives."""
    net.received = [[] for _ in net.gossips]
    for gossip, received in zip(net.gossips, net.received, strict=True):
        subscription = gossip.subscribe(topic)

        async def collect(
            sub: AsyncIterator[Message] = subscription, out: list[bytes] = received
        ) -> None:
            async for message in sub:
                out.append(message.id)

        net.nursery.start_soon(collect)


async def wait_for(predicate: object, timeout: float) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.1)


async def test_twenty_sparse_peers_deliver_a_thousand_messages_exactly_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01), rng=random.Random(2))
    async with gossip_network(20, memory) as net:
        subscribe_all(net)
        await connect_sparsely(net, degree=4)
        await trio.sleep(3)  # identify, hellos, and a few heartbeats to build the meshes
        config = net.gossips[0].config
        for gossip in net.gossips:
            assert config.d_lo <= gossip.stats().mesh[TOPIC] <= config.d_hi or (
                gossip.stats().mesh[TOPIC] == gossip.stats().peers
            )
        published = []
        for k in range(1000):
            publisher = net.rng.choice(net.gossips)
            published.append((await publisher.publish(TOPIC, b"message %d" % k)).id)
            if k % 20 == 19:
                await trio.sleep(0.1)
        await wait_for(lambda: all(len(r) >= 1000 for r in net.received), timeout=60)
        await trio.sleep(5)  # any duplicate delivery would have shown up by now
        for received in net.received:
            assert len(received) == 1000
            assert set(received) == set(published)
        stats = [g.stats() for g in net.gossips]
        assert sum(s.rejected for s in stats) == 0
        assert sum(s.dropped_rpcs + s.dropped_deliveries for s in stats) == 0


async def open_raw_gossip_stream(attacker: Host, victim: Host) -> NetStream:
    """A stream speaking the gossip protocol to `victim`, driven by hand."""
    return await attacker.new_stream(victim.listen_addrs[0], [GOSSIPSUB_V11])


async def drain(stream: NetStream) -> None:
    """Accept the victims' own gossip streams, so they keep the attacker as a peer."""
    while await stream.receive_some():
        pass


def forged(author: KeyPair, seqno: int) -> Message:
    genuine = sign_message(author, TOPIC, b"genuine", seqno)
    return Message(
        topic=TOPIC,
        data=b"forged",
        from_peer=genuine.from_peer,
        seqno=genuine.seqno,
        signature=genuine.signature,
    )


async def test_a_peer_flooding_forgeries_is_graylisted_while_honest_traffic_flows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01), rng=random.Random(3))
    async with gossip_network(10, memory, seed=4) as net:
        subscribe_all(net)
        await connect_sparsely(net, degree=3)
        async with open_host(
            KeyPair.from_seed(b"\xee" * 32),
            listen=["/memory/0"],
            transports=[memory.transport()],
            config=HostConfig(insecure_plaintext=True),
        ) as attacker:
            attacker.set_stream_handler(GOSSIPSUB_V11, drain)
            victims = net.gossips[:3]
            streams = [await open_raw_gossip_stream(attacker, v.host) for v in victims]
            await trio.sleep(3)
            hello = RPC(subscriptions=(SubOpts(True, TOPIC),))
            for stream in streams:
                await stream.send_all(encode_frame(hello.to_bytes()))
            published = []
            for k in range(100):
                # the attacker forges messages of honest authors, interleaved with honest traffic
                author = net.hosts[k % 10].identity
                for stream in streams:
                    bad = RPC(publish=(forged(author, 1_000_000 + k),))
                    await stream.send_all(encode_frame(bad.to_bytes()))
                publisher = net.rng.choice(net.gossips)
                published.append((await publisher.publish(TOPIC, b"honest %d" % k)).id)
                await trio.sleep(0.05)
            honest = {host.peer_id for host in net.hosts}
            for gossip in net.gossips:  # nobody honest was caught in the crossfire
                assert all(gossip.score(p) >= 0 for p in gossip.router.peers if p in honest)
            threshold = net.gossips[0].config.thresholds.graylist
            for victim in victims:
                assert victim.score(attacker.peer_id) < threshold
                assert victim.stats().graylisted_rpcs > 0
            # graylisted: even a correctly signed message from it is ignored now
            late = RPC(publish=(sign_message(attacker.identity, TOPIC, b"let me in", 1),))
            for stream in streams:
                await stream.send_all(encode_frame(late.to_bytes()))
            await wait_for(lambda: all(len(r) >= 100 for r in net.received), timeout=30)
            await trio.sleep(3)
            for received in net.received:
                assert sorted(received) == sorted(published)
            for stream in streams:
                await stream.aclose()


@pytest.mark.parametrize(
    "junk",
    [encode_frame(b"\xff\xff\xff"), encode_uvarint(64 << 20) + b"\x00" * 100],
    ids=["garbage-frame", "oversize-frame"],
)
async def test_garbage_costs_the_stream_and_score_not_the_node(
    junk: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with gossip_network(3, memory) as net:
        subscribe_all(net)
        await connect_sparsely(net, degree=2)
        async with open_host(
            KeyPair.from_seed(b"\xdd" * 32),
            listen=["/memory/0"],
            transports=[memory.transport()],
            config=HostConfig(insecure_plaintext=True),
        ) as attacker:
            attacker.set_stream_handler(GOSSIPSUB_V11, drain)
            victim = net.gossips[0]
            stream = await open_raw_gossip_stream(attacker, victim.host)
            await stream.send_all(junk)
            with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some():
                    pass  # until the victim resets the stream
        assert victim.stats().malformed_rpcs == 1
        assert victim.score(attacker.peer_id) < 0
        await trio.sleep(2)
        message = await net.gossips[2].publish(TOPIC, b"still fine")
        await wait_for(lambda: all(r == [message.id] for r in net.received), timeout=10)


async def test_a_slow_subscriber_drops_and_counts(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with gossip_network(2, memory) as net:
        slow = net.gossips[1].subscribe(TOPIC, backlog=5)
        net.gossips[0].subscribe(TOPIC)
        await net.hosts[0].connect(net.hosts[1].listen_addrs[0])
        await trio.sleep(2)
        with caplog.at_level(logging.INFO, logger="dbloom.p2p.gossip"):
            for k in range(20):
                await net.gossips[0].publish(TOPIC, b"%d" % k)
            await trio.sleep(1)
            assert slow.dropped == 15
            assert net.gossips[1].stats().dropped_deliveries == 15
            full = [r for r in caplog.records if "is full" in r.getMessage()]
            assert len(full) == 1  # once per burst, not per message
            assert [m.data async for m in _take(slow, 5)] == [b"%d" % k for k in range(5)]
            await trio.sleep(10)  # drained and quiet: the burst is over
            await net.gossips[0].publish(TOPIC, b"after")
            await trio.sleep(1)
            assert any("drained after dropping 15" in r.getMessage() for r in caplog.records)
            [after] = [m async for m in _take(slow, 1)]
            assert (after.data, after.author) == (b"after", net.hosts[0].peer_id)
        slow.close()
        assert net.gossips[1].stats().dropped_deliveries == 15
        assert TOPIC not in net.gossips[1].stats().mesh  # the last subscription left the topic


async def _take(subscription: AsyncIterator[Message], count: int) -> AsyncIterator[Message]:
    for _ in range(count):
        yield await subscription.__anext__()


async def test_a_broken_stream_is_reopened_while_the_peer_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with gossip_network(2, memory) as net:
        subscribe_all(net)
        a, b = net.gossips
        await net.hosts[0].connect(net.hosts[1].listen_addrs[0])
        await trio.sleep(2)
        broken = a._senders[b.host.peer_id]
        broken.scope.cancel()  # as if a write had timed out
        await wait_for(lambda: a._senders.get(b.host.peer_id) is not broken, timeout=1)
        await wait_for(lambda: b.host.peer_id in a._senders, timeout=3)  # the next heartbeat
        assert a.stats().peers == 1 and a.stats().mesh[TOPIC] == 1  # the router kept b
        message = await a.publish(TOPIC, b"again")
        await wait_for(lambda: net.received[1] == [message.id], timeout=5)
        await net.hosts[0].disconnect(b.host.peer_id)
        await wait_for(lambda: a.stats().peers == 0 and b.stats().peers == 0, timeout=5)
        assert a.stats().mesh[TOPIC] == 0


async def never_read(stream: NetStream) -> None:
    await trio.sleep_forever()


async def test_a_peer_that_stops_reading_costs_its_queue_not_our_memory(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    config = GossipConfig(write_timeout=2.0, max_queued_bytes=100_000)
    async with gossip_network(2, memory, config=config) as net:
        subscribe_all(net)
        a = net.gossips[0]
        await net.hosts[0].connect(net.hosts[1].listen_addrs[0])
        async with open_host(
            KeyPair.from_seed(b"\xcc" * 32),
            listen=["/memory/0"],
            transports=[memory.transport()],
            config=HostConfig(insecure_plaintext=True),
        ) as stuck:
            stuck.set_stream_handler(GOSSIPSUB_V11, never_read)
            stream = await open_raw_gossip_stream(stuck, a.host)
            hello = RPC(subscriptions=(SubOpts(True, TOPIC),))
            await stream.send_all(encode_frame(hello.to_bytes()))
            await trio.sleep(2)
            with caplog.at_level(logging.INFO, logger="dbloom.p2p.gossip"):
                published = []
                for _ in range(100):  # 2 MB, past the stuck peer's 1 MiB yamux window
                    published.append((await a.publish(TOPIC, bytes(20_000))).id)
                    await trio.sleep(0.02)
                await trio.sleep(3)
            assert a.stats().dropped_rpcs > 0  # the stuck peer's queue overflowed
            full = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
            assert full == [f"send queue to {stuck.peer_id} is full; dropping until it drains"]
            assert any("ended: timed out" in r.getMessage() for r in caplog.records)
            await wait_for(lambda: net.received[1] == published, timeout=10)  # b unaffected
        await wait_for(lambda: a.stats().peers == 1, timeout=5)  # the stuck peer left


async def test_three_hosts_over_tcp_with_noise() -> None:
    config = GossipConfig(heartbeat_interval=0.1)
    async with gossip_network(3, None, config=config) as net:
        subscribe_all(net)
        a, b, c = net.gossips
        assert await a.add_peer(b.host.listen_addrs[0]) == b.host.peer_id
        await b.add_peer(c.host.listen_addrs[0])
        await wait_for(lambda: b.stats().mesh.get(TOPIC) == 2, timeout=10)
        published = [(await a.publish(TOPIC, b"over tcp %d" % k)).id for k in range(10)]
        await wait_for(lambda: all(len(r) == 10 for r in net.received), timeout=10)
        assert all(r == published for r in net.received)  # one path, so in order
        assert c.host.connection(a.host.peer_id) is None  # c heard a through b only
