"""The relay's sans-IO bookkeeping: reservations and circuits under every cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbloom.p2p import KeyPair
from dbloom.p2p.relay import CircuitBudget, Limit, RelayLimits, RelayState, Status

PEERS = [KeyPair.from_seed(bytes([i + 1]) * 32).peer_id for i in range(6)]


def test_reserve_renew_expire_and_cancel() -> None:
    state = RelayState(RelayLimits(reservation_ttl=10))
    slot = state.reserve(PEERS[0], "10.0.0.1", now=0)
    assert not isinstance(slot, Status) and slot.expires == 10
    renewed = state.reserve(PEERS[0], "10.0.0.1", now=5)
    assert renewed is slot and slot.expires == 15 and len(state) == 1
    assert state.has_reservation(PEERS[0], 14.9)
    assert not state.has_reservation(PEERS[0], 15)
    assert state.prune(15) == [PEERS[0]] and len(state) == 0
    state.reserve(PEERS[0], None, now=20)
    state.cancel(PEERS[0])
    assert not state.has_reservation(PEERS[0], 20)


def test_total_and_per_ip_caps() -> None:
    state = RelayState(RelayLimits(max_reservations=3, max_reservations_per_ip=2))
    assert not isinstance(state.reserve(PEERS[0], "10.0.0.1", 0), Status)
    assert not isinstance(state.reserve(PEERS[1], "10.0.0.1", 0), Status)
    assert state.reserve(PEERS[2], "10.0.0.1", 0) is Status.RESERVATION_REFUSED
    assert not isinstance(state.reserve(PEERS[2], "10.0.0.2", 0), Status)
    assert state.reserve(PEERS[3], "10.0.0.3", 0) is Status.RESERVATION_REFUSED
    assert state.refused == {"reservations-ip": 1, "reservations-total": 1}
    # expired slots make room
    assert not isinstance(state.reserve(PEERS[3], "10.0.0.3", 10_000), Status)


def test_circuit_caps() -> None:
    state = RelayState(RelayLimits(max_circuits=2, max_circuits_per_peer=1))
    a, b, c, d = PEERS[:4]
    assert state.open_circuit(a, b, 0) is Status.NO_RESERVATION
    state.reserve(b, None, 0)
    state.reserve(d, None, 0)
    assert state.open_circuit(a, b, 0) is Status.OK
    assert state.open_circuit(c, b, 0) is Status.RESOURCE_LIMIT_EXCEEDED  # b is busy
    assert state.open_circuit(c, d, 0) is Status.OK
    state.reserve(a, None, 0)
    assert state.open_circuit(PEERS[4], a, 0) is Status.RESOURCE_LIMIT_EXCEEDED  # total
    state.close_circuit(a, b)
    assert state.open_circuit(c, b, 0) is Status.RESOURCE_LIMIT_EXCEEDED  # c is busy
    assert state.open_circuit(PEERS[5], b, 0) is Status.OK
    assert state.circuits == 2


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5000)), max_size=50))
def test_budget_never_passes_the_limit(writes: list[tuple[int, int]]) -> None:
    budget = CircuitBudget(Limit(duration=1, data=10_000))
    passed = [0, 0]
    for direction, size in writes:
        allowed = budget.take(direction, size)
        assert 0 <= allowed <= size
        passed[direction] += allowed
    assert max(passed) <= 10_000


def test_unlimited_budget_and_bad_limits() -> None:
    assert CircuitBudget(Limit()).take(0, 1 << 40) == 1 << 40
    with pytest.raises(ValueError):
        RelayLimits(reservation_ttl=0)
