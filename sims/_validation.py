"""Does the simulator agree with real peers? The same lookups, both ways.

`real_lookups` starts real hosts (Noise, yamux, the trio Kademlia service) on the
in-memory network with a fixed one-way latency, in real time; `simulated_lookups`
builds the same peers (same keys, same settled routing tables) in the simulator.
Both then run the same FIND_NODE lookups one after another. `compare` reduces the
two to hop and latency distributions; `tests/sims/test_validation.py` holds them
to a stated tolerance.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import trio
import trio.testing

from dbloom.p2p import KeyPair, LinkProfile, MemoryNetwork, Multiaddr, PeerId, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, peer_key, settled_neighbours

from ._events import Scheduler
from ._kad import LookupStats, MemoValidator, SimKad
from ._net import SimNetwork
from ._scenario import KadSpec


@dataclass(frozen=True, slots=True)
class Case:
    """A small network and the lookups to run in it."""

    peers: int = 30
    lookups: int = 20
    one_way: float = 0.010
    seed: int = 5
    near: int = 6
    far: int = 4


@dataclass(frozen=True, slots=True)
class Outcome:
    """Per lookup: the hop at which the nearest peer was found, and seconds taken."""

    hops: list[int]
    seconds: list[float]


def _keys(case: Case) -> tuple[list[KeyPair], list[list[int]], list[tuple[int, int]]]:
    rng = random.Random(case.seed)
    keys = [KeyPair.from_seed(rng.randbytes(32)) for _ in range(case.peers)]
    points = [int.from_bytes(peer_key(k.peer_id), "big") for k in keys]
    tables = settled_neighbours(points, rng, near=case.near, far=case.far)
    pairs = [tuple(rng.sample(range(case.peers), 2)) for _ in range(case.lookups)]
    return keys, tables, [(a, b) for a, b in pairs]


async def real_lookups(case: Case) -> Outcome:
    """Run the case on real hosts over the in-memory network, in real time."""
    keys, tables, pairs = _keys(case)
    memory = MemoryNetwork(default=LinkProfile(latency=case.one_way), rng=random.Random(case.seed))
    config = KadConfig(query_timeout=5.0, refresh_interval=3600.0)
    hops: list[int] = []
    seconds: list[float] = []
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(
                open_host(key, listen=["/memory/0"], transports=[memory.transport()])
            )
            for key in keys
        ]
        async with trio.open_nursery() as nursery:
            dhts = []
            for host in hosts:
                dht = KademliaDHT(host, config, rng=random.Random(case.seed))
                await nursery.start(dht.run)
                dhts.append(dht)
            now = trio.current_time()
            for dht, chosen in zip(dhts, tables, strict=True):
                for j in chosen:
                    peer = hosts[j].peer_id
                    addrs = list(hosts[j].listen_addrs)
                    dht.host.peerstore.add_addrs(peer, addrs, 3600.0, now)
                    dht.table.update(peer, tuple(addrs), now)
            for asker, target in pairs:
                start = trio.current_time()
                result = await dhts[asker].find_closest_peers(hosts[target].peer_id.multihash)
                seconds.append(trio.current_time() - start)
                hops.append(result.hops)
            nursery.cancel_scope.cancel()
    return Outcome(hops, seconds)


@dataclass
class _MiniWorld:
    """Just enough world for SimKads: one region, no churn."""

    net: SimNetwork
    scheduler: Scheduler
    kads: dict[PeerId, SimKad] = field(default_factory=dict)
    addrs: dict[PeerId, tuple[Multiaddr, ...]] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    def kad_of(self, peer: PeerId) -> SimKad | None:
        return self.kads.get(peer)

    def addrs_of(self, peer: PeerId) -> tuple[Multiaddr, ...]:
        return self.addrs[peer]

    def note(self, counter: str, amount: int = 1) -> None:
        self.counters[counter] += amount


def simulated_lookups(case: Case) -> Outcome:
    """Run the case in the simulator, in virtual time."""
    keys, tables, pairs = _keys(case)
    hops: list[int] = []
    seconds: list[float] = []

    async def main(clock: trio.testing.MockClock) -> None:
        rtt_ms = 2 * case.one_way * 1000
        net = SimNetwork({("x", "x"): rtt_ms}, bandwidth_mbit=1e6, relay_rtt_ms=0.0)
        world = _MiniWorld(net, Scheduler(clock, random.Random(case.seed)))
        spec = KadSpec(query_timeout=5.0)
        validator = MemoValidator()
        kads = []
        for i, key in enumerate(keys):
            addr = Multiaddr.parse(f"/memory/{i + 1}")
            kad = SimKad(
                key.peer_id, net.add("x"), addr, spec, world, server=True, validator=validator
            )
            world.kads[key.peer_id] = kad
            world.addrs[key.peer_id] = (addr,)
            kads.append(kad)
        for kad, chosen in zip(kads, tables, strict=True):
            for j in chosen:
                kad.table.update(keys[j].peer_id, world.addrs[keys[j].peer_id], 0.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(world.scheduler.run, float("inf"))
            for asker, target in pairs:
                done = trio.Event()
                found: list[LookupStats] = []

                def finished(
                    lookup: object,
                    stats: LookupStats,
                    *,
                    box: list[LookupStats] = found,
                    event: trio.Event = done,
                ) -> None:
                    box.append(stats)
                    event.set()

                from dbloom.p2p.kad import MessageType

                kads[asker].lookup(
                    MessageType.FIND_NODE,
                    keys[target].peer_id.multihash,
                    label="find_node",
                    done=finished,
                )
                await done.wait()
                hops.append(found[0].hops)
                seconds.append(found[0].seconds)
            nursery.cancel_scope.cancel()

    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(main, clock, clock=clock)
    return Outcome(hops, seconds)


def compare(real: Outcome, simulated: Outcome, one_way: float) -> dict[str, float]:
    """Hop and latency figures of both runs side by side (latency in round trips)."""
    rtt = 2 * one_way

    def q(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "real_hops_mean": statistics.fmean(real.hops),
        "sim_hops_mean": statistics.fmean(simulated.hops),
        "real_rtts_p50": q(real.seconds, 0.5) / rtt,
        "sim_rtts_p50": q(simulated.seconds, 0.5) / rtt,
        "real_rtts_p90": q(real.seconds, 0.9) / rtt,
        "sim_rtts_p90": q(simulated.seconds, 0.9) / rtt,
        "real_rtts_mean": statistics.fmean(real.seconds) / rtt,
        "sim_rtts_mean": statistics.fmean(simulated.seconds) / rtt,
    }
