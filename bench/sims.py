"""Simulator benchmark: a shipped scenario's wall time, peak memory and DHT health.

    python bench/sims.py [--scenario planet] [--duration SECONDS] [--peers N]

Targets (issue #8, on 2 cores): `planet` (10,000 peers, one virtual hour, about 20%
of peers leaving per hour) in at most 120 s of wall time and 4 GB of memory; provider
lookups succeeding at least 99.5% of the time with a median of at most 4 hops.
Run with PYTHONHASHSEED=0 for figures that repeat exactly.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from dbloom.sims import Scenario, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="planet")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--peers", type=int, default=None)
    args = parser.parse_args()
    scenario = Scenario.load(args.scenario).with_overrides(peers=args.peers, duration=args.duration)
    print(
        f"{scenario.name}: {scenario.peers.count:,} peers, {scenario.workload.clients} clients, "
        f"{scenario.duration:,.0f} virtual s",
        flush=True,
    )
    start = time.perf_counter()

    def progress(t: float) -> None:
        if int(t) % 600 == 0:
            print(f"  {t:>6,.0f} virtual s after {time.perf_counter() - start:,.0f} s", flush=True)

    result = run(scenario, plots=False, progress=progress)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_gb = peak_kb / (1 << 30) * (1 if sys.platform == "darwin" else 1024)
    m = result.metrics
    lookups = m["dht"]["lookups"]
    providers = lookups.get("providers", {})
    values = lookups.get("get", {})
    online = m["load"]["online_share_mean"]
    peer_hours = online * scenario.peers.count * scenario.duration / 3600
    churn = m["counters"].get("departures", 0) / peer_hours if peer_hours else 0.0
    rows = [
        ("wall time (s)", f"{wall:,.1f}", "<= 120", wall <= 120),
        ("peak memory (GB)", f"{peak_gb:.2f}", "<= 4", peak_gb <= 4),
        (
            "provider lookup success",
            f"{providers.get('success', 0):.2%}",
            ">= 99.5%",
            providers.get("success", 0) >= 0.995,
        ),
        (
            "provider lookup hops p50",
            f"{providers.get('hops', {}).get('p50')}",
            "<= 4",
            (providers.get("hops", {}).get("p50") or 99) <= 4,
        ),
        ("node-record lookup success", f"{values.get('success', 0):.2%}", "", None),
        ("node-record lookup hops p50", f"{values.get('hops', {}).get('p50')}", "", None),
        ("mean share of time online", f"{online:.1%}", "", None),
        ("departures per peer-hour", f"{churn:.1%}", "", None),
        ("requests ok", f"{m['requests']['ok_share']:.2%}", "", None),
        ("time to first token p50 (s)", f"{m['requests']['ttft_seconds']['p50']}", "", None),
    ]
    print(f"{'figure':<30} {'value':>12} {'target':>10}")
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        print(f"{name:<30} {value:>12} {target:>10} {verdict}")


if __name__ == "__main__":
    main()
