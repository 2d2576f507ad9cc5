"""The Kademlia service end to end: real TCP, the in-memory network, virtual time, hostile peers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from dbloom.p2p import Host, HostConfig, KeyPair, LinkProfile, MemoryNetwork, NetStream, open_host
from dbloom.p2p._wire import FrameReader, encode_frame
from dbloom.p2p.kad import (
    KadConfig,
    KademliaDHT,
    KadMessage,
    MessageType,
    PeerInfo,
    Record,
    RecordRejected,
    common_prefix_length,
    kad_key,
    node_record_key,
    open_node_record,
    provider_key,
    seal_node_record,
    seed_routing_tables,
)

PROTOCOL = "/dbloom/kad/1.0.0"


@dataclass
class Net:
    hosts: list[Host]
    dhts: list[KademliaDHT]
    nursery: trio.Nursery


@asynccontextmanager
async def kad_network(
    n: int,
    *,
    memory: MemoryNetwork | None = None,
    config: Callable[[int], KadConfig] | None = None,
    seeds: int = 3,
    rng: random.Random | None = None,
) -> AsyncIterator[Net]:
    """`n` DHT servers; peer i bootstraps from a few earlier peers, as a growing network does."""
    rng = rng or random.Random(7)
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
                host = open_host(
                    KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"], config=host_config
                )
            hosts.append(await stack.enter_async_context(host))
        async with trio.open_nursery() as nursery:
            dhts = []
            for i, host in enumerate(hosts):
                earlier = rng.sample(range(i), min(i, seeds))
                base = config(i) if config else KadConfig()
                boot = tuple(hosts[j].listen_addrs[0] for j in earlier)
                dht = KademliaDHT(host, _with(base, bootstrap=boot), rng=random.Random(i))
                await nursery.start(dht.run)
                dhts.append(dht)
            yield Net(hosts, dhts, nursery)
            nursery.cancel_scope.cancel()


def _with(config: KadConfig, **changes: object) -> KadConfig:
    from dataclasses import replace

    return replace(config, **changes)  # type: ignore[arg-type]


async def test_fifty_peers_on_tcp_find_every_provider() -> None:
    async with kad_network(50) as net:
        for dht in net.dhts:
            await dht.refresh()
        keys = [provider_key(f"dbloom:model:m{i}") for i in range(50)]
        async with trio.open_nursery() as nursery:
            for dht, key in zip(net.dhts, keys, strict=True):
                nursery.start_soon(dht.provide, key)
        misses = []

        async def find_all(asker: int) -> None:
            for owner, key in enumerate(keys):
                found = await net.dhts[asker].find_providers_list(key, count=1)
                if [p.peer_id for p in found] != [net.hosts[owner].peer_id]:
                    misses.append((asker, owner))

        limiter = trio.CapacityLimiter(8)

        async def limited(asker: int) -> None:
            async with limiter:
                await find_all(asker)

        async with trio.open_nursery() as nursery:
            for asker in range(50):
                nursery.start_soon(limited, asker)
        assert misses == []


async def test_provider_addresses_are_dialable(autojump_clock: trio.testing.MockClock) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.02))
    async with kad_network(12, memory=memory) as net:
        await net.dhts[4].provide(provider_key("dbloom:model:tiny"))
        found = await net.dhts[9].find_providers_list(provider_key("dbloom:model:tiny"))
        assert [p.peer_id for p in found] == [net.hosts[4].peer_id]
        assert found[0].addrs == (net.hosts[4].listen_addrs[0].without_peer_id(),)
        await net.hosts[9].connect(found[0].addrs[0].with_peer_id(found[0].peer_id))


async def _provide(net: Net, owners: list[int]) -> None:
    for owner in owners:
        await net.dhts[owner].provide(provider_key(f"dbloom:model:{owner}"))


async def _lookup_success(
    net: Net, alive: list[int], owners: list[int], lookups: int, rng: random.Random
) -> tuple[int, list[int]]:
    """How many provider lookups from random live peers found the owner, and lookup hops."""
    ok = 0
    hops = []
    for i in range(lookups):
        owner = rng.choice(owners)
        asker = rng.choice(alive)
        key = provider_key(f"dbloom:model:{owner}")
        found = await net.dhts[asker].find_providers_list(key, count=1)
        if found and found[0].peer_id == net.hosts[owner].peer_id:
            ok += 1
        if i % 10 == 0:  # full k-closest lookups cost more: sample a tenth
            target = net.hosts[rng.choice(alive)].peer_id.multihash
            hops.append((await net.dhts[asker].find_closest_peers(target)).hops)
    return ok, hops


@pytest.mark.parametrize("churn", [0.0, 0.2], ids=["stable", "20%-churn"])
async def test_thousand_peers_in_memory(
    churn: float, autojump_clock: trio.testing.MockClock
) -> None:
    """1,000 peers, 20 ms links, settled tables; lookups through the real protocol."""
    rng = random.Random(11)
    memory = MemoryNetwork(default=LinkProfile(latency=0.02), rng=random.Random(3))
    # Refresh would have every one of the 1,000 peers run 17 lookups per 5 virtual
    # minutes on this one CPU; the settled tables make it unnecessary here.
    config = KadConfig(query_timeout=2.0, refresh_interval=3600.0)
    async with kad_network(1000, memory=memory, config=lambda i: config, rng=rng, seeds=0) as net:
        seed_routing_tables(net.dhts, rng)
        owners = rng.sample(range(1000), 20)
        await _provide(net, owners)
        alive = list(range(1000))
        if churn:  # a fifth of the network leaves after the records were stored
            others = [i for i in range(1000) if i not in owners]
            dead = set(rng.sample(others, int(1000 * churn)))
            async with trio.open_nursery() as nursery:
                for i in dead:
                    nursery.start_soon(net.hosts[i].aclose)
            alive = [i for i in range(1000) if i not in dead]
        ok, hops = await _lookup_success(net, alive, owners, 100, rng)
        assert ok == 100
        hops.sort()
        assert hops[len(hops) // 2] <= 4


async def test_records_expire_unless_republished(autojump_clock: trio.testing.MockClock) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with kad_network(15, memory=memory) as net:
        key = provider_key("dbloom:model:tiny")
        await net.dhts[2].provide(key)
        await trio.sleep(45 * 60)  # 45 virtual minutes: republished every ~4, TTL 10
        assert [p.peer_id for p in await net.dhts[11].find_providers_list(key)] == [
            net.hosts[2].peer_id
        ]
        net.dhts[2].stop_providing(key)
        net.dhts[2].providers.remove_expired(float("inf"))
        await trio.sleep(11 * 60)
        assert await net.dhts[11].find_providers_list(key) == []


async def test_put_get_with_quorum_and_sequence(autojump_clock: trio.testing.MockClock) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with kad_network(25, memory=memory) as net:
        owner = net.dhts[3]
        key = node_record_key(owner.host.peer_id)
        assert await owner.publish_node_record(b"v1") >= 10
        assert await owner.publish_node_record(b"v2") >= 10
        value = await net.dhts[20].get(key, quorum=5)
        assert value is not None and open_node_record(value).data == b"v2"
        # An older record, replayed by someone else, is refused as worse wherever v2 is held.
        old = seal_node_record(owner.host.identity, 1, b"stale")
        holders = [d for d in net.dhts if d.records.get(key, trio.current_time()) is not None]
        assert len(holders) >= 10
        for dht in holders:
            with pytest.raises(RecordRejected) as refused:
                dht.records.put(key, old, from_peer=net.hosts[0].peer_id, now=trio.current_time())
            assert refused.value.reason == "worse"
        # A record signed by the wrong key is refused with a reason, and counted.
        forged = seal_node_record(net.hosts[0].identity, 10**15, b"forged")
        stored = 0
        request = KadMessage(
            type=MessageType.PUT_VALUE, key=key, record=Record(key=key, value=forged)
        )
        for host in net.hosts[10:15]:
            try:
                await net.dhts[0]._rpc(host.peer_id, request)
                stored += 1
            except Exception:
                pass
        assert stored == 0
        assert sum(d.records.rejected["wrong-key"] for d in net.dhts[10:15]) == 5
        value = await net.dhts[20].get(key, quorum=5)
        assert value is not None and open_node_record(value).data == b"v2"


async def test_client_mode_peers_stay_out_of_tables(autojump_clock: trio.testing.MockClock) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with (
        kad_network(10, memory=memory) as net,
        open_host(
            KeyPair.generate(),
            listen=["/memory/0"],
            transports=[memory.transport()],
            config=HostConfig(insecure_plaintext=True),
        ) as host,
    ):
        client = KademliaDHT(
            host, KadConfig(mode="client", bootstrap=(net.hosts[0].listen_addrs[0],))
        )
        await net.nursery.start(client.run)
        await net.dhts[1].provide(provider_key("x"))
        assert len(await client.find_providers_list(provider_key("x"))) == 1
        assert all(host.peer_id not in dht.table for dht in net.dhts)
        assert len(client.table) >= 5


async def test_routing_table_survives_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    path = tmp_path / "routing-table.json"
    async with kad_network(10, memory=memory) as net:
        await net.dhts[5].provide(provider_key("y"))
        identity = KeyPair.generate()
        for round_ in range(2):
            async with (
                open_host(
                    identity,
                    listen=["/memory/0"],
                    transports=[memory.transport()],
                    config=HostConfig(insecure_plaintext=True),
                ) as host,
                trio.open_nursery() as nursery,
            ):
                boot = (net.hosts[0].listen_addrs[0],) if round_ == 0 else ()
                dht = KademliaDHT(host, KadConfig(bootstrap=boot, table_path=path))
                await nursery.start(dht.run)
                assert len(dht.table) >= 5
                assert len(await dht.find_providers_list(provider_key("y"))) == 1
                nursery.cancel_scope.cancel()
            assert path.exists()


# ---- hostile peers ------------------------------------------------------------------------


async def _read(stream: NetStream) -> KadMessage | None:
    reader = FrameReader(max_size=1 << 20)
    while (frame := reader.next_frame()) is None:
        data = await stream.receive_some()
        if not data:
            return None
        reader.receive_data(data)
    return KadMessage.from_bytes(frame, max_size=1 << 20)


def hostile_handler(kind: str, rng: random.Random) -> Callable[[NetStream], object]:
    async def handler(stream: NetStream) -> None:
        request = await _read(stream)
        if request is None:
            return
        if kind == "garbage":
            await stream.send_all(encode_frame(rng.randbytes(200)))
        elif kind == "self-only":
            me = PeerInfo(
                peer_id=stream.connection.host.peer_id,
                addrs=tuple(a.without_peer_id() for a in stream.connection.host.listen_addrs),
            )
            await stream.send_all(
                encode_frame(
                    KadMessage(type=request.type, key=request.key, closer_peers=(me,)).to_bytes()
                )
            )
        elif kind == "flood":
            peers = [
                PeerInfo(peer_id=KeyPair.from_seed(rng.randbytes(32)).peer_id) for _ in range(200)
            ]
            raw = b"".join(encode_frame(p.to_bytes()) for p in peers)
            del raw
            big = KadMessage(type=request.type, key=request.key)
            payload = (
                big.to_bytes()
                + b"".join(
                    b"\x42" + len(p.to_bytes()).to_bytes(1, "big") + p.to_bytes() for p in peers
                )
                * 50
            )
            await stream.send_all(encode_frame(payload[: 1 << 19]))
        elif kind == "wrong-record":
            record = Record(key=b"/dbloom/node/someone-else", value=b"junk")
            await stream.send_all(
                encode_frame(
                    KadMessage(type=request.type, key=request.key, record=record).to_bytes()
                )
            )
        elif kind == "silent":
            await trio.sleep_forever()

    return handler


async def test_lookups_succeed_despite_hostile_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    rng = random.Random(5)
    kinds = ["garbage", "self-only", "flood", "wrong-record", "silent"]
    config = KadConfig(query_timeout=2.0, lookup_timeout=30.0)
    async with kad_network(40, memory=memory, config=lambda i: config, rng=rng) as net:
        hostile = list(range(30, 40))
        for i in hostile:
            net.hosts[i].set_stream_handler(PROTOCOL, hostile_handler(kinds[i % len(kinds)], rng))
        # Poison every honest table with all hostile peers.
        now = trio.current_time()
        for dht in net.dhts[:30]:
            for i in hostile:
                dht.host.peerstore.add_addrs(
                    net.hosts[i].peer_id, [net.hosts[i].listen_addrs[0]], 3600, now
                )
                dht.table.update(net.hosts[i].peer_id, (net.hosts[i].listen_addrs[0],), now)
        for owner in range(0, 30, 3):
            await net.dhts[owner].provide(provider_key(f"k{owner}"))
        start = trio.current_time()
        for owner in range(0, 30, 3):
            asker = (owner + 7) % 30
            found = await net.dhts[asker].find_providers_list(provider_key(f"k{owner}"), count=1)
            assert [p.peer_id for p in found] == [net.hosts[owner].peer_id]
            value_key = node_record_key(net.hosts[owner].peer_id)
            await net.dhts[owner].publish_node_record(b"ok")
            value = await net.dhts[asker].get(value_key, quorum=3)
            assert value is not None and open_node_record(value).data == b"ok"
        # every lookup finished within its timeouts (virtual time)
        assert trio.current_time() - start < 10 * 2 * config.lookup_timeout


async def test_find_peer_learns_addresses_it_never_had(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with kad_network(30, memory=memory) as net:
        asker, target = net.dhts[29], net.hosts[1]
        asker.host.peerstore.prune(float("inf"))  # forget every address learned so far
        assert asker.host.peerstore.addrs(target.peer_id, trio.current_time()) == []
        addrs = await asker.find_peer(target.peer_id)
        assert target.listen_addrs[0].without_peer_id() in addrs
        unknown = KeyPair.generate().peer_id
        assert await asker.find_peer(unknown) == []


async def test_bucket_refresh_sends_keys_that_hash_into_the_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryNetwork(default=LinkProfile(latency=0.01))
    async with kad_network(3, memory=memory) as net:
        dht = net.dhts[0]
        for index in (0, 1, 5, 12):
            key = dht.random_key_in_bucket(index)
            assert key is not None
            assert common_prefix_length(kad_key(key), dht.table.local_key) == index
        assert dht.random_key_in_bucket(200, max_tries=1000) is None
