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


def seed_routing_tables(
    dhts: Sequence[KademliaDHT], rng: random.Random, *, near: int = 40, far: int = 200
) -> None:
    """Offer each peer its `near` nearest peers and `far` random others."""
    now = trio.current_time()
    keys = [int.from_bytes(peer_key(d.host.peer_id), "big") for d in dhts]
    addrs = [tuple(d.host.listen_addrs) for d in dhts]
    order = sorted(range(len(dhts)), key=keys.__getitem__)
    position = {index: pos for pos, index in enumerate(order)}
    for i, dht in enumerate(dhts):
        # Sorted order is a good proxy for XOR nearness; refine with the real metric.
        pos = position[i]
        window = order[max(0, pos - near) : pos + near + 1]
        nearest = sorted((j for j in window if j != i), key=lambda j: keys[j] ^ keys[i])[:near]
        others = rng.sample(range(len(dhts)), min(far, len(dhts)))
        for j in (*nearest, *others):
            if j == i:
                continue
            peer = dhts[j].host.peer_id
            dht.host.peerstore.add_addrs(peer, list(addrs[j]), dht.config.provider_ttl, now)
            dht.table.update(peer, addrs[j], now)
