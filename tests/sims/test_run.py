"""Whole runs on small networks: every layer works, results repeat, cheaters lose."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbloom.p2p import KeyPair, Multiaddr
from dbloom.p2p.kad import KadMessage, MessageType, PeerInfo, Record
from dbloom.sims import Scenario, run
from dbloom.sims._kad import message_size
from dbloom.sims._metrics import gini, percentile

TINY = """
name = "tiny"
seed = 4
duration = 240
warmup = 20
[peers]
count = 40
nat_share = 0.25
regions = { eu = 0.5, us = 0.5 }
[network]
rtt_ms = { "eu-eu" = 20, "us-us" = 30, "eu-us" = 90 }
[availability]
always_on_share = 0.5
online = { dist = "exponential", mean = 900 }
offline = { dist = "exponential", mean = 600 }
[workload]
clients = 5
rate_per_s = 2.0
output_tokens = { dist = "lognormal", mean = 80, sigma = 0.5, max = 400 }
[ledger]
gossip_peers = 8
auditors = 2
batch_seconds = 5
"""

HOSTILE = (
    TINY.replace('name = "tiny"', 'name = "hostile"')
    + """
[adversaries]
poisoning = 0.2
invalid_attestation = 0.15
garbage = 0.1
receipt_inflation = 0.15
"""
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("tiny")
    result = run(Scenario.from_toml(TINY), out=out)
    return result.metrics, out


def test_every_layer_works_together(tiny: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    m, _ = tiny
    assert m["requests"]["finished"] > 300
    assert m["requests"]["ok_share"] > 0.95
    providers = m["dht"]["lookups"]["providers"]
    assert providers["success"] == 1.0
    assert 1 <= providers["hops"]["p50"] <= 3
    assert m["requests"]["ttft_seconds"]["p50"] < m["requests"]["latency_seconds"]["p50"]
    assert m["gossip"]["full_coverage_share"] == 1.0
    assert m["ledger"]["agreement"] == 1.0
    # Receipts of the last few seconds are still in a client's batch when the run ends.
    assert m["ledger"]["complete"] > 0.97
    assert m["ledger"]["paid_dollars"] > 0
    assert m["earnings"]["operator_total_dollars"] == pytest.approx(
        m["ledger"]["paid_dollars"] * 0.95, rel=0.01
    )
    assert 0 < m["load"]["peers_that_served"] <= 1
    assert 0 <= m["load"]["gini_requests_served"] < 1
    assert "null cipher" in m["transport"]


def test_files_are_written(tiny: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    m, out = tiny
    assert json.loads((out / "metrics.json").read_text()) == m
    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["requests"]["arrived"]
    assert {r["status"] for r in rows} >= {"ok"}
    for name in ("timeline.png", "latency.png", "load.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_seed_gives_the_same_metrics_and_another_seed_does_not() -> None:
    scenario = Scenario.from_toml(TINY).with_overrides(duration=120)
    first = run(scenario, plots=False).metrics
    assert run(scenario, plots=False).metrics == first
    assert run(scenario.with_overrides(seed=5), plots=False).metrics != first


def test_cheaters_are_caught(tmp_path: Path) -> None:
    m = run(Scenario.from_toml(HOSTILE), plots=False).metrics
    adversaries = m["adversaries"]
    assert adversaries["peers"] == {
        "garbage": 4,
        "invalid_attestation": 6,
        "poisoning": 8,
        "receipt_inflation": 6,
    }
    # Nobody is served by a node whose attestation fails or that sends garbage ...
    assert adversaries["requests_served_by"]["invalid_attestation"] == 0
    assert adversaries["requests_served_by"]["garbage"] == 0
    # ... inflated receipts are disputed by the client and never paid ...
    assert m["ledger"]["disputed"] > 0
    assert adversaries["inflated_receipts_paid"] == 0
    # ... and poisoned DHT replies cost time, not answers.
    assert m["counters"]["poisoned_replies"] > 0
    assert m["requests"]["ok_share"] > 0.9


def test_a_churn_storm_shows_stale_records_and_recovers() -> None:
    storm = TINY + "[[churn_events]]\nat = 60\nshare = 0.6\nback_after = 90\n"
    m = run(Scenario.from_toml(storm).with_overrides(duration=240), plots=False).metrics
    assert m["counters"]["churn_event_departures"] > 5
    assert m["requests"]["stale_record_dials"] > 0
    assert m["requests"]["ok_share"] > 0.8


def test_the_command_line_repeats_itself_byte_for_byte(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    outputs = []
    for name in ("a", "b"):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from dbloom.cli.main import main; main()",
                "sim",
                "run",
                str(scenario),
                "--out",
                str(tmp_path / name),
                "--duration",
                "90",
                "--no-plots",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "provider lookups: success" in done.stdout
        outputs.append((tmp_path / name / "metrics.json").read_bytes())
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["python_hash_seed"] == "0"


def test_a_bad_scenario_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[peers]\ncount = 3\ncolour = 'red'\n")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dbloom.cli.main import main; main()",
            "sim",
            "run",
            str(bad),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "unknown key(s) 'colour'" in done.stderr
    assert "Traceback" not in done.stderr


def test_message_sizes_follow_the_real_encoder() -> None:
    keys = [KeyPair.from_seed(bytes([i]) * 32).peer_id for i in range(25)]
    addr = (Multiaddr.parse("/ip4/10.1.2.3/tcp/4001"),)
    peers = tuple(PeerInfo(peer_id=p, addrs=addr) for p in keys[:20])
    messages = [
        KadMessage(type=MessageType.FIND_NODE, key=bytes(32)),
        KadMessage(type=MessageType.FIND_NODE, key=bytes(32), closer_peers=peers),
        KadMessage(
            type=MessageType.GET_PROVIDERS,
            key=bytes(32),
            closer_peers=peers,
            provider_peers=peers[:5],
        ),
        KadMessage(
            type=MessageType.PUT_VALUE,
            key=b"k" * 40,
            record=Record(key=b"k" * 40, value=b"v" * 600),
        ),
    ]
    for message in messages:
        real = len(message.to_bytes())
        assert abs(message_size(message) - real) <= max(16, 0.1 * real), (message.type, real)


def test_gini_and_percentiles() -> None:
    assert gini([5, 5, 5, 5]) == 0
    assert gini([0, 0, 0, 10]) == pytest.approx(0.75)
    assert gini([]) == 0
    assert percentile([3, 1, 2], 0.5) == 2
    assert percentile([], 0.5) is None
    assert percentile(list(range(1, 101)), 0.99) == 99
