"""PNG figures of a run (matplotlib, drawn off-screen)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._run import Result


def draw(result: Result, folder: Path) -> list[Path]:
    """Time series, latency distributions and load per peer; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    name = result.metrics.get("scenario", "")

    if result.samples:
        t = [s["t"] / 60 for s in result.samples]
        fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        axes[0].plot(t, [s["online"] for s in result.samples])
        axes[0].set_ylabel("peers online")
        axes[1].plot(t, [s["in_flight"] for s in result.samples], label="requests in flight")
        axes[1].plot(t, [s["busy_slots"] for s in result.samples], label="busy batch slots")
        axes[1].set_xlabel("virtual minutes")
        axes[1].legend()
        fig.suptitle(f"{name}: network over time")
        written.append(_save(fig, folder / "timeline.png"))

    ok = [r for r in result.requests if r.status == "ok"]
    if ok:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, values, label in (
            (axes[0], [r.ttft for r in ok], "time to first token (s)"),
            (axes[1], [r.latency for r in ok], "end-to-end latency (s)"),
        ):
            values = sorted(v for v in values if not math.isnan(v))
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
            ax.set_xlabel(label)
            ax.set_ylabel("share of requests")
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"{name}: latency CDFs ({len(ok)} requests)")
        written.append(_save(fig, folder / "latency.png"))

        served: dict[int, int] = {}
        for r in ok:
            served[r.node] = served.get(r.node, 0) + 1
        counts = sorted(served.values(), reverse=True)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(range(len(counts)), counts, width=1.0)
        ax.set_xlabel("peers, busiest first")
        ax.set_ylabel("requests served")
        gini = result.metrics["load"]["gini_requests_served"]
        ax.set_title(f"{name}: load per peer (Gini {gini})")
        written.append(_save(fig, folder / "load.png"))
    return written


def _save(fig: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path
