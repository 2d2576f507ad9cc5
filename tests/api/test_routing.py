"""The router's ranking under live load: pure, so every case runs without a network."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

from node_records import make_offer, make_record

from dbloom.api._routing import Candidate, Router, RoutingPolicy
from dbloom.p2p import KeyPair

OFFER = make_offer()
RECORD = make_record()


def node(seed: int, **record_changes: int) -> Candidate:
    peer = KeyPair.from_seed(bytes([seed]) * 32).peer_id
    return Candidate(peer=peer, record=replace(RECORD, **record_changes), offer=OFFER, addrs=())


def router(seed: int = 1) -> Router:
    return Router(RoutingPolicy(allowed_kinds=frozenset({"dev"})), rng=random.Random(seed))


def test_equal_idle_nodes_each_get_first_picks() -> None:
    r = router()
    pool = [node(1), node(2), node(3)]
    firsts = Counter(r.order(pool, 0)[0].peer for _ in range(300))
    assert set(firsts) == {c.peer for c in pool}
    assert min(firsts.values()) > 60


def test_live_in_flight_spreads_a_burst_evenly() -> None:
    r = router()
    pool = [node(1), node(2), node(3)]
    for _ in range(300):
        r.started(r.order(pool, 0)[0].peer)
    counts = [r.in_flight(c.peer) for c in pool]
    assert sum(counts) == 300 and max(counts) - min(counts) <= 3


def test_finished_requests_stop_counting() -> None:
    r = router()
    a, b = node(1), node(2)
    for _ in range(20):
        r.started(a.peer)
    assert all(r.order([a, b], 0)[0] == b for _ in range(50))
    for _ in range(20):
        r.finished(a.peer)
    assert r.in_flight(a.peer) == 0
    assert {r.order([a, b], 0)[0] for _ in range(50)} == {a, b}


def test_a_record_showing_more_load_than_ours_still_counts() -> None:
    r = router()
    loaded, idle = node(1, active=8), node(2)
    assert all(r.order([loaded, idle], 0)[0] == idle for _ in range(50))
    for _ in range(12):  # now our own requests make the idle one the busier
        r.started(idle.peer)
    assert all(r.order([loaded, idle], 0)[0] == loaded for _ in range(50))


def test_measured_round_trips_rank_nearer_nodes_first() -> None:
    r = router()
    near, far = node(1), node(2)
    r.measured(near.peer, 0.001)
    r.measured(far.peer, 0.2)
    assert all(r.order([near, far], 0)[0] == near for _ in range(50))
