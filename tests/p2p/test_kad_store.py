"""Record and provider stores: validation, best-record selection, quotas, expiry under fake time."""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbloom.p2p._identity import KeyPair, PeerId
from dbloom.p2p._multiaddr import Multiaddr
from dbloom.p2p.kad._envelope import open_node_record, seal_node_record
from dbloom.p2p.kad._keys import node_record_key
from dbloom.p2p.kad._messages import ConnectionType, PeerInfo
from dbloom.p2p.kad._store import (
    NodeRecordValidator,
    ProviderStore,
    RecordRejected,
    RecordStore,
    record_namespace,
)

KEYS = [KeyPair.from_seed(bytes([i + 1]) * 32) for i in range(8)]
A, B, C = KEYS[0], KEYS[1], KEYS[2]
TTL = 36 * 3600.0


@functools.cache
def sealed(signer: int, seq: int, data: bytes = b"") -> bytes:
    return seal_node_record(KEYS[signer], seq, data)


def key_of(signer: int) -> bytes:
    return node_record_key(KEYS[signer].peer_id)


def store(**kwargs: Any) -> RecordStore:
    return RecordStore({"dbloom": NodeRecordValidator()}, **kwargs)


def rejection(fn: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(RecordRejected) as info:
        fn(*args, **kwargs)
    return info.value.reason


# --- namespaces and the node record validator ---


@pytest.mark.parametrize(
    ("key", "namespace"),
    [
        (b"/dbloom/node/12D3KooW", "dbloom"),
        (b"/pk/\x00\x01", "pk"),
        (b"/ipns/x", "ipns"),
        (b"/dbloom", None),
        (b"dbloom/node/x", None),
        (b"//node/x", None),
        (b"", None),
        (b"/\xff\xfe/x", None),
    ],
)
def test_record_namespace(key: bytes, namespace: str | None) -> None:
    assert record_namespace(key) == namespace


def test_validator_accepts_a_record_under_its_signers_key() -> None:
    validator = NodeRecordValidator()
    validator.validate(key_of(0), sealed(0, 1))
    assert validator.open(key_of(0), sealed(0, 1, b"d")).data == b"d"


def test_validator_rejects_records_under_other_keys() -> None:
    validator = NodeRecordValidator()
    assert rejection(validator.validate, key_of(1), sealed(0, 1)) == "wrong-key"
    assert rejection(validator.validate, b"/dbloom/other/x", sealed(0, 1)) == "wrong-key"
    assert rejection(validator.validate, key_of(0) + b"x", sealed(0, 1)) == "wrong-key"
    assert rejection(validator.validate, key_of(0), b"garbage") == "malformed"
    assert rejection(validator.validate, key_of(0), sealed(0, 1)[:-1]) == "malformed"
    tampered = sealed(0, 1, b"abc").replace(b"abc", b"abd")
    assert rejection(validator.validate, key_of(0), tampered) == "bad-signature"
    small = NodeRecordValidator(max_size=100)
    assert rejection(small.validate, key_of(0), sealed(0, 1, b"x" * 100)) == "too-large"


def test_select_prefers_the_highest_seq_in_any_order() -> None:
    validator = NodeRecordValidator()
    values = [sealed(0, 3), sealed(0, 9, b"new"), sealed(0, 1)]
    for perm in itertools.permutations(values):
        assert perm[validator.select(key_of(0), list(perm))] == sealed(0, 9, b"new")


def test_select_breaks_ties_by_the_largest_value_and_is_stable() -> None:
    validator = NodeRecordValidator()
    values = [sealed(0, 4, b"a"), sealed(0, 4, b"b"), sealed(0, 4, b"c")]
    best = max(values)
    for perm in itertools.permutations(values):
        assert perm[validator.select(key_of(0), list(perm))] == best
    same = [sealed(0, 4, b"a"), sealed(0, 4, b"a")]
    assert validator.select(key_of(0), same) == 0


def test_select_ranks_invalid_values_last() -> None:
    validator = NodeRecordValidator()
    assert validator.select(key_of(0), [b"\xff" * 200, sealed(0, 0), sealed(1, 99)]) == 1
    with pytest.raises(ValueError):
        validator.select(key_of(0), [])


# --- the record store ---


def test_put_and_get() -> None:
    records = store()
    records.put(key_of(0), sealed(0, 1), from_peer=A.peer_id, now=0.0)
    assert records.get(key_of(0), 1.0) == sealed(0, 1)
    assert records.get(key_of(1), 1.0) is None
    assert len(records) == 1
    assert records.keys() == [key_of(0)]
    assert records.total_bytes == len(key_of(0)) + len(sealed(0, 1))


def test_higher_seq_wins_lower_is_worse() -> None:
    records = store()
    records.put(key_of(0), sealed(0, 5), from_peer=A.peer_id, now=0.0)
    records.put(key_of(0), sealed(0, 6), from_peer=B.peer_id, now=1.0)
    assert records.get(key_of(0), 2.0) == sealed(0, 6)
    assert rejection(records.put, key_of(0), sealed(0, 5), from_peer=C.peer_id, now=3) == "worse"
    assert records.get(key_of(0), 4.0) == sealed(0, 6)
    assert len(records) == 1
    assert records.rejected == {"worse": 1}
    # Equal seq: the larger value wins everywhere, so the smaller one is "worse".
    low, high = sorted([sealed(0, 7, b"x"), sealed(0, 7, b"y")])
    records.put(key_of(0), high, from_peer=A.peer_id, now=5.0)
    assert rejection(records.put, key_of(0), low, from_peer=A.peer_id, now=6.0) == "worse"


def test_re_put_of_the_same_value_refreshes_its_expiry() -> None:
    records = store(record_ttl=100.0)
    records.put(key_of(0), sealed(0, 1), from_peer=A.peer_id, now=0.0)
    records.put(key_of(0), sealed(0, 1), from_peer=A.peer_id, now=80.0)
    assert records.get(key_of(0), 150.0) == sealed(0, 1)
    assert records.get(key_of(0), 180.0) is None


def test_invalid_records_are_refused_and_counted() -> None:
    records = store(max_record_size=1000)
    put = records.put
    assert rejection(put, key_of(1), sealed(0, 1), from_peer=A.peer_id, now=0) == "wrong-key"
    assert rejection(put, b"/pk/x", sealed(0, 1), from_peer=A.peer_id, now=0) == "no-validator"
    assert rejection(put, b"plain", sealed(0, 1), from_peer=A.peer_id, now=0) == "no-validator"
    assert rejection(put, key_of(0), b"junk", from_peer=A.peer_id, now=0) == "malformed"
    big = sealed(0, 1, b"x" * 1000)
    assert rejection(put, key_of(0), big, from_peer=A.peer_id, now=0) == "too-large"
    assert len(records) == 0 and records.total_bytes == 0
    assert records.rejected == {
        "wrong-key": 1,
        "no-validator": 2,
        "malformed": 1,
        "too-large": 1,
    }


def test_quota_per_sending_peer() -> None:
    records = store(max_records_per_peer=2)
    records.put(key_of(0), sealed(0, 1), from_peer=A.peer_id, now=0.0)
    records.put(key_of(1), sealed(1, 1), from_peer=A.peer_id, now=0.0)
    assert (
        rejection(records.put, key_of(2), sealed(2, 1), from_peer=A.peer_id, now=0) == "quota-peer"
    )
    # Replacing a record it already holds is no new charge; another sender has its own quota.
    records.put(key_of(0), sealed(0, 2), from_peer=A.peer_id, now=1.0)
    records.put(key_of(2), sealed(2, 1), from_peer=B.peer_id, now=1.0)
    # B takes over key 1 by sending a newer version, which frees a slot for A.
    records.put(key_of(1), sealed(1, 2), from_peer=B.peer_id, now=2.0)
    records.put(key_of(3), sealed(3, 1), from_peer=A.peer_id, now=2.0)
    assert (
        rejection(records.put, key_of(4), sealed(4, 1), from_peer=B.peer_id, now=3) == "quota-peer"
    )
    assert records.rejected == {"quota-peer": 2}
    assert len(records) == 4


def test_quota_in_total_bytes() -> None:
    size = len(key_of(0)) + len(sealed(0, 1))
    records = store(max_total_bytes=2 * size)
    records.put(key_of(0), sealed(0, 1), from_peer=A.peer_id, now=0.0)
    records.put(key_of(1), sealed(1, 1), from_peer=B.peer_id, now=0.0)
    assert (
        rejection(records.put, key_of(2), sealed(2, 1), from_peer=C.peer_id, now=0) == "quota-total"
    )
    # A same-size replacement fits; a bigger one does not.
    records.put(key_of(0), sealed(0, 2), from_peer=A.peer_id, now=1.0)
    bigger = sealed(0, 3, b"more")
    assert rejection(records.put, key_of(0), bigger, from_peer=A.peer_id, now=1) == "quota-total"
    assert records.total_bytes == 2 * size


def test_records_expire() -> None:
    records = store()
    records.put(key_of(0), sealed(0, 1), from_peer=A.peer_id, now=0.0)
    records.put(key_of(1), sealed(1, 1), from_peer=A.peer_id, now=10.0)
    assert records.get(key_of(0), TTL - 1) == sealed(0, 1)
    assert records.get(key_of(0), TTL) is None
    assert len(records) == 1
    assert records.remove_expired(TTL + 9) == 0
    assert records.remove_expired(TTL + 10) == 1
    assert len(records) == 0 and records.total_bytes == 0


def test_expired_records_free_their_quota_and_can_be_replaced_by_anything() -> None:
    records = store(max_records_per_peer=1)
    records.put(key_of(0), sealed(0, 9), from_peer=A.peer_id, now=0.0)
    records.put(key_of(0), sealed(0, 1), from_peer=A.peer_id, now=TTL)
    assert records.get(key_of(0), TTL) == sealed(0, 1)
    records.put(key_of(1), sealed(1, 1), from_peer=A.peer_id, now=2 * TTL)
    assert records.keys() == [key_of(1)]


def test_validator_for() -> None:
    records = store()
    assert isinstance(records.validator_for(key_of(0)), NodeRecordValidator)
    assert rejection(records.validator_for, b"/pk/x") == "no-validator"


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 4), st.sampled_from([b"", b"a", b"b"])),
        max_size=30,
    ),
    st.lists(st.integers(0, 7), min_size=30, max_size=30),
)
def test_store_always_holds_the_best_record_seen(
    puts: list[tuple[int, int, bytes]], senders: list[int]
) -> None:
    records = store()
    best: dict[int, tuple[int, bytes]] = {}
    for (signer, seq, data), sender in zip(puts, senders, strict=False):
        value = sealed(signer, seq, data)
        try:
            records.put(key_of(signer), value, from_peer=KEYS[sender].peer_id, now=0.0)
        except RecordRejected as exc:
            assert exc.reason == "worse"
            assert (seq, value) < best[signer]
            continue
        assert signer not in best or (seq, value) >= best[signer]
        best[signer] = (seq, value)
    for signer, (seq, value) in best.items():
        assert records.get(key_of(signer), 1.0) == value
        assert open_node_record(value).seq == seq
    assert records.total_bytes == sum(len(key_of(s)) + len(v) for s, (_, v) in best.items())


