"""`dbloom sim`: run a network scenario in virtual time and read what happened."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import fail

app = typer.Typer(
    help="Simulate the network at scale, in virtual time, on the real protocol code.",
    no_args_is_help=True,
)
console = Console()


@app.command("list")
def list_scenarios() -> None:
    """The scenarios that come with dbloom, and what each shows."""
    from dbloom.sims import Scenario, shipped_scenarios

    table = Table("scenario", "peers", "virtual time", "what it shows")
    for name in shipped_scenarios():
        s = Scenario.load(name)
        table.add_row(
            name, f"{s.peers.count:,}", f"{s.duration / 60:g} min", " ".join(s.description.split())
        )
    console.print(table)


@app.command("show")
def show(scenario: str = typer.Argument(..., help="A shipped scenario's name.")) -> None:
    """Print a shipped scenario's TOML, to copy and edit."""
    from importlib import resources

    from dbloom.sims import shipped_scenarios

    if scenario not in shipped_scenarios():
        fail(f"no shipped scenario {scenario!r}; try: {', '.join(shipped_scenarios())}")
    text = resources.files("dbloom.sims").joinpath(f"scenarios/{scenario}.toml").read_text()
    sys.stdout.write(text)


@app.command("run")
def run(
    scenario: str = typer.Argument(
        ..., help="A shipped scenario (see `dbloom sim list`) or the path of a TOML file."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder for metrics.json, requests.csv, samples.csv and the PNG plots.",
    ),
    peers: int | None = typer.Option(None, "--peers", help="Override the number of peers."),
    duration: float | None = typer.Option(
        None, "--duration", help="Override the virtual seconds to simulate."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Override the scenario's seed."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the PNG figures."),
) -> None:
    """Simulate SCENARIO and write its results to --out (same seed, same metrics.json)."""
    _fix_hash_seed()
    from dbloom.sims import Scenario, ScenarioError
    from dbloom.sims import run as simulate

    try:
        chosen = Scenario.load(scenario).with_overrides(peers=peers, duration=duration, seed=seed)
    except ScenarioError as e:
        fail(str(e))
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder")
    console.print(
        f"[bold]{chosen.name}[/]: {chosen.peers.count:,} peers, {chosen.workload.clients:,} "
        f"clients, {chosen.duration / 60:g} virtual minutes, seed {chosen.seed}"
    )
    console.print(
        "[dim]transport: a null cipher (messages handed over after the delays a "
        "Noise + yamux connection adds); nothing is encrypted in the simulator[/]"
    )
    with Progress(
        TextColumn("virtual time"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} s"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("sim", total=chosen.duration)
        try:
            result = simulate(
                chosen, out=out, plots=plots, progress=lambda t: progress.update(task, completed=t)
            )
        except OSError as e:
            fail(f"cannot write to {out}: {e}")
    console.print(summary_table(result.metrics))
    console.print(
        f"wrote {out}/metrics.json, requests.csv, samples.csv"
        + (", timeline.png, latency.png, load.png" if plots else "")
        + f" in {result.wall_seconds:.1f} s"
    )


def summary_table(m: dict[str, Any]) -> Table:
    """The figures most people look at first."""
    table = Table("metric", "value", title=f"{m['scenario']} (seed {m['seed']})")

    def row(name: str, value: Any, fmt: str = "{}") -> None:
        table.add_row(name, "—" if value is None else fmt.format(value))

    providers = m["dht"]["lookups"].get("providers", {})
    row("provider lookups: success", providers.get("success"), "{:.2%}")
    row("provider lookups: p50 hops", providers.get("hops", {}).get("p50"), "{:g}")
    row("provider lookups: p50 / p99 s", _pair(providers.get("seconds", {})))
    req = m["requests"]
    row(
        "requests finished / ok",
        f"{req['finished']:,} / {req['ok_share']:.2%}"
        if req["ok_share"] is not None
        else req["finished"],
    )
    row("time to first token p50 / p99 s", _pair(req["ttft_seconds"]))
    row("latency p50 / p99 s", _pair(req["latency_seconds"]))
    row("stale-record dials per request", req["stale_dials_per_request"], "{:.4f}")
    row("load Gini (requests served)", m["load"]["gini_requests_served"], "{:.3f}")
    row("peers that served", m["load"]["peers_that_served"], "{:.1%}")
    earnings = m["earnings"].get("per_online_hour", {})
    row("operator earnings p50 / p90 $/h", _pair(earnings, "p50", "p90"))
    gossip = m["gossip"]
    row("gossip full coverage", gossip.get("full_coverage_share"), "{:.2%}")
    row("gossip delay p99 s", gossip.get("delay_seconds", {}).get("p99"), "{:.3f}")
    row("ledger agreement", m["ledger"].get("agreement"), "{:.0%}")
    for kind, share in m["adversaries"]["requests_reaching"].items():
        row(f"requests reaching {kind}", share, "{:.2%}")
    if m["adversaries"]["peers"]:
        row("inflated receipts paid", m["adversaries"]["inflated_receipts_paid"])
    return table


def _pair(d: dict[str, Any], a: str = "p50", b: str = "p99") -> str:
    x, y = d.get(a), d.get(b)
    if x is None or y is None:
        return "—"
    return f"{x:.3g} / {y:.3g}"


def _fix_hash_seed() -> None:
    """Re-run this command with PYTHONHASHSEED=0, so that set order (and so every
    result) is the same from one run to the next."""
    if os.environ.get("PYTHONHASHSEED") == "0" or sys.argv[1:3] != ["sim", "run"]:
        return
    env = dict(os.environ, PYTHONHASHSEED="0")
    args = [sys.executable, "-c", "from dbloom.cli.main import main; main()", *sys.argv[1:]]
    sys.stdout.flush()
    os.execve(sys.executable, args, env)
