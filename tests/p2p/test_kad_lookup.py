"""The sans-IO lookup: unit rules, then whole simulated networks, honest and hostile."""

from __future__ import annotations

import functools
import heapq
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbloom.p2p._identity import PeerId
from dbloom.p2p.kad._keys import KEY_BITS, peer_key
from dbloom.p2p.kad._lookup import DEFAULT_SLOW_AFTER, Finished, Lookup, Query, Waiting
from dbloom.p2p.kad._table import RoutingTable


def make_peer(raw: bytes) -> PeerId:
    """A sha2-256 peer id over arbitrary digest bytes: cheap, valid, and well spread."""
    return PeerId(b"\x12\x20" + raw)


def key_int(peer: PeerId) -> int:
    return int.from_bytes(peer_key(peer), "big")


def by_distance(peers: Sequence[PeerId], target: bytes) -> list[PeerId]:
    goal = int.from_bytes(target, "big")
    return sorted(peers, key=lambda p: key_int(p) ^ goal)


def queries(lookup: Lookup, now: float) -> list[PeerId]:
    """Every Query `next` hands out at `now`, until it says to wait or stops."""
    sent = []
    while isinstance(step := lookup.next(now), Query):
        sent.append(step.peer)
    return sent


TARGET = bytes(32)
_RNG = random.Random(1)
PEERS = by_distance([make_peer(_RNG.randbytes(32)) for _ in range(64)], TARGET)
"""Peers nearest `TARGET` first, so tests can say which one a lookup should ask next."""


# -- unit rules -----------------------------------------------------------------------------------


def test_no_seeds_finishes_at_once() -> None:
    lookup = Lookup(TARGET, [], now=0.0)
    assert lookup.next(0.0) == Finished()
    assert lookup.finished and not lookup.timed_out
    assert lookup.closest() == [] and lookup.hops == 0 and lookup.contacted == 0


def test_alpha_queries_nearest_first_then_waits() -> None:
    lookup = Lookup(TARGET, PEERS[:10][::-1], alpha=3, k=5, peer_timeout=10.0, now=0.0)
    assert queries(lookup, 0.0) == PEERS[:3]
    assert lookup.in_flight == (3,)
    step = lookup.next(1.0)
    assert step == Waiting(until=DEFAULT_SLOW_AFTER)  # when the first query turns slow
    assert lookup.on_success(PEERS[0], [], 2.0)
    assert queries(lookup, 2.0) == [PEERS[3]]
    assert lookup.contacted == 4 and lookup.succeeded == 1


def test_waiting_until_is_capped_by_the_lookup_deadline() -> None:
    lookup = Lookup(
        TARGET, PEERS[:1], peer_timeout=10.0, slow_after=10.0, lookup_timeout=4.0, now=0.0
    )
    assert queries(lookup, 0.0) == PEERS[:1]
    assert lookup.next(0.0) == Waiting(until=4.0)
    assert lookup.next(4.0) == Finished()
    assert lookup.timed_out
    assert not lookup.on_success(PEERS[0], [], 4.5)  # too late: the lookup is over


def test_timeout_fails_the_query_and_frees_its_slot() -> None:
    lookup = Lookup(TARGET, PEERS[:3], alpha=1, k=3, peer_timeout=5.0, slow_after=5.0, now=0.0)
    assert queries(lookup, 0.0) == [PEERS[0]]
    assert queries(lookup, 4.9) == []
    assert queries(lookup, 5.0) == [PEERS[1]]
    assert lookup.failed == 1 and lookup.in_flight == (1,)
    # The late reply is ignored: the peer already counts as failed.
    assert not lookup.on_success(PEERS[0], PEERS[10:20], 6.0)
    assert lookup.succeeded == 0


