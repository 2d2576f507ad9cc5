"""What a run measured, reduced to numbers a researcher can compare across runs.

Figures are rounded to six significant digits before they are written, so that
`metrics.json` is byte-identical between runs with the same seed and readable in
a diff between runs with different ones.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._world import World

SCHEMA = 1


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def gini(values: Iterable[float]) -> float:
    """0 when every value is equal, towards 1 when one holds everything."""
    xs = sorted(v for v in values if v >= 0)
    n = len(xs)
    total = sum(xs)
    if n == 0 or total == 0:
        return 0.0
    weighted = sum((i + 1) * x for i, x in enumerate(xs))
    return (2 * weighted) / (n * total) - (n + 1) / n


def _dist(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "mean": statistics.fmean(values) if values else None,
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


def _round(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    return value


def summarise(world: World, *, wall_seconds: float | None = None) -> dict[str, Any]:
    """Every metric the issue asks for, as plain JSON-ready data."""
    s = world.scenario
    hours = s.duration / 3600.0
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "scenario": s.name,
        "seed": s.seed,
        "peers": s.peers.count,
        "clients": s.workload.clients,
        "virtual_seconds": s.duration,
        "transport": "null cipher: messages are handed over as objects after the delays a "
        "Noise-encrypted, yamux-multiplexed TCP connection would add; nothing is encrypted",
    }

    by_kind: dict[str, list[Any]] = defaultdict(list)
    for stats in world.lookups:
        by_kind[stats.kind].append(stats)
    lookups = {}
    for kind in sorted(by_kind):
        rows = by_kind[kind]
        real = [r for r in rows if r.contacted]
        lookups[kind] = {
            "count": len(rows),
            "success": sum(r.found for r in rows) / len(rows),
            "seconds": _dist([r.seconds for r in real]),
            "hops": _dist([float(r.hops) for r in real if r.found]),
            "queries_mean": statistics.fmean(r.contacted for r in real) if real else None,
            "failed_queries_mean": statistics.fmean(r.failed for r in real) if real else None,
        }
    out["dht"] = {"lookups": lookups}

    requests = world.requests
    done = [r for r in requests if r.status != "pending"]
    statuses = Counter(r.status for r in done)
    ok = [r for r in done if r.status == "ok"]
    out["requests"] = {
        "arrived": len(requests),
        "finished": len(done),
        "ok_share": len(ok) / len(done) if done else None,
        "status": dict(sorted(statuses.items())),
        "ttft_seconds": _dist([r.ttft for r in ok]),
        "latency_seconds": _dist([r.latency for r in ok]),
        "attempts_mean": statistics.fmean(r.attempts for r in done) if done else None,
        "stale_record_dials": world.counters["stale_record_dials"],
        "stale_dials_per_request": (
            world.counters["stale_record_dials"] / len(done) if done else None
        ),
    }

    honest = [n for n in world.nodes if not n.adversary]
    utilisation = [
        n.slot_seconds / (n.max_batch * n.online_seconds) for n in honest if n.online_seconds > 0
    ]
    served = [float(n.served) for n in honest]
    out["load"] = {
        "utilisation": _dist(utilisation),
        "gini_requests_served": gini(served),
        "gini_tokens_served": gini(float(n.tokens_out) for n in honest),
        "peers_that_served": sum(1 for n in honest if n.served) / len(honest) if honest else 0.0,
        "online_share_mean": (
            statistics.fmean(n.online_seconds for n in world.nodes) / s.duration
            if world.nodes
            else 0.0
        ),
    }

    out["earnings"] = _earnings(world, hours)
    out["gossip"] = _gossip(world)
    out["ledger"] = _ledger(world)
    out["adversaries"] = _adversaries(world)
    out["counters"] = dict(sorted(world.counters.items()))
    if wall_seconds is not None:
        out["wall_seconds"] = wall_seconds
    rounded: dict[str, Any] = _round(out)
    return rounded


def _earnings(world: World, hours: float) -> dict[str, Any]:
    """Operator earnings per online hour, from the first auditor's settled epochs."""
    ledger = next((n.ledger for n in world.nodes if n.ledger is not None), None)
    if ledger is None:
        return {"source": "none (no auditors in this scenario)"}
    summary = ledger.summary()
    per_node: Counter[bytes] = Counter()
    total = 0
    if summary.first_epoch is not None and summary.last_epoch is not None:
        for epoch in range(summary.first_epoch, summary.last_epoch + 1):
            payouts = ledger.payouts(epoch)
            total += payouts.operator_total
            for payout in payouts.operators:
                per_node[payout.node.multihash] += payout.operator
    per_hour = []
    by_device: dict[str, list[float]] = defaultdict(list)
    for node in world.nodes:
        if node.adversary or node.online_seconds <= 0:
            continue
        rate = per_node.get(node.peer_id.multihash, 0) / 1e6 / (node.online_seconds / 3600)
        per_hour.append(rate)
        by_device[node.device.name].append(rate)
    return {
        "source": "auditor ledger payouts (operator share), dollars per online hour",
        "operator_total_dollars": total / 1e6,
        "per_online_hour": _dist(per_hour),
        "by_device_mean": {k: statistics.fmean(v) for k, v in sorted(by_device.items())},
        "network_hours": hours,
    }