@settings(max_examples=200)
@given(st.binary(max_size=200), st.integers(0, 200), st.integers(0, 255))
def test_hostile_values_raise_only_record_rejected(junk: bytes, index: int, byte: int) -> None:
    records = store()
    valid = sealed(0, 1, b"payload")
    index %= len(valid)
    for value in (junk, valid[:index] + bytes([byte]) + valid[index + 1 :], valid[:index]):
        with contextlib.suppress(RecordRejected):
            records.put(key_of(0), value, from_peer=B.peer_id, now=0.0)
    assert sum(records.rejected.values()) + len(records) >= 1


# --- the provider store ---

KEY = b"\x12\x20" + b"\x01" * 32
ADDR = Multiaddr.parse("/ip4/10.0.0.1/tcp/4001")
ADDR2 = Multiaddr.parse("/ip4/10.0.0.2/tcp/4001")


def info(i: int, *addrs: Multiaddr) -> PeerInfo:
    return PeerInfo(peer_id=KEYS[i].peer_id, addrs=addrs)


def ids(infos: list[PeerInfo]) -> list[PeerId]:
    return [p.peer_id for p in infos]


def test_providers_newest_first() -> None:
    providers = ProviderStore()
    for i in range(3):
        providers.add(KEY, info(i, ADDR), float(i))
    assert ids(providers.get(KEY, 3.0)) == [KEYS[2].peer_id, KEYS[1].peer_id, KEYS[0].peer_id]
    assert providers.get(b"other", 3.0) == []
    assert len(providers) == 1 and providers.total_providers == 3