def test_a_slow_peer_frees_its_slot_and_is_not_awaited() -> None:
    lookup = Lookup(TARGET, PEERS[:4], alpha=1, k=2, peer_timeout=10.0, slow_after=2.0, now=0.0)
    assert queries(lookup, 0.0) == [PEERS[0]]
    assert lookup.next(1.0) == Waiting(until=2.0)
    assert queries(lookup, 2.0) == [PEERS[1]]  # PEERS[0] is slow: its slot is free
    assert lookup.in_flight == (1,) and lookup.outstanding == 2
    assert lookup.on_success(PEERS[1], [], 2.5)
    assert queries(lookup, 2.5) == [PEERS[2]]
    assert lookup.on_success(PEERS[2], [], 3.0)
    # PEERS[1] and PEERS[2] answered; the silent nearest one no longer holds the lookup.
    assert lookup.next(3.0) == Finished()
    assert lookup.closest() == [PEERS[1], PEERS[2]]


def test_a_lone_slow_seed_is_waited_for() -> None:
    # A fresh node with one bootstrap peer behind a slow path must not give up at 3 s.
    lookup = Lookup(TARGET, [PEERS[9]], alpha=3, k=3, peer_timeout=10.0, slow_after=3.0, now=0.0)
    assert queries(lookup, 0.0) == [PEERS[9]]
    assert lookup.next(3.0) == Waiting(until=10.0)
    assert lookup.on_success(PEERS[9], PEERS[:3], 5.0)
    assert queries(lookup, 5.0) == PEERS[:3]


def test_a_slow_reply_before_the_timeout_still_counts() -> None:
    lookup = Lookup(TARGET, PEERS[5:8], alpha=1, k=3, peer_timeout=10.0, slow_after=2.0, now=0.0)
    assert queries(lookup, 0.0) == [PEERS[5]]
    assert queries(lookup, 2.0) == [PEERS[6]]
    assert lookup.on_success(PEERS[5], PEERS[:2], 3.5)  # slow, but in time
    assert lookup.succeeded == 1 and lookup.outstanding == 1 and lookup.in_flight == (1,)
    assert queries(lookup, 3.9) == []  # α is 1 and PEERS[6] is not slow yet
    assert queries(lookup, 4.0) == [PEERS[0]]  # PEERS[6] turns slow at 4.0
    assert not lookup.on_success(PEERS[6], [], 12.0)  # past its timeout: failed
    assert lookup.failed == 1 and lookup.in_flight == (1,)


def test_reply_at_the_timeout_counts_as_failure_whatever_the_call_order() -> None:
    lookup = Lookup(TARGET, PEERS[:2], alpha=1, k=2, peer_timeout=5.0, now=0.0)
    queries(lookup, 0.0)
    assert not lookup.on_success(PEERS[0], [], 5.0)
    assert lookup.failed == 1 and lookup.in_flight == (0,)


def test_unsolicited_and_duplicate_replies_are_ignored() -> None:
    lookup = Lookup(TARGET, PEERS[5:7], alpha=1, k=2, now=0.0)
    assert queries(lookup, 0.0) == [PEERS[5]]
    assert not lookup.on_success(PEERS[6], PEERS[:4], 1.0)  # not queried yet
    assert not lookup.on_failure(PEERS[30], 1.0)  # never heard of
    assert lookup.on_success(PEERS[5], [], 1.0)
    assert not lookup.on_success(PEERS[5], PEERS[:4], 1.0)  # answered twice
    assert not lookup.on_failure(PEERS[5], 1.0)
    assert queries(lookup, 1.0) == [PEERS[6]]  # nothing from the ignored replies


def test_local_id_and_responder_are_never_queried() -> None:
    local = PEERS[0]
    lookup = Lookup(TARGET, [local, PEERS[9]], alpha=3, k=3, local=local, now=0.0)
    assert queries(lookup, 0.0) == [PEERS[9]]
    assert lookup.on_success(PEERS[9], [local, PEERS[9], PEERS[4], PEERS[4]], 1.0)
    assert queries(lookup, 1.0) == [PEERS[4]]


def test_only_the_k_nearest_of_a_huge_reply_are_used() -> None:
    rng = random.Random(2)
    flood = [make_peer(rng.randbytes(32)) for _ in range(10_000)]
    nearest = by_distance(flood, TARGET)[:4]
    lookup = Lookup(TARGET, [PEERS[-1]], alpha=10, k=4, now=0.0)
    queries(lookup, 0.0)
    assert lookup.on_success(PEERS[-1], flood, 1.0)
    assert queries(lookup, 1.0) == nearest


