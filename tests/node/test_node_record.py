"""The node record codec, prices as integers, and the router's choices."""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace

import msgpack
import pytest
from fuzzing import mutations
from hypothesis import given
from node_records import make_offer, make_record

from dbloom.api._routing import Candidate, Router, RoutingPolicy
from dbloom.inference import decode_node_record
from dbloom.ledger._money import cost, format_price, parse_price
from dbloom.p2p import DecodeError, KeyPair

OFFER = make_offer()
RECORD = make_record(addrs=("/ip4/127.0.0.1/tcp/4001",), active=1)


def test_record_round_trip() -> None:
    assert decode_node_record(RECORD.encode()) == RECORD
    assert RECORD.offer("tiny") == OFFER and RECORD.offer("other") is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "version"),
        ({"extra": 1}, "exactly"),
        ({"batch": -1}, "batch"),
        ({"draining": 1}, "draining"),
        ({"addrs": ["x"] * 17}, "addrs"),
        ({"models": [{"id": "m"}]}, "model offer"),
    ],
)
def test_record_decoder_names_the_problem(change: dict[str, object], match: str) -> None:
    body = msgpack.unpackb(RECORD.encode())
    body.update(change)
    with pytest.raises(DecodeError, match=match):
        decode_node_record(msgpack.packb(body))


def test_offer_with_nan_speed_or_float_price_is_refused() -> None:
    body = msgpack.unpackb(RECORD.encode())
    body["models"][0]["decode"] = float("nan")
    with pytest.raises(DecodeError, match="decode"):
        decode_node_record(msgpack.packb(body))
    body = msgpack.unpackb(RECORD.encode())
    body["models"][0]["out"] = 0.5
    with pytest.raises(DecodeError, match="output price"):
        decode_node_record(msgpack.packb(body))


@given(mutations(RECORD.encode()))
def test_record_decoder_raises_only_decode_errors(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_node_record(raw)


def test_prices_are_exact_integers() -> None:
    assert parse_price("0.25") == 250_000
    assert parse_price("3") == 3_000_000
    assert format_price(250_000) == "0.25" and format_price(3_000_000) == "3"
    assert cost(1_000_000, 250_000) == 250_000 and cost(3, 250_000) == 0
    for bad in ("-1", "abc", "nan", "0.0000001", "1e30"):
        with pytest.raises(ValueError):
            parse_price(bad)


def candidate(seed: int, **offer_changes: object) -> Candidate:
    record_changes = {
        k: offer_changes.pop(k)
        for k in list(offer_changes)
        if k in {"active", "draining", "attest_kind"}
    }
    offer = replace(OFFER, **offer_changes)  # type: ignore[arg-type]
    record = replace(RECORD, models=(offer,), **record_changes)  # type: ignore[arg-type]
    peer = KeyPair.from_seed(bytes([seed]) * 32).peer_id
    return Candidate(peer=peer, record=record, offer=offer, addrs=())


def router(**policy: object) -> Router:
    return Router(
        RoutingPolicy(allowed_kinds=frozenset({"dev"}), **policy),  # type: ignore[arg-type]
        rng=random.Random(1),
    )


def test_policy_filters_kind_price_draining_and_refusals() -> None:
    r = router(max_price_out=400_000)
    ok = candidate(1, price_out=300_000)
    assert r.why_not(ok, 0) is None
    assert "attestation" in (r.why_not(candidate(2, attest_kind="tpm2"), 0) or "")
    assert "price" in (r.why_not(candidate(3), 0) or "")
    assert "shutting down" in (r.why_not(candidate(4, draining=True, price_out=1), 0) or "")
    r.refused(ok.peer, 0)
    assert r.order([ok], 10) == [] and r.order([ok], 10_000) == [ok]


def test_cheaper_faster_idler_nodes_rank_first_and_failures_decay() -> None:
    r = router()
    cheap, dear = candidate(1, price_out=100_000), candidate(2, price_out=900_000)
    slow = candidate(3, decode_tps=10.0)
    busy = candidate(4, active=8)
    ranked = r.order([dear, slow, busy, cheap], 0)
    assert ranked[-1] in (slow, dear) and ranked.index(cheap) < ranked.index(dear)
    for _ in range(3):
        r.failed(cheap.peer, 0)
    assert r.order([cheap, dear], 1)[0] == dear
    assert r.failures(cheap.peer, 600) < 0.01


def test_power_of_two_choices_spreads_load() -> None:
    r = router()
    pool = [candidate(i) for i in range(1, 5)]
    firsts = {r.order(pool, 0)[0].peer for _ in range(200)}
    assert len(firsts) >= 3
