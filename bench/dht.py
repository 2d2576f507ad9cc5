"""DHT benchmark: lookups over 1,000 and 5,000 in-memory peers with 20 ms links.

Every peer is a real host running the real Kademlia service; the network is the
in-memory one (plaintext, since no byte leaves the process) in virtual time, so
latencies are those the protocol would see, not this machine's CPU speed.
Routing tables start settled (`seed_routing_tables`); churn removes a share of
the peers after the provider records were stored, without telling anyone.

    python bench/dht.py [--sizes 1000 5000] [--lookups 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from contextlib import AsyncExitStack

import trio
import trio.testing

from dbloom.p2p import HostConfig, KeyPair, LinkProfile, MemoryNetwork, PeerId, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key, seed_routing_tables

ONE_WAY = 0.020
RTT = 2 * ONE_WAY


WARM_ASKERS = 20


async def warm_up(dht: KademliaDHT) -> None:
    """What a node does when it starts: a self-lookup and one lookup per bucket."""
    await dht.find_closest_peers(dht.host.peer_id.multihash)
    for index in dht.table.stale_buckets(trio.current_time(), 0.0)[:16]:
        key = dht.random_key_in_bucket(index)
        if key is not None:
            await dht.find_closest_peers(key)


async def timed_provider_lookup(
    asker: KademliaDHT, owner: int, expected: PeerId
) -> tuple[float, bool]:
    """Virtual seconds to find the provider of owner's model, and whether it was found."""
    start = trio.current_time()
    result = await asker.find_providers_list(provider_key(f"dbloom:model:{owner}"), count=1)
    return trio.current_time() - start, bool(result) and result[0].peer_id == expected


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(size: int, churn: float, lookups: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    memory = MemoryNetwork(default=LinkProfile(latency=ONE_WAY), rng=random.Random(seed))
    host_config = HostConfig(insecure_plaintext=True)
    config = KadConfig(query_timeout=2.0, refresh_interval=3600.0)
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
            for _ in range(size)
        ]
        async with trio.open_nursery() as nursery:
            dhts = []
            for host in hosts:
                dht = KademliaDHT(host, config, rng=random.Random(rng.random()))
                await nursery.start(dht.run)
                dhts.append(dht)
            seed_routing_tables(dhts, rng)
            owners = rng.sample(range(size), 50)
            for owner in owners:
                await dhts[owner].provide(provider_key(f"dbloom:model:{owner}"))
            alive = list(range(size))
            if churn:
                others = [i for i in range(size) if i not in set(owners)]
                dead = set(rng.sample(others, int(size * churn)))
                for i in dead:
                    nursery.start_soon(hosts[i].aclose)
                await trio.sleep(1)
                alive = [i for i in range(size) if i not in dead]
            found = 0
            provider_latency: list[float] = []
            hops: list[float] = []
            node_latency: list[float] = []
            for i in range(lookups):
                owner = rng.choice(owners)
                asker = dhts[rng.choice(alive)]
                seconds, ok = await timed_provider_lookup(asker, owner, hosts[owner].peer_id)
                provider_latency.append(seconds)
                found += ok
                if i % 2 == 0:
                    target = hosts[rng.choice(alive)].peer_id.multihash
                    start = trio.current_time()
                    lookup = await asker.find_closest_peers(target)
                    node_latency.append(trio.current_time() - start)
                    hops.append(lookup.hops)
            # A running node has bootstrapped: looked itself up and refreshed every bucket,
            # so it holds connections across the keyspace. Measure from such nodes too.
            warm = rng.sample(alive, WARM_ASKERS)
            for i in warm:
                await warm_up(dhts[i])
            warm_latency: list[float] = []
            warm_found = 0
            for _ in range(lookups // 2):
                owner = rng.choice(owners)
                asker = dhts[rng.choice(warm)]
                seconds, ok = await timed_provider_lookup(asker, owner, hosts[owner].peer_id)
                warm_latency.append(seconds)
                warm_found += ok
            nursery.cancel_scope.cancel()
    return {
        "warm_success": warm_found / (lookups // 2),
        "warm50": pct(warm_latency, 0.5),
        "warm99": pct(warm_latency, 0.99),
        "success": found / lookups,
        "hops50": pct(hops, 0.5),
        "hops99": pct(hops, 0.99),
        "prov50": pct(provider_latency, 0.5),
        "prov99": pct(provider_latency, 0.99),
        "node50": pct(node_latency, 0.5),
        "node99": pct(node_latency, 0.99),
        "mean_hops": statistics.fmean(hops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"one-way latency {ONE_WAY * 1000:.0f} ms (RTT {RTT * 1000:.0f} ms); times are virtual")
    header = (
        f"{'peers':>6} {'churn':>6} {'success':>8} {'hops p50':>8} {'hops p99':>8} "
        f"{'provider p50':>13} {'provider p99':>13} {'closest p50':>12} {'closest p99':>12} "
        f"{'running p50':>12} {'running p99':>12} {'wall s':>7}"
    )
    print(header)
    for size in args.sizes:
        for churn in (0.0, 0.2):
            wall = time.perf_counter()
            r = trio.run(
                scenario,
                size,
                churn,
                args.lookups,
                args.seed,
                clock=trio.testing.MockClock(autojump_threshold=0),
            )
            wall = time.perf_counter() - wall

            def rtts(seconds: float) -> str:
                return f"{seconds * 1000:.0f}ms/{seconds / RTT:.1f}RTT"

            print(
                f"{size:>6} {churn:>6.0%} {r['success']:>8.1%} "
                f"{r['hops50']:>8.0f} {r['hops99']:>8.0f} "
                f"{rtts(r['prov50']):>13} {rtts(r['prov99']):>13} {rtts(r['node50']):>12} "
                f"{rtts(r['node99']):>12} {rtts(r['warm50']):>12} {rtts(r['warm99']):>12} "
                f"{wall:>7.0f}",
                flush=True,
            )
    print(
        "provider: find_providers from a fresh node (every connection cold); closest: a full "
        "k-closest lookup; running: find_providers from a node that has bootstrapped "
        f"(self-lookup and bucket refresh), {WARM_ASKERS} such askers"
    )
    print(
        "targets: success 100% stable, >= 99.5% at 20% churn; hops p50 <= 4 at 1,000; "
        "lookup p50 <= 5 RTT"
    )


if __name__ == "__main__":
    main()