def test_provider_ttl_and_refresh() -> None:
    providers = ProviderStore(ttl=600.0)
    providers.add(KEY, info(0, ADDR), 0.0)
    providers.add(KEY, info(1, ADDR), 100.0)
    assert ids(providers.get(KEY, 599.0)) == [KEYS[1].peer_id, KEYS[0].peer_id]
    assert ids(providers.get(KEY, 600.0)) == [KEYS[1].peer_id]
    # Refreshing moves the provider to the front and extends its life.
    providers.add(KEY, info(0, ADDR2), 500.0)
    assert ids(providers.get(KEY, 650.0)) == [KEYS[0].peer_id, KEYS[1].peer_id]
    assert providers.get(KEY, 650.0)[0].addrs == (ADDR2,)
    assert ids(providers.get(KEY, 800.0)) == [KEYS[0].peer_id]
    assert providers.get(KEY, 1100.0) == []
    assert providers.total_providers == 2


def test_refresh_without_addresses_keeps_the_known_ones() -> None:
    providers = ProviderStore()
    providers.add(KEY, info(0, ADDR), 0.0)
    providers.add(KEY, PeerInfo(peer_id=KEYS[0].peer_id, connection=ConnectionType.CONNECTED), 1.0)
    (entry,) = providers.get(KEY, 2.0)
    assert entry.addrs == (ADDR,)
    assert entry.connection is ConnectionType.CONNECTED