def _gossip(world: World) -> dict[str, Any]:
    relays = [n for n in world.nodes if n.gossip is not None]
    if not world.gossip_sent or not relays:
        return {"messages": len(world.gossip_sent)}
    coverage = []
    delays: list[float] = []
    end = world.scenario.duration
    for message_id, (sent, _) in world.gossip_sent.items():
        if end - sent < 10.0:
            continue  # too young to judge
        seen = world.gossip_seen[message_id]
        coverage.append(len(seen) / len(relays))
        delays.extend(t - sent for t in seen)
    return {
        "messages": len(world.gossip_sent),
        "receipts": sum(count for _, count in world.gossip_sent.values()),
        "relays": len(relays),
        "coverage": _dist(coverage),
        "full_coverage_share": (
            sum(1 for c in coverage if c >= 1.0) / len(coverage) if coverage else None
        ),
        "delay_seconds": _dist(delays),
    }


def _ledger(world: World) -> dict[str, Any]:
    ledgers = [n.ledger for n in world.nodes if n.ledger is not None]
    produced = world.counters["receipts"]
    if not ledgers:
        return {"auditors": 0, "receipts_produced": produced}
    views = []
    for ledger in ledgers:
        summary = ledger.summary()
        roots = []
        if summary.first_epoch is not None and summary.last_epoch is not None:
            roots = [
                ledger.epoch_root(e).hex()
                for e in range(summary.first_epoch, summary.last_epoch + 1)
            ]
        views.append(
            (summary.receipts, summary.paid, summary.paid_amount, summary.disputed, tuple(roots))
        )
    majority, count = Counter(views).most_common(1)[0]
    return {
        "auditors": len(ledgers),
        "receipts_produced": produced,
        "receipts_stored": majority[0],
        "paid": majority[1],
        "paid_dollars": majority[2] / 1e6,
        "disputed": majority[3],
        "agreement": count / len(ledgers),
        "complete": majority[0] / produced if produced else None,
    }


def _adversaries(world: World) -> dict[str, Any]:
    kinds = Counter(n.adversary for n in world.nodes if n.adversary)
    done = [r for r in world.requests if r.status != "pending"]
    reached: Counter[str] = Counter()
    for r in done:
        for kind in set(filter(None, r.adversaries_reached.split(";"))):
            reached[kind] += 1
    served_by = Counter(
        world.nodes[r.node].adversary
        for r in done
        if r.status == "ok" and r.node >= 0 and world.nodes[r.node].adversary
    )
    ledger = next((n.ledger for n in world.nodes if n.ledger is not None), None)
    inflators = {n.peer_id.multihash for n in world.nodes if n.adversary == "receipt_inflation"}
    paid_to_inflators = 0
    if ledger is not None and inflators:
        summary = ledger.summary()
        if summary.first_epoch is not None and summary.last_epoch is not None:
            for epoch in range(summary.first_epoch, summary.last_epoch + 1):
                for payout in ledger.payouts(epoch).operators:
                    if payout.node.multihash in inflators:
                        paid_to_inflators += payout.receipts
    return {
        "peers": dict(sorted(kinds.items())),
        "requests_reaching": {k: reached[k] / len(done) if done else 0.0 for k in sorted(kinds)},
        "requests_served_by": {k: served_by[k] / len(done) if done else 0.0 for k in sorted(kinds)},
        "inflated_receipts_paid": paid_to_inflators,
    }
