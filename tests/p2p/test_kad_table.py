"""The sans-IO routing table: bucket placement, full buckets, refresh and persistence."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbloom.p2p._identity import PeerId
from dbloom.p2p._multiaddr import Multiaddr
from dbloom.p2p.kad._keys import KEY_BITS, common_prefix_length, distance, peer_key
from dbloom.p2p.kad._table import (
    Cached,
    Entry,
    Ignored,
    Inserted,
    Pending,
    RoutingTable,
    Updated,
)

ADDR = (Multiaddr.parse("/ip4/10.0.0.1/tcp/4001"),)
OTHER_ADDR = (Multiaddr.parse("/ip4/10.0.0.2/tcp/4001"),)


def make_peer(raw: bytes) -> PeerId:
    """A sha2-256 peer id over arbitrary digest bytes: cheap, valid, and well spread."""
    return PeerId(b"\x12\x20" + raw)


def random_peers(rng: random.Random, n: int) -> list[PeerId]:
    return [make_peer(rng.randbytes(32)) for _ in range(n)]


LOCAL = make_peer(bytes(32))
LOCAL_KEY = peer_key(LOCAL)


def bucket_of(peer: PeerId, local: PeerId = LOCAL) -> int:
    index: int = common_prefix_length(peer_key(local), peer_key(peer))
    return index


def peers_in_bucket(index: int, count: int, seed: int = 1) -> list[PeerId]:
    rng = random.Random(seed)
    found: list[PeerId] = []
    while len(found) < count:
        peer = make_peer(rng.randbytes(32))
        if bucket_of(peer) == index:
            found.append(peer)
    return found


def brute_closest(
    table: RoutingTable, target: bytes, n: int, exclude: frozenset[PeerId] = frozenset()
) -> list[PeerId]:
    entries = [table.get(p) for p in table.peers() if p not in exclude]
    ranked = sorted((e for e in entries if e is not None), key=lambda e: distance(e.key, target))
    return [e.peer for e in ranked[:n]]


# -- placement and updates ----------------------------------------------------------------------


def test_peers_land_in_bucket_of_common_prefix_length() -> None:
    table = RoutingTable(LOCAL)
    for peer in random_peers(random.Random(7), 200):
        table.update(peer, ADDR, 1.0)
    assert len(table) > 0
    for peer in table.peers():
        index = bucket_of(peer)
        assert any(e.peer == peer for e in table.bucket(index))
        entry = table.get(peer)
        assert entry is not None and entry.key == peer_key(peer)
        assert peer in table
    assert sum(len(table.bucket(i)) for i in range(KEY_BITS)) == len(table)


def test_our_own_id_is_ignored() -> None:
    table = RoutingTable(LOCAL)
    assert table.update(LOCAL, ADDR, 0.0) == Ignored()
    assert len(table) == 0 and LOCAL not in table


def test_insert_then_update_refreshes_and_keeps_addresses_when_none_given() -> None:
    table = RoutingTable(LOCAL)
    a, b = peers_in_bucket(0, 2)
    result = table.update(a, ADDR, 1.0)
    assert isinstance(result, Inserted) and result.entry.last_seen == 1.0
    table.update(b, ADDR, 2.0)
    assert [e.peer for e in table.bucket(0)] == [a, b]
    result = table.update(a, (), 3.0)
    assert isinstance(result, Updated)
    assert result.entry.addrs == ADDR and result.entry.last_seen == 3.0
    assert [e.peer for e in table.bucket(0)] == [b, a]
    table.update(a, OTHER_ADDR, 4.0)
    entry = table.get(a)
    assert entry is not None and entry.addrs == OTHER_ADDR


def test_full_bucket_asks_to_ping_the_least_recently_seen() -> None:
    table = RoutingTable(LOCAL, k=3)
    a, b, c, d, e = peers_in_bucket(0, 5)
    for t, peer in enumerate((a, b, c)):
        assert isinstance(table.update(peer, ADDR, float(t)), Inserted)
    table.update(a, ADDR, 5.0)  # a is now the freshest; b is the least recently seen
    result = table.update(d, ADDR, 6.0)
    assert isinstance(result, Pending)
    assert result.candidate.peer == b
    assert d not in table
    assert [x.peer for x in table.replacements(0)] == [d]
    # A check is already out for this bucket: the next newcomer just waits.
    assert isinstance(table.update(e, ADDR, 7.0), Cached)
    assert [x.peer for x in table.replacements(0)] == [d, e]


def test_alive_candidate_stays_and_replacement_stays_cached() -> None:
    table = RoutingTable(LOCAL, k=2)
    a, b, c = peers_in_bucket(0, 3)
    table.update(a, ADDR, 0.0)
    table.update(b, ADDR, 1.0)
    result = table.update(c, ADDR, 2.0)
    assert isinstance(result, Pending) and result.candidate.peer == a
    assert table.on_liveness(a, True, 3.0) is None
    entry = table.get(a)
    assert entry is not None and entry.last_seen == 3.0
    assert set(table.peers()) == {a, b}
    assert [x.peer for x in table.replacements(0)] == [c]
    # The check is settled, so the next newcomer asks about the new least recently seen.
    d = peers_in_bucket(0, 4)[3]
    result = table.update(d, ADDR, 4.0)
    assert isinstance(result, Pending) and result.candidate.peer == b


def test_dead_candidate_is_replaced_by_the_freshest_replacement() -> None:
    table = RoutingTable(LOCAL, k=2)
    a, b, c, d = peers_in_bucket(0, 4)
    table.update(a, ADDR, 0.0)
    table.update(b, ADDR, 1.0)
    assert isinstance(table.update(c, OTHER_ADDR, 2.0), Pending)
    assert isinstance(table.update(d, OTHER_ADDR, 3.0), Cached)
    promoted = table.on_liveness(a, False, 4.0)
    assert promoted is not None and promoted.peer == d and promoted.addrs == OTHER_ADDR
    assert set(table.peers()) == {b, d}
    assert [x.peer for x in table.replacements(0)] == [c]


def test_stale_liveness_reports_are_ignored() -> None:
    table = RoutingTable(LOCAL, k=2)
    a, b, c = peers_in_bucket(0, 3)
    table.update(a, ADDR, 0.0)
    table.update(b, ADDR, 1.0)
    assert isinstance(table.update(c, ADDR, 2.0), Pending)
    assert table.on_liveness(b, False, 3.0) is None  # b was never the candidate
    table.update(a, ADDR, 4.0)  # the candidate spoke to us: that settles the check
    assert table.on_liveness(a, False, 5.0) is None
    assert set(table.peers()) == {a, b}
    assert table.on_liveness(LOCAL, False, 5.0) is None


def test_lost_check_is_retried_after_check_timeout() -> None:
    table = RoutingTable(LOCAL, k=1, check_timeout=30.0)
    a, b, c = peers_in_bucket(0, 3)
    table.update(a, ADDR, 0.0)
    assert isinstance(table.update(b, ADDR, 1.0), Pending)
    assert isinstance(table.update(c, ADDR, 30.0), Cached)
    result = table.update(c, ADDR, 31.0)
    assert isinstance(result, Pending) and result.candidate.peer == a


def test_replacement_cache_is_bounded_keeping_the_most_recent() -> None:
    table = RoutingTable(LOCAL, k=2, replacements=3)
    peers = peers_in_bucket(0, 10)
    for t, peer in enumerate(peers):
        table.update(peer, ADDR, float(t))
    assert set(table.peers()) == set(peers[:2])
    assert [x.peer for x in table.replacements(0)] == peers[7:]
    table.update(peers[7], ADDR, 20.0)  # seen again: becomes the freshest replacement
    assert [x.peer for x in table.replacements(0)] == [peers[8], peers[9], peers[7]]


def test_no_replacements_means_full_buckets_ignore_newcomers() -> None:
    table = RoutingTable(LOCAL, k=1, replacements=0)
    a, b = peers_in_bucket(0, 2)
    table.update(a, ADDR, 0.0)
    assert table.update(b, ADDR, 1.0) == Ignored()
    assert table.replacements(0) == []


def test_remove_promotes_a_replacement() -> None:
    table = RoutingTable(LOCAL, k=2)
    a, b, c, d = peers_in_bucket(0, 4)
    for t, peer in enumerate((a, b, c, d)):
        table.update(peer, ADDR, float(t))
    assert table.remove(a)
    assert set(table.peers()) == {b, d}  # d was the freshest replacement
    assert table.remove(c)  # a replacement can be removed too
    assert table.replacements(0) == []
    assert table.remove(b)
    assert table.peers() == [d]
    assert not table.remove(b)
    assert not table.remove(LOCAL)


def test_remove_of_the_candidate_settles_its_check() -> None:
    table = RoutingTable(LOCAL, k=1)
    a, b, c = peers_in_bucket(0, 3)
    table.update(a, ADDR, 0.0)
    assert isinstance(table.update(b, ADDR, 1.0), Pending)
    assert table.remove(a)
    assert table.peers() == [b]
    assert table.on_liveness(a, False, 2.0) is None
    result = table.update(c, ADDR, 3.0)
    assert isinstance(result, Pending) and result.candidate.peer == b


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        RoutingTable(LOCAL, k=0)
    with pytest.raises(ValueError):
        RoutingTable(LOCAL, replacements=-1)
    with pytest.raises(ValueError):
        RoutingTable(LOCAL, check_timeout=0)


# -- closest --------------------------------------------------------------------------------------

digests = st.binary(min_size=32, max_size=32)


@settings(max_examples=200, deadline=None)
@given(
    raw_peers=st.lists(digests, max_size=150, unique=True),
    k=st.integers(1, 20),
    n=st.integers(0, 40),
    data=st.data(),
)
def test_closest_equals_brute_force(
    raw_peers: list[bytes], k: int, n: int, data: st.DataObject
) -> None:
    table = RoutingTable(LOCAL, k=k)
    peers = [make_peer(raw) for raw in raw_peers]
    for t, peer in enumerate(peers):
        table.update(peer, ADDR, float(t))
    targets = [LOCAL_KEY, data.draw(digests)]
    if peers:
        targets.append(peer_key(data.draw(st.sampled_from(peers))))
    index = data.draw(st.integers(0, KEY_BITS - 1))
    targets.append(table.random_key_in_bucket(index, random.Random(data.draw(st.integers()))))
    in_table = table.peers()
    exclude = frozenset(data.draw(st.lists(st.sampled_from(in_table)))) if in_table else frozenset()
    for target in targets:
        got = [e.peer for e in table.closest(target, n, exclude=exclude)]
        assert got == brute_closest(table, target, n, exclude)


def test_closest_with_deep_buckets_matches_brute_force() -> None:
    # Peers sharing long prefixes with us fill the deep buckets random ids rarely reach.
    table = RoutingTable(LOCAL, k=4)
    rng = random.Random(3)
    for index in range(0, 24, 2):
        for peer in peers_in_bucket(index, 3, seed=index) if index < 12 else []:
            table.update(peer, ADDR, 0.0)
    for _ in range(200):
        table.update(make_peer(rng.randbytes(32)), ADDR, 0.0)
    for _ in range(200):
        target = table.random_key_in_bucket(rng.randrange(16), rng)
        n = rng.randrange(1, 60)
        got = [e.peer for e in table.closest(target, n)]
        assert got == brute_closest(table, target, n)


def test_closest_rejects_bad_targets() -> None:
    with pytest.raises(ValueError):
        RoutingTable(LOCAL).closest(b"short", 3)


def test_closest_is_fast_on_a_5000_entry_table() -> None:
    rng = random.Random(11)
    table = RoutingTable(LOCAL, k=5000)
    for peer in random_peers(rng, 5000):
        table.update(peer, ADDR, 0.0)
    assert len(table) == 5000
    targets = [rng.randbytes(32) for _ in range(2000)]
    start = time.process_time()
    for target in targets:
        table.closest(target, 20)
    elapsed = time.process_time() - start
    for target in targets[:20]:
        assert [e.peer for e in table.closest(target, 20)] == brute_closest(table, target, 20)
    assert elapsed < 0.5, f"2000 closest() calls took {elapsed:.3f}s"


# -- refresh --------------------------------------------------------------------------------------


def test_stale_buckets_cover_indices_up_to_the_deepest_non_empty_bucket() -> None:
    table = RoutingTable(LOCAL)
    assert table.stale_buckets(0.0, 10.0) == []
    (deep,) = peers_in_bucket(3, 1)
    table.update(deep, ADDR, 0.0)
    assert table.stale_buckets(0.0, 10.0) == [0, 1, 2]
    assert table.stale_buckets(10.0, 10.0) == [0, 1, 2, 3]
    table.touch_bucket(1, 12.0)
    assert table.stale_buckets(15.0, 10.0) == [0, 2, 3]
    target = table.random_key_in_bucket(2, random.Random(0))
    table.note_lookup(target, 16.0)
    assert table.stale_buckets(16.0, 10.0) == [0, 3]
    table.note_lookup(LOCAL_KEY, 16.0)  # a self-lookup falls in no bucket
    table.update(deep, (), 17.0)  # traffic into a bucket refreshes it
    assert table.stale_buckets(17.0, 10.0) == [0]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(), local=digests)
def test_random_key_in_bucket_lands_in_that_bucket(seed: int, local: bytes) -> None:
    table = RoutingTable(make_peer(local))
    rng = random.Random(seed)
    for index in range(KEY_BITS):
        key = table.random_key_in_bucket(index, rng)
        assert len(key) == 32
        assert common_prefix_length(table.local_key, key) == index


def test_random_key_in_bucket_rejects_bad_indices() -> None:
    table = RoutingTable(LOCAL)
    for index in (-1, KEY_BITS):
        with pytest.raises(ValueError):
            table.random_key_in_bucket(index, random.Random(0))


# -- persistence ----------------------------------------------------------------------------------


def test_snapshot_restore_round_trip() -> None:
    rng = random.Random(5)
    table = RoutingTable(LOCAL, k=5)
    for t, peer in enumerate(random_peers(rng, 300)):
        addrs = (Multiaddr.parse(f"/ip4/10.0.{t // 250}.{t % 250}/tcp/4001"),)
        table.update(peer, addrs, float(t))
    snap = table.snapshot()
    assert len(snap) == len(table)
    restored = RoutingTable.restore(LOCAL, snap, 1000.0, k=5)
    assert restored.snapshot() == snap  # same peers, addresses and per-bucket order
    for peer in table.peers():
        old, new = table.get(peer), restored.get(peer)
        assert isinstance(old, Entry) and isinstance(new, Entry)
        assert (new.addrs, new.key, new.last_seen) == (old.addrs, old.key, 1000.0)
    # Restored buckets were not refreshed, so the shell refreshes them at once.
    deepest = max(bucket_of(p) for p in table.peers())
    assert restored.stale_buckets(1000.0, 3600.0) == list(range(deepest + 1))


def test_load_skips_us_and_known_peers_and_caches_overflow() -> None:
    table = RoutingTable(LOCAL, k=2, replacements=1)
    a, b, c, d = peers_in_bucket(0, 4)
    table.update(a, OTHER_ADDR, 5.0)
    snap = [(LOCAL, ADDR), (a, ADDR), (b, ADDR), (c, ADDR), (d, ADDR)]
    assert table.load(snap, 9.0) == 1
    entry = table.get(a)
    assert entry is not None and entry.addrs == OTHER_ADDR and entry.last_seen == 5.0
    assert set(table.peers()) == {a, b}
    assert [x.peer for x in table.replacements(0)] == [d]


def test_an_entry_that_keeps_failing_queries_is_replaced() -> None:
    table = RoutingTable(LOCAL, k=2, replacements=2)
    same_bucket = peers_in_bucket(0, 3)
    for i, peer in enumerate(same_bucket):
        table.update(peer, ADDR, float(i))
    first, second, spare = same_bucket
    assert table.query_failed(first) is None  # one lost reply is forgiven
    table.update(first, ADDR, 5.0)  # it spoke: the count starts over
    assert table.query_failed(first) is None
    promoted = table.query_failed(first)
    assert promoted is not None and promoted.peer == spare
    assert first not in table and spare in table and second in table
    assert table.query_failed(first) is None  # no longer an entry


def test_failures_never_empty_a_bucket_without_replacements() -> None:
    # Our own network down: every query fails. Entries stay until someone can replace them.
    table = RoutingTable(LOCAL, k=3)
    peers = peers_in_bucket(0, 2)
    for i, peer in enumerate(peers):
        table.update(peer, ADDR, float(i))
    for _ in range(5):
        for peer in peers:
            assert table.query_failed(peer) is None
    assert all(peer in table for peer in peers)


def test_a_table_makes_only_the_buckets_it_uses() -> None:
    # 10,000 simulated peers each hold a table: 256 empty buckets apiece were most of
    # the simulator's memory.
    rng = random.Random(7)
    table = RoutingTable(make_peer(b"local"), k=20)
    for peer in random_peers(rng, 2000):
        table.update(peer, [], 0.0)
    made = len(table._buckets)
    assert made <= 16
    assert table.bucket(KEY_BITS - 1) == [] and table.replacements(200) == []
    with pytest.raises(IndexError):
        table.bucket(KEY_BITS)
    deepest = max(i for i in range(KEY_BITS) if table.bucket(i))
    assert table.stale_buckets(5.0, 1.0) == list(range(deepest + 1))