def test_finishes_when_the_k_nearest_answered_even_with_farther_queries_out() -> None:
    lookup = Lookup(TARGET, PEERS[:6], alpha=6, k=3, now=0.0)
    assert len(queries(lookup, 0.0)) == 6
    for peer in PEERS[:2]:
        lookup.on_success(peer, [], 1.0)
    assert isinstance(lookup.next(1.0), Waiting)  # PEERS[2] may still name closer peers
    lookup.on_success(PEERS[2], [], 1.0)
    assert lookup.next(1.0) == Finished()
    assert lookup.closest() == PEERS[:3]
    assert lookup.in_flight == (3,)  # abandoned: the shell cancels them


def test_failed_peers_make_room_for_farther_ones() -> None:
    lookup = Lookup(TARGET, PEERS[:5], alpha=5, k=3, now=0.0)
    queries(lookup, 0.0)
    lookup.on_failure(PEERS[0], 1.0)
    for peer in PEERS[1:4]:
        lookup.on_success(peer, [], 1.0)
    assert lookup.next(1.0) == Finished()
    assert lookup.closest() == PEERS[1:4]
    assert (lookup.failed, lookup.succeeded, lookup.contacted) == (1, 3, 5)


def test_hops_count_from_the_seeds() -> None:
    lookup = Lookup(TARGET, [PEERS[40]], alpha=1, k=1, now=0.0)
    assert queries(lookup, 0.0) == [PEERS[40]]
    lookup.on_success(PEERS[40], [PEERS[20]], 1.0)
    assert queries(lookup, 1.0) == [PEERS[20]]
    lookup.on_success(PEERS[20], [PEERS[3], PEERS[30]], 2.0)
    assert queries(lookup, 2.0) == [PEERS[3]]
    lookup.on_success(PEERS[3], [PEERS[30]], 3.0)
    assert lookup.next(3.0) == Finished()
    assert lookup.closest() == [PEERS[3]]
    assert lookup.hops == 3


def test_disjoint_paths_split_seeds_and_keep_their_findings_apart() -> None:
    lookup = Lookup(TARGET, PEERS[10:14], alpha=1, k=2, disjoint_paths=2, now=0.0)
    # Seeds are dealt round-robin nearest first: path 0 gets 10 and 12, path 1 gets 11 and 13.
    assert queries(lookup, 0.0) == [PEERS[10], PEERS[11]]
    assert lookup.in_flight == (1, 1)
    # Path 1 learns of PEERS[0] and PEERS[12]; 12 belongs to path 0's seeds but is unclaimed.
    lookup.on_success(PEERS[11], [PEERS[0], PEERS[12]], 1.0)
    assert queries(lookup, 1.0) == [PEERS[0]]
    lookup.on_success(PEERS[0], [], 2.0)
    assert queries(lookup, 2.0) == []
    lookup.on_success(PEERS[10], [], 3.0)
    # Both paths want PEERS[12]: the first to claim it queries it; the other waits on it.
    assert queries(lookup, 3.0) == [PEERS[12]]
    assert lookup.in_flight == (1, 0)
    lookup.on_success(PEERS[12], [PEERS[1]], 4.0)
    # Path 1 never hears of PEERS[1], which only path 0's peer named.
    assert queries(lookup, 4.0) == [PEERS[1]]
    assert lookup.in_flight == (1, 0)
    lookup.on_success(PEERS[1], [], 5.0)
    assert lookup.next(5.0) == Finished()
    assert lookup.closest() == [PEERS[0], PEERS[1]]


