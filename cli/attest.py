"""`dbloom attest`: what this node would claim, and checking another node's evidence."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dbloom.attest import Attestor, Policy, measure_software, read_posture
from dbloom.attest._tlog_cli import log_app
from dbloom.inference import model_digest
from dbloom.p2p import KeyPair, Multiaddr, open_host

from ._common import console, run

app = typer.Typer(
    help="Attestation: measurements, transparency logs, checks.", no_args_is_help=True
)

app.add_typer(log_app, name="log")


@app.command("measure")
def measure(
    model: list[Path] = typer.Option([], "--model", "-m", help="Model folder to digest."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print the software measurement (and model digests) a node here would claim."""
    measurement = measure_software()
    posture = read_posture()
    models = {str(path): model_digest(path) for path in model}
    if as_json:
        report = {
            "software": measurement.hex,
            "files": measurement.files,
            "python": measurement.python,
            "runtime": measurement.runtime,
            "models": models,
            "posture": posture.as_dict(),
        }
        console.print_json(json.dumps(report))
        return
    console.print(f"software measurement  {measurement.hex}")
    runtime = ", ".join(f"{k} {v}" for k, v in measurement.runtime.items())
    console.print(
        f"  over {measurement.files} dbloom files, Python {measurement.python}, {runtime}"
    )
    for path, digest in models.items():
        console.print(f"model digest          {digest}  {path}")
    for key, value in posture.as_dict().items():
        shown = "unknown" if value is None else ("on" if value else "off")
        console.print(f"posture {key:15} {shown}")


@app.command("check")
def check(
    address: str = typer.Argument(..., help="The node's full multiaddr (ending in /p2p/<id>)."),
    allow_dev: bool = typer.Option(False, "--allow-dev", help="Accept dev evidence (untrusted)."),
) -> None:
    """Challenge a node and print the verdict, as a client would before sending a prompt."""

    async def main() -> None:
        policy = Policy().with_dev() if allow_dev else Policy()
        async with open_host(KeyPair.generate()) as host:
            conn = await host.connect(Multiaddr.parse(address))
            verdict = await Attestor(host, policy).verdict(conn)
            console.print(f"{conn.peer_id}: {verdict}")

    run(main)
