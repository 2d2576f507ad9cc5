"""Running a scenario: trio under `MockClock`, then metrics, the CSV and the plots.

Same seed, same `metrics.json`: the scenario's seed drives every random choice,
trio's own scheduler coin is seeded from it, and delays carry seeded tie-breakers
(see `_world.py`). Python randomises the hashes of bytes per process, and set
order follows hashes, so identical files across processes also need
`PYTHONHASHSEED=0`; `dbloom sim run` sets it, and `metrics.json` records it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

from ._metrics import summarise
from ._scenario import Scenario
from ._world import RequestRow, World


@dataclass(frozen=True, slots=True)
class Result:
    """A finished run: its metrics, per-request rows, time series, and where files went."""

    metrics: dict[str, Any]
    requests: list[RequestRow]
    samples: list[dict[str, float]]
    out: Path | None
    wall_seconds: float


def run(
    scenario: Scenario | str | Path,
    *,
    out: Path | str | None = None,
    progress: Callable[[float], None] | None = None,
    plots: bool = True,
) -> Result:
    """Simulate `scenario` (a Scenario, a shipped name or a TOML path) in virtual time.

    With `out`, writes `metrics.json`, `requests.csv`, `samples.csv` and (with
    `plots`) PNG figures there. `progress` is called with the virtual seconds done.
    """
    if not isinstance(scenario, Scenario):
        scenario = Scenario.load(scenario)
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dbloom-sim-") as scratch:
        ledger_dir = folder / "ledgers" if folder is not None else Path(scratch)
        if ledger_dir.exists():
            for old in ledger_dir.glob("auditor-*.sqlite*"):
                old.unlink()
        world = World(scenario, ledger_dir=ledger_dir, progress=progress)
        try:
            with _deterministic_trio(scenario.seed):
                clock = trio.testing.MockClock(autojump_threshold=0)
                trio.run(world.run, clock, clock=clock)
            metrics = summarise(world)
        finally:
            for node in world.nodes:
                if node.ledger is not None:
                    node.ledger.close()
    metrics["python_hash_seed"] = os.environ.get("PYTHONHASHSEED", "random")
    result = Result(metrics, world.requests, world.samples, folder, time.perf_counter() - wall)
    if folder is not None:
        _write(result, folder, plots=plots)
    return result


@contextmanager
def _deterministic_trio(seed: int) -> Iterator[None]:
    """Make trio's scheduler a function of the seed for the length of one run.

    Trio orders each batch of runnable tasks by chance, and wakes cancelled tasks in
    set order (by address). Its Hypothesis integration switches on a mode that sorts
    each batch by task creation before a seeded shuffle; we use that same switch.
    """
    from trio._core import _run as trio_run

    state = trio_run._r.getstate()
    before = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    trio_run._r.seed(random.Random(seed).getrandbits(64))
    setattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)  # noqa: B010
    try:
        yield
    finally:
        setattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", before)  # noqa: B010
        trio_run._r.setstate(state)


def _write(result: Result, folder: Path, *, plots: bool) -> None:
    (folder / "metrics.json").write_text(
        json.dumps(result.metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    fields = [f.name for f in dataclasses.fields(RequestRow)]
    with (folder / "requests.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in result.requests:
            writer.writerow([_cell(getattr(row, name)) for name in fields])
    if result.samples:
        with (folder / "samples.csv").open("w", newline="", encoding="utf-8") as f:
            columns = csv.DictWriter(f, fieldnames=list(result.samples[0]))
            columns.writeheader()
            columns.writerows(result.samples)
    if plots:
        from ._plots import draw

        draw(result, folder)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"
    return value
