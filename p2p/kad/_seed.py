"""Fill routing tables of many local peers at once, for simulations and benchmarks.

Growing a 5,000-peer network join by join costs minutes of CPU before the first
measurement. A settled network's tables hold each peer's nearest neighbours plus
a sprinkling of far peers; this builds exactly that, then the real protocol runs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio

from ._dht import KademliaDHT
from ._keys import peer_key


def settled_neighbours(
    keys: Sequence[int], rng: random.Random, *, near: int = 40, far: int = 200
) -> list[list[int]]:
    """For each of `keys` (Kademlia keys as integers): its `near` nearest and `far` random others.

    Indices into `keys`; the same shape `seed_routing_tables` offers real peers, so the
    simulator and the benchmarks start from the same kind of settled network.
    """
    order = sorted(range(len(keys)), key=keys.__getitem__)
    position = {index: pos for pos, index in enumerate(order)}
    out = []
    for i, key in enumerate(keys):
        # Sorted order is a good proxy for XOR nearness; refine with the real metric.
        pos = position[i]
        window = order[max(0, pos - near) : pos + near + 1]
        nearest = sorted((j for j in window if j != i), key=lambda j: keys[j] ^ key)[:near]
        others = rng.sample(range(len(keys)), min(far, len(keys)))
        out.append([j for j in (*nearest, *others) if j != i])
    return out


def seed_routing_tables(
    dhts: Sequence[KademliaDHT], rng: random.Random, *, near: int = 40, far: int = 200
) -> None:
    """Offer each peer its `near` nearest peers and `far` random others."""
    now = trio.current_time()
    keys = [int.from_bytes(peer_key(d.host.peer_id), "big") for d in dhts]
    addrs = [tuple(d.host.listen_addrs) for d in dhts]
    for dht, chosen in zip(dhts, settled_neighbours(keys, rng, near=near, far=far), strict=True):
        for j in chosen:
            peer = dhts[j].host.peer_id
            dht.host.peerstore.add_addrs(peer, list(addrs[j]), dht.config.provider_ttl, now)
            dht.table.update(peer, addrs[j], now)
