"""`dbloom keys`: the peer's identity key."""

from __future__ import annotations

from pathlib import Path

import typer

from dbloom.p2p import KEY_FILE_NAME, KeyFileError, create_identity, load_identity

from ._common import console, fail, home_dir

app = typer.Typer(help="Create and show this peer's identity key.", no_args_is_help=True)


@app.command("init")
def init(
    home: Path | None = typer.Option(None, help="Home folder (default: DBLOOM_HOME)."),
) -> None:
    """Create the identity key (mode 0600); refuses to overwrite one."""
    path = home_dir(home) / KEY_FILE_NAME
    try:
        pair = create_identity(path)
    except KeyFileError as exc:
        fail(str(exc))
    console.print(f"created identity {pair.peer_id}")
    console.print(f"key file {path}")


@app.command("show")
def show(
    home: Path | None = typer.Option(None, help="Home folder (default: DBLOOM_HOME)."),
) -> None:
    """Print the peer id of the identity key."""
    path = home_dir(home) / KEY_FILE_NAME
    try:
        pair = load_identity(path)
    except KeyFileError as exc:
        fail(str(exc))
    console.print(f"peer id {pair.peer_id}")
    console.print(f"as CID  {pair.peer_id.to_cid()}")
    console.print(f"key file {path}")