def test_constructor_validates() -> None:
    bad: list[Callable[[], Lookup]] = [
        lambda: Lookup(TARGET, [], alpha=0, now=0.0),
        lambda: Lookup(TARGET, [], k=0, now=0.0),
        lambda: Lookup(TARGET, [], disjoint_paths=0, now=0.0),
        lambda: Lookup(TARGET, [], peer_timeout=0.0, now=0.0),
        lambda: Lookup(TARGET, [], slow_after=0.0, now=0.0),
        lambda: Lookup(TARGET, [], lookup_timeout=-1.0, now=0.0),
        lambda: Lookup(b"short", [], now=0.0),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


# -- random event orders --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    alpha=st.integers(1, 4),
    k=st.integers(1, 6),
    paths=st.integers(1, 4),
    seed_count=st.integers(0, 12),
    data=st.data(),
)
def test_random_event_orders_keep_the_invariants(
    alpha: int, k: int, paths: int, seed_count: int, data: st.DataObject
) -> None:
    pool = PEERS[:40]
    local = PEERS[data.draw(st.integers(0, 39))]
    seeds = data.draw(st.lists(st.sampled_from(pool), max_size=seed_count))
    lookup = Lookup(
        TARGET,
        seeds,
        alpha=alpha,
        k=k,
        peer_timeout=5.0,
        lookup_timeout=1000.0,
        disjoint_paths=paths,
        local=local,
        now=0.0,
    )
    now = 0.0
    queried: set[PeerId] = set()
    outstanding: list[PeerId] = []

    def check() -> None:
        assert all(0 <= n <= alpha for n in lookup.in_flight)
        assert lookup.contacted == lookup.succeeded + lookup.failed + lookup.outstanding
        assert sum(lookup.in_flight) <= lookup.outstanding
        assert lookup.contacted == len(queried)
        assert lookup.closest() == by_distance(lookup.closest(), TARGET)
        assert len(lookup.closest()) <= k

    # A random interleaving of next() calls, replies, failures, stray replies and time.
    for _ in range(data.draw(st.integers(0, 60))):
        action = data.draw(st.sampled_from(["next", "success", "failure", "stray", "tick"]))
        if action == "next":
            step = lookup.next(now)
            if isinstance(step, Query):
                assert step.peer not in queried and step.peer != local
                queried.add(step.peer)
                outstanding.append(step.peer)
            elif isinstance(step, Waiting):
                assert step.until > now
        elif action in ("success", "failure") and outstanding:
            peer = outstanding.pop(data.draw(st.integers(0, len(outstanding) - 1)))
            if action == "success":
                closer = data.draw(st.lists(st.sampled_from(pool), max_size=8))
                lookup.on_success(peer, closer, now)
            else:
                lookup.on_failure(peer, now)
        elif action == "stray":
            assert not lookup.on_success(data.draw(st.sampled_from(PEERS[40:])), pool, now)
        elif action == "tick":
            now += data.draw(st.sampled_from([0.5, 2.0, 5.0]))
        check()

    # However we got here, answering everything eventually finishes the lookup.
    for _ in range(10 * len(pool) + 10):
        step = lookup.next(now)
        if isinstance(step, Finished):
            break
        if isinstance(step, Query):
            assert step.peer not in queried and step.peer != local
            queried.add(step.peer)
            lookup.on_success(
                step.peer, data.draw(st.lists(st.sampled_from(pool), max_size=8)), now
            )
        else:
            now = step.until
        check()
    else:
        raise AssertionError("lookup did not finish")
    answered = lookup.closest()
    assert set(answered) <= queried


# -- simulated networks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    peers: list[PeerId]
    tables: dict[PeerId, RoutingTable]

    def truth(self, target: bytes, k: int, among: Sequence[PeerId]) -> list[PeerId]:
        return by_distance(among, target)[:k]


@functools.cache
def network(n: int, seed: int) -> Network:
    """`n` peers, each with a real `RoutingTable`: its neighbours in key order (which
    include its nearest peers by XOR) plus random peers across the keyspace."""
    rng = random.Random(seed)
    peers = [make_peer(rng.randbytes(32)) for _ in range(n)]
    ordered = sorted(peers, key=key_int)
    tables = {}
    for i, peer in enumerate(ordered):
        table = RoutingTable(peer)
        for other in ordered[max(0, i - 30) : i + 31]:
            table.update(other, (), 0.0)
        for other in rng.sample(peers, 60):
            table.update(other, (), 0.0)
        tables[peer] = table
    return Network(peers, tables)