def test_a_crowded_key_is_answered_with_random_samples_that_reach_every_provider() -> None:
    pids = [KeyPair.from_seed(i.to_bytes(32, "big")).peer_id for i in range(60)]

    def crowded(seed: int) -> ProviderStore:
        providers = ProviderStore(ttl=100.0, rng=random.Random(seed))
        for n, pid in enumerate(pids):
            providers.add(KEY, PeerInfo(peer_id=pid), float(n))
        return providers

    providers = crowded(5)
    now = 120.0  # the first 20 have expired
    seen: set[PeerId] = set()
    for _ in range(30):
        sample = ids(providers.get(KEY, now, limit=20))
        assert len(sample) == len(set(sample)) == 20
        assert set(sample) <= set(pids[21:])
        seen.update(sample)
    assert seen == set(pids[21:])
    assert ids(crowded(5).get(KEY, now)) == ids(crowded(5).get(KEY, now))


def test_the_most_recent_providers_are_kept() -> None:
    providers = ProviderStore(max_providers_per_key=200)
    pids = [KeyPair.from_seed(i.to_bytes(32, "big")).peer_id for i in range(250)]
    for n, pid in enumerate(pids):
        providers.add(KEY, PeerInfo(peer_id=pid), float(n))
    held = ids(providers.get(KEY, 250.0, limit=1000))
    assert held == list(reversed(pids[50:]))
    assert providers.total_providers == 200
    # A refreshed old-timer is the newest again, so the oldest other one goes.
    providers.add(KEY, PeerInfo(peer_id=pids[50]), 251.0)
    providers.add(KEY, PeerInfo(peer_id=pids[0]), 252.0)
    held = ids(providers.get(KEY, 253.0, limit=1000))
    assert held[:2] == [pids[0], pids[50]]
    assert pids[51] not in held and len(held) == 200


def test_remove_expired_providers() -> None:
    providers = ProviderStore(ttl=10.0)
    providers.add(KEY, info(0), 0.0)
    providers.add(KEY, info(1), 5.0)
    providers.add(b"k2", info(0), 1.0)
    assert providers.remove_expired(9.0) == 0
    assert providers.remove_expired(11.0) == 2
    assert len(providers) == 1 and providers.total_providers == 1
    assert providers.remove_expired(15.0) == 1
    assert len(providers) == 0 and providers.total_providers == 0


def test_key_limit_refuses_new_keys_until_old_ones_expire() -> None:
    providers = ProviderStore(ttl=10.0, max_keys=2)
    providers.add(b"k1", info(0), 0.0)
    providers.add(b"k2", info(0), 1.0)
    with pytest.raises(RecordRejected) as exc:
        providers.add(b"k3", info(0), 2.0)
    assert exc.value.reason == "quota-keys"
    providers.add(b"k1", info(1), 3.0)  # existing keys still take providers
    assert providers.rejected == {"quota-keys": 1}
    providers.add(b"k3", info(0), 11.0)  # k2 expired (k1 was refreshed at 3.0)
    assert len(providers) == 2
    assert ids(providers.get(b"k1", 11.0)) == [KEYS[1].peer_id]
    assert providers.get(b"k2", 11.0) == []


