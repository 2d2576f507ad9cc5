"""The `dbloom` command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from dbloom.inference import models_app
from dbloom.ledger._cli import ledger_app

from . import attest, demo, dht, keys, p2p, peer, relay, service, shim, sim, status
from ._common import fail, report_unexpected, state
from ._config import ConfigError, load_config

app = typer.Typer(
    help="dbloom: private AI inference on idle Macs, over a peer-to-peer network.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys.app, name="keys")
app.add_typer(p2p.app, name="p2p")
app.add_typer(dht.app, name="dht")
app.add_typer(models_app, name="models")
app.add_typer(attest.app, name="attest")
app.command("demo")(demo.demo)
app.command("peer")(peer.peer)
app.command("relay")(relay.relay)
app.command("status")(status.status)
app.add_typer(service.app, name="service")
app.add_typer(shim.app, name="shim")
app.add_typer(ledger_app, name="ledger")
app.add_typer(sim.app, name="sim")


@app.callback()
def _options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    home: Path | None = typer.Option(None, "--home", envvar="DBLOOM_HOME", help="Home folder."),
) -> None:
    state.debug = debug
    state.home = home
    try:
        ctx.default_map = load_config(typer.main.get_group(app).commands)
    except ConfigError as e:
        fail(str(e))


def main() -> None:
    """Console-script entry point: whatever escapes a command is one line, not a traceback."""
    try:
        app()
    except Exception as exc:
        if state.debug:
            raise
        try:
            report_unexpected(exc)
        except typer.Exit as done:
            sys.exit(done.exit_code)