class Silent:
    """A peer that never answers."""


SILENT = Silent()
Reply = list[PeerId] | None | Silent  # closer peers, an error, or nothing at all


@dataclass
class Run:
    lookup: Lookup
    queried: list[PeerId]
    peak_in_flight: int
    elapsed: float


def drive(
    lookup: Lookup,
    respond: Callable[[PeerId], Reply],
    rng: random.Random,
    *,
    latency: tuple[float, float] = (0.01, 0.5),
) -> Run:
    """Play the shell: send each Query, deliver replies in order of random latency,
    and sleep until `Waiting.until` when nothing arrives sooner."""
    now = 0.0
    queried: list[PeerId] = []
    seen: set[PeerId] = set()
    replies: list[tuple[float, int, PeerId, list[PeerId] | None]] = []
    peak = 0
    for _ in range(100_000):
        step = lookup.next(now)
        if isinstance(step, Query):
            assert step.peer not in seen, "a peer was queried twice"
            seen.add(step.peer)
            queried.append(step.peer)
            assert all(n <= lookup.alpha for n in lookup.in_flight)
            peak = max(peak, max(lookup.in_flight))
            reply = respond(step.peer)
            if not isinstance(reply, Silent):
                at = now + rng.uniform(*latency)
                heapq.heappush(replies, (at, len(queried), step.peer, reply))
        elif isinstance(step, Finished):
            return Run(lookup, queried, peak, now)
        else:
            assert step.until > now
            if replies and replies[0][0] < step.until:
                now, _, peer, closer = heapq.heappop(replies)
                if closer is None:
                    lookup.on_failure(peer, now)
                else:
                    lookup.on_success(peer, closer, now)
            else:
                now = step.until
    raise AssertionError("lookup did not finish")


def honest(net: Network, target: bytes, k: int = 20) -> Callable[[PeerId], Reply]:
    def respond(peer: PeerId) -> Reply:
        table = net.tables.get(peer)
        return None if table is None else [e.peer for e in table.closest(target, k)]

    return respond


def start(
    net: Network, rng: random.Random, *, peer_timeout: float = 10.0
) -> tuple[PeerId, bytes, Lookup]:
    """A lookup for a random target from a random member, seeded from its own table."""
    local = rng.choice(net.peers)
    target = rng.randbytes(32)
    seeds = [e.peer for e in net.tables[local].closest(target, 20)]
    lookup = Lookup(target, seeds, peer_timeout=peer_timeout, local=local, now=0.0)
    return local, target, lookup


def test_honest_network_lookups_find_the_true_k_closest_in_few_hops() -> None:
    net = network(2000, seed=1)
    rng = random.Random(100)
    hops = []
    for _ in range(30):
        local, target, lookup = start(net, rng)
        run = drive(lookup, honest(net, target), rng)
        others = [p for p in net.peers if p != local]
        assert lookup.closest() == net.truth(target, 20, others)
        assert not lookup.timed_out and lookup.failed == 0
        assert run.peak_in_flight == lookup.alpha
        hops.append(lookup.hops)
    assert max(hops) <= math.log2(2000)
    assert statistics.mean(hops) <= 4