def test_total_provider_limit() -> None:
    providers = ProviderStore(max_total_providers=3, max_providers_per_key=2)
    providers.add(b"k1", info(0), 0.0)
    providers.add(b"k1", info(1), 0.0)
    providers.add(b"k2", info(0), 0.0)
    with pytest.raises(RecordRejected) as exc:
        providers.add(b"k3", info(0), 0.0)
    assert exc.value.reason == "quota-total"
    assert len(providers) == 2
    # Refreshes, and evictions within a full key, do not grow the total.
    providers.add(b"k2", info(0), 1.0)
    providers.add(b"k1", info(2), 1.0)
    assert ids(providers.get(b"k1", 1.0)) == [KEYS[2].peer_id, KEYS[1].peer_id]
    assert providers.total_providers == 3
    assert providers.rejected == {"quota-total": 1}


def test_an_oversized_provider_key_is_refused() -> None:
    # A kad message may carry a 200 KB key; storing it would let one ADD_PROVIDER cost
    # us 200 KB, thousands of times over.
    providers = ProviderStore(max_key_size=128)
    with pytest.raises(RecordRejected) as exc:
        providers.add(b"k" * 129, info(0, ADDR), 0.0)
    assert exc.value.reason == "key-size"
    providers.add(b"k" * 128, info(0, ADDR), 0.0)
    assert len(providers) == 1 and providers.rejected == {"key-size": 1}


def test_one_provider_can_hold_only_its_share_of_keys() -> None:
    providers = ProviderStore(max_keys_per_provider=3, ttl=10.0)
    for n in range(3):
        providers.add(b"k%d" % n, info(0, ADDR), 0.0)
    with pytest.raises(RecordRejected) as exc:
        providers.add(b"k3", info(0, ADDR), 0.0)
    assert exc.value.reason == "quota-provider"
    providers.add(b"k0", info(0, ADDR), 1.0)  # a refresh is not a new key
    providers.add(b"k3", info(1, ADDR), 1.0)  # another peer is unaffected
    # Once its entries expire, the peer may announce again.
    assert providers.remove_expired(10.5) == 2
    providers.add(b"k4", info(0, ADDR), 10.5)
    providers.add(b"k5", info(0, ADDR), 10.5)
    assert providers.total_providers == 4


def test_provider_bytes_are_bounded_and_released() -> None:
    long_addr = Multiaddr.parse("/dns4/" + "a" * 200 + ".example/tcp/4001")
    entry = 64 + len(b"k0") + len(long_addr.to_bytes())
    providers = ProviderStore(max_total_bytes=2 * entry, ttl=10.0)
    providers.add(b"k0", info(0, long_addr), 0.0)
    providers.add(b"k1", info(1, long_addr), 0.0)
    assert providers.total_bytes == 2 * entry
    with pytest.raises(RecordRejected) as exc:
        providers.add(b"k2", info(2, long_addr), 0.0)
    assert exc.value.reason == "quota-bytes"
    providers.add(b"k1", info(1), 1.0)  # a refresh keeps its size
    assert providers.total_bytes == 2 * entry
    assert providers.remove_expired(10.5) == 1
    assert providers.total_bytes == entry
    providers.add(b"k2", info(2, long_addr), 10.5)
    assert providers.total_bytes == 2 * entry


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 5), st.integers(0, 3), st.booleans()),
        max_size=60,
    )
)
def test_provider_accounting_matches_what_is_stored(
    ops: list[tuple[int, int, int, bool]],
) -> None:
    """Counts, bytes and per-peer shares always equal a recount, through refreshes,
    evictions from full keys, expiry and refusals."""
    providers = ProviderStore(
        ttl=5.0, max_providers_per_key=3, max_keys_per_provider=2, max_total_providers=10
    )
    now = 0.0
    for peer, key, step, with_addr in ops:
        now += step
        if step == 3:
            providers.remove_expired(now)
        with contextlib.suppress(RecordRejected):
            providers.add(b"k%d" % key, info(peer, *([ADDR] if with_addr else [])), now)
        entries = [e for per_key in providers._keys.values() for e in per_key.values()]
        assert providers.total_providers == len(entries)
        assert providers.total_bytes == sum(e.size for e in entries)
        shares: dict[PeerId, int] = {}
        for e in entries:
            shares[e.info.peer_id] = shares.get(e.info.peer_id, 0) + 1
        assert dict(providers._per_provider) == shares
        assert all(n <= 2 for n in shares.values())
