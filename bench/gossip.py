"""Gossip benchmark: how fast a message reaches every one of 100 in-memory peers.

Every peer is a real host running the real gossipsub service, all subscribed to
one topic; each dials a few random others (so about twice that many links each),
over the in-memory network (plaintext, since no byte leaves the process) with
20 ms one-way links, in virtual time: latencies are what the protocol would
see, not this machine's CPU speed. Random peers publish one message every 50 ms.

    python bench/gossip.py [--peers 100] [--messages 200] [--dials 4]
"""

from __future__ import annotations

import argparse
import random
import time
from contextlib import AsyncExitStack
from dataclasses import replace

import trio
import trio.testing

from dbloom.p2p import HostConfig, KeyPair, LinkProfile, MemoryNetwork, open_host
from dbloom.p2p.gossip import Gossip, GossipConfig, Subscription

ONE_WAY = 0.020
TOPIC = "bench"
SPACING = 0.05


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(
    peers: int, messages: int, dials: int, config: GossipConfig, seed: int
) -> dict[str, float]:
    rng = random.Random(seed)
    memory = MemoryNetwork(default=LinkProfile(latency=ONE_WAY), rng=random.Random(seed))
    host_config = HostConfig(insecure_plaintext=True)
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(
                open_host(
                    KeyPair.from_seed(rng.randbytes(32)),
                    listen=["/memory/0"],
                    transports=[memory.transport()],
                    config=host_config,
                )
            )
            for _ in range(peers)
        ]
        arrivals: dict[bytes, list[tuple[int, float]]] = {}

        async def collect(peer: int, subscription: Subscription) -> None:
            async for message in subscription:
                arrivals.setdefault(message.id, []).append((peer, trio.current_time()))

        async with trio.open_nursery() as nursery:
            gossips = []
            for i, host in enumerate(hosts):
                gossip = Gossip(host, config, rng=random.Random(rng.random()))
                await nursery.start(gossip.run)
                nursery.start_soon(collect, i, gossip.subscribe(TOPIC))
                gossips.append(gossip)
            async with trio.open_nursery() as dialing:
                for i, host in enumerate(hosts):
                    others = [j for j in range(peers) if j != i]
                    for j in rng.sample(others, dials):
                        dialing.start_soon(host.connect, hosts[j].listen_addrs[0])
            await trio.sleep(5)  # identify, subscriptions, meshes
            sent: dict[bytes, tuple[int, float]] = {}
            for _ in range(messages):
                publisher = rng.randrange(peers)
                message = await gossips[publisher].publish(TOPIC, rng.randbytes(64))
                sent[message.id] = (publisher, trio.current_time())
                await trio.sleep(SPACING)
            await trio.sleep(10)  # stragglers recovered by gossip, if any
            stats = [g.stats() for g in gossips]
            nursery.cancel_scope.cancel()
    # Deliveries to the other peers (a publisher gets its own message at once).
    remote = {
        mid: [t - sent[mid][1] for peer, t in times if peer != sent[mid][0]]
        for mid, times in arrivals.items()
    }
    latencies = [latency for times in remote.values() for latency in times]
    reach_all = [max(times) for times in remote.values() if len(times) == peers - 1]
    received = sum(s.rpcs_received for s in stats)
    copies = sum(s.duplicates for s in stats) + len(latencies)
    return {
        "delivered": len(latencies) / (messages * (peers - 1)),
        "p50": pct(latencies, 0.5),
        "p99": pct(latencies, 0.99),
        "all50": pct(reach_all, 0.5) if reach_all else float("nan"),
        "all99": pct(reach_all, 0.99) if reach_all else float("nan"),
        "copies": copies / len(latencies),  # received per delivery to a peer
        "rpcs": received / messages,
        "mesh": sum(s.mesh[TOPIC] for s in stats) / peers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--dials", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        f"{args.peers} peers, each dialing {args.dials}; one-way latency "
        f"{ONE_WAY * 1000:.0f} ms; {args.messages} messages from random peers; times are virtual"
    )
    header = (
        f"{'publishing':>11} {'delivered':>9} {'p50':>7} {'p99':>7} {'all p50':>8} "
        f"{'all p99':>8} {'copies':>7} {'RPCs/msg':>9} {'mesh':>5} {'wall s':>7}"
    )
    print(header)
    for name, flood in (("flood", True), ("mesh", False)):
        config = replace(GossipConfig(), flood_publish=flood)
        wall = time.perf_counter()
        r = trio.run(
            scenario,
            args.peers,
            args.messages,
            args.dials,
            config,
            args.seed,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
        wall = time.perf_counter() - wall

        def ms(seconds: float) -> str:
            return f"{seconds * 1000:.0f}ms"

        print(
            f"{name:>11} {r['delivered']:>9.2%} {ms(r['p50']):>7} {ms(r['p99']):>7} "
            f"{ms(r['all50']):>8} {ms(r['all99']):>8} {r['copies']:>7.1f} {r['rpcs']:>9.0f} "
            f"{r['mesh']:>5.1f} {wall:>7.0f}",
            flush=True,
        )
    print(
        "p50/p99: publish to delivery at each other peer; all: until the last one had it; copies: "
        "messages received per delivery (the mesh's redundancy); mesh: mean mesh degree"
    )
    print("flood: our own messages go to every topic peer (v1.1 default); mesh: to the mesh only")


if __name__ == "__main__":
    main()
