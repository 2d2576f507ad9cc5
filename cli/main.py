"""The `dbloom` command."""

from __future__ import annotations

from pathlib import Path

import typer

from dbloom.inference import models_app

from . import demo, dht, keys, p2p
from ._common import state

app = typer.Typer(
    help="dbloom: private AI inference on idle Macs, over a peer-to-peer network.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys.app, name="keys")
app.add_typer(p2p.app, name="p2p")
app.add_typer(dht.app, name="dht")
app.add_typer(models_app, name="models")
app.command("demo")(demo.demo)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    home: Path | None = typer.Option(None, "--home", envvar="DBLOOM_HOME", help="Home folder."),
) -> None:
    state.debug = debug
    state.home = home


def main() -> None:
    """Console-script entry point."""
    app()
