"""`dbloom status`: what the running peer is doing, read from the status file it keeps.

A running `dbloom peer` rewrites `<home>/peer-status.json` every few seconds (atomically,
mode 0600): its state, why it serves or not, counts of requests and tokens, earnings and
attestation. Only counts and the owner's own conditions go in it, never request data, so
reading it needs no connection to the peer and no secret. A file whose writer is gone, or
that has not changed for a while, describes a peer that is no longer running.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from dbloom.ledger._money import format_price

from ._common import console, fail, home_dir

STATUS_FILE = "peer-status.json"
STATUS_VERSION = 1
STATUS_INTERVAL = 2.0
STALE_AFTER = 15.0
MARKS = {"ok": "✓", "blocks": "✗", "unknown": "?"}


def status_path(home: Path) -> Path:
    return home / STATUS_FILE


def write_status(path: Path, snapshot: Mapping[str, Any]) -> None:
    """Replace `path` with `snapshot` as JSON in one step, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(snapshot, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_status(path: Path) -> dict[str, Any] | None:
    """The last snapshot, or None when there is none (or it is not ours to read)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("v") != STATUS_VERSION:
        return None
    return data


def _alive(pid: object) -> bool:
    if type(pid) is not int or not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_running(snapshot: Mapping[str, Any], now: float | None = None) -> bool:
    """The writer still runs and wrote recently (and did not say it stopped)."""
    now = time.time() if now is None else now
    updated = snapshot.get("updated_ms")
    fresh = type(updated) is int and 0 <= updated < 1 << 53 and now - updated / 1000 < STALE_AFTER
    return fresh and snapshot.get("state") != "stopped" and _alive(snapshot.get("pid"))


def _table(value: object) -> Mapping[str, Any]:
    """A nested table of the snapshot; anything else (a damaged file) reads as empty."""
    return value if isinstance(value, dict) else {}


def _micro(value: object) -> int:
    return value if type(value) is int and abs(value) < 1 << 63 else 0


def status_rows(snapshot: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The snapshot as (label, text) rows, for `dbloom status` and `dbloom service status`.

    The file is ours, but may be damaged: a field of the wrong type shows as missing.
    """
    availability = _table(snapshot.get("availability"))
    rows = [
        ("peer", f"{snapshot.get('peer_id', '?')} (pid {snapshot.get('pid', '?')})"),
        ("state", str(snapshot.get("state", "?"))),
        ("availability", "serving" if availability.get("serve") else "paused"),
    ]
    checks = availability.get("checks")
    for check in map(_table, checks if isinstance(checks, list) else []):
        rows.append(("", f"{MARKS.get(str(check.get('state')), '?')} {check.get('text', '')}"))
    earnings = _table(snapshot.get("earnings"))
    attestation = _table(snapshot.get("attestation"))
    models = snapshot.get("models")
    rows += [
        ("models", ", ".join(map(str, models if isinstance(models, list) else [])) or "none"),
        ("served", f"{snapshot.get('requests', 0)} requests, {snapshot.get('tokens', 0)} tokens"),
        ("in flight", str(snapshot.get("in_flight", 0))),
        (
            "earnings",
            f"{format_price(_micro(earnings.get('micro')))} this epoch "
            f"({earnings.get('receipts', 0)} receipts)",
        ),
        ("attestation", f"{attestation.get('kind', '?')}: {attestation.get('status', '?')}"),
        ("reachability", str(snapshot.get("reachability", "?"))),
    ]
    return rows


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        console.print(f"{label:<{width}}  {escape(text)}")


def status(
    as_json: bool = typer.Option(False, "--json", help="Print the raw status file."),
    home: Path | None = typer.Option(None, "--home", help="Home folder of the peer."),
) -> None:
    """Show the running peer's state: serving or paused and why, requests, tokens, earnings.

    Exits 1 when no peer is running (after showing the last status it wrote, if any).
    """
    path = status_path(home_dir(home))
    snapshot = read_status(path)
    if snapshot is None:
        fail(f"no peer status at {path}: is `dbloom peer` (or `dbloom service`) running?")
    running = is_running(snapshot)
    if as_json:
        console.print_json(data=snapshot)
    else:
        if not running:
            updated = snapshot.get("updated_ms")
            when = "at an unknown time"
            if isinstance(updated, int):
                with contextlib.suppress(ValueError, OverflowError, OSError):
                    stamp = time.localtime(updated / 1000)
                    when = time.strftime("%Y-%m-%d %H:%M:%S", stamp)
            console.print(f"not running (last status written {when})")
        print_rows(status_rows(snapshot))
    if not running:
        raise typer.Exit(1)