def test_hostile_responders_do_not_stop_an_honest_lookup() -> None:
    net = network(2000, seed=1)
    rng = random.Random(200)
    self_only = set(rng.sample(net.peers, 200))
    flooders = set(rng.sample([p for p in net.peers if p not in self_only], 200))
    silent = set(rng.sample([p for p in net.peers if p not in self_only | flooders], 200))
    junk = [make_peer(rng.randbytes(32)) for _ in range(20_000)]
    for _ in range(10):
        local, target, lookup = start(net, rng, peer_timeout=1.0)
        goal = int.from_bytes(target, "big")
        far = [p for p in junk if (key_int(p) ^ goal) >> (KEY_BITS - 1)][:10_000]
        answer = honest(net, target)

        def respond(peer: PeerId) -> Reply:
            if peer in self_only:
                return [peer]
            if peer in flooders:
                return far  # noqa: B023 - used before the loop moves on
            if peer in silent:
                return SILENT
            return answer(peer)  # noqa: B023

        drive(lookup, respond, rng)
        assert not lookup.timed_out
        # Every answering peer among the true 20 closest is found. (Silent peers in
        # honest tables crowd their 20-peer replies, so the last places may differ.)
        truth = net.truth(target, 20, [p for p in net.peers if p != local])
        assert {p for p in truth if p not in silent} <= set(lookup.closest())
        assert not silent & set(lookup.closest())


def test_unreachable_junk_near_the_target_costs_only_failures() -> None:
    net = network(2000, seed=1)
    rng = random.Random(300)
    liars = set(rng.sample(net.peers, 100))
    junk = [make_peer(rng.randbytes(32)) for _ in range(2000)]  # not in the network
    for _ in range(5):
        local, target, lookup = start(net, rng)
        answer = honest(net, target)

        def respond(peer: PeerId) -> Reply:
            return junk if peer in liars else answer(peer)  # noqa: B023

        drive(lookup, respond, rng)
        others = [p for p in net.peers if p != local]
        assert lookup.closest() == net.truth(target, 20, others)


@functools.cache
def sybils() -> RoutingTable:
    """100,000 identities an adversary minted offline, indexed so it can pick the
    ones nearest any target (a routing table that keeps everything is such an index)."""
    rng = random.Random(99)
    index = RoutingTable(make_peer(bytes(32)), k=1_000_000, replacements=0)
    for _ in range(100_000):
        index.update(make_peer(rng.randbytes(32)), (), 0.0)
    return index


def reach_rate(net: Network, paths: int, trials: int, seed: int) -> float:
    """How often a lookup reaches (queries) the honest peer nearest the target while
    half the network colludes in an eclipse: every malicious peer answers with the
    adversary's 20 identities nearest the target, which answer the same way. Those
    sit nearer the target than almost every honest peer, so a path that meets one
    finishes among them."""
    rng = random.Random(seed)
    malicious = set(rng.sample(net.peers, len(net.peers) // 2))
    honest_peers = [p for p in net.peers if p not in malicious]
    hits = 0
    for _ in range(trials):
        local = rng.choice(honest_peers)
        target = rng.randbytes(32)
        lures = [e.peer for e in sybils().closest(target, 20)]
        liars = malicious | set(lures)
        answer = honest(net, target)

        def respond(peer: PeerId) -> Reply:
            return lures if peer in liars else answer(peer)  # noqa: B023

        seeds = [e.peer for e in net.tables[local].closest(target, 20 * paths)]
        lookup = Lookup(target, seeds, disjoint_paths=paths, local=local, now=0.0)
        run = drive(lookup, respond, rng)
        best = by_distance([p for p in honest_peers if p != local], target)[0]
        hits += best in run.queried
    return hits / trials


def test_disjoint_paths_resist_a_poisoned_path() -> None:
    net = network(2000, seed=1)
    one = reach_rate(net, paths=1, trials=40, seed=7)
    four = reach_rate(net, paths=4, trials=40, seed=7)
    assert four >= one + 0.25, (one, four)
    assert four >= 0.85, (one, four)


@pytest.mark.slow  # building the 5,000 routing tables takes seconds; each lookup, milliseconds
def test_lookup_cpu_time_on_a_5000_peer_network() -> None:
    net = network(5000, seed=2)
    rng = random.Random(400)
    times = []
    for _ in range(20):
        local, target, lookup = start(net, rng)
        respond = honest(net, target)
        begin = time.process_time()
        drive(lookup, respond, rng)
        times.append(time.process_time() - begin)
        assert lookup.closest() == net.truth(target, 20, [p for p in net.peers if p != local])
    # About 2 ms each on a laptop, the simulated peers' answers included.
    assert statistics.median(times) < 0.02, times
