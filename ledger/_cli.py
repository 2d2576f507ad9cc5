"""`dbloom ledger`: what the local payout ledger holds, who is owed what, and proofs of it.

An operator reads its totals and an epoch's payouts here, proves one receipt was counted
(`prove`), and anyone checks such a proof against a root (`verify`) without a ledger.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.markup import escape

from dbloom.cli._common import console, fail, home_dir
from dbloom.p2p import DecodeError

from ._epochs import MAX_PROOF, decode_epoch_proof, verify_proof
from ._money import format_price
from ._receipt import ID_SIZE
from ._store import Ledger, LedgerError

LEDGER_FOLDER = "ledger"
LEDGER_FILE = "ledger.sqlite3"
LEDGER_SUFFIXES = ("", "-wal", "-shm", "-journal")
LAST_SECOND = int(datetime.max.replace(microsecond=0, tzinfo=UTC).timestamp())

ledger_app = typer.Typer(
    help="The payout ledger: receipts, payouts per epoch, inclusion proofs.",
    no_args_is_help=True,
)

LedgerOption = Annotated[
    Path | None,
    typer.Option("--ledger", help="The ledger file (default: <home>/ledger/ledger.sqlite3)."),
]


def default_ledger_path() -> Path:
    """Where the peer keeps its ledger: `<home>/ledger/ledger.sqlite3`."""
    home: Path = home_dir()
    return home / LEDGER_FOLDER / LEDGER_FILE


@ledger_app.command("summary")
def summary(ledger: LedgerOption = None) -> None:
    """Receipts stored, paid and disputed, the amount paid, and rejections by kind."""
    with _open(ledger) as book:
        totals = book.summary()
        epoch_seconds = book.epoch_seconds
    lines = [
        ("receipts", f"{totals.receipts} ({totals.paid} paid, {totals.disputed} disputed)"),
        ("paid", format_price(totals.paid_amount)),
    ]
    if totals.first_epoch is not None:
        epochs = f"{totals.first_epoch} to {totals.last_epoch} ({epoch_seconds} s each)"
        lines.append(("epochs", epochs))
    lines.append(("rejected", ", ".join(f"{k} {n}" for k, n in totals.rejections.items())))
    for label, value in lines:
        console.print(f"{label:<9} {value}", markup=False)


@ledger_app.command("payouts")
def payouts(
    epoch: Annotated[
        int | None, typer.Option(help="The epoch (default: the last complete one).")
    ] = None,
    ledger: LedgerOption = None,
) -> None:
    """An epoch's payouts per operator (its share and the network's) and totals per client."""
    with _open(ledger) as book:
        epoch_seconds = book.epoch_seconds
        if epoch is None:
            epoch = book.epoch_of(time.time_ns() // 1_000_000) - 1
        # Epochs past the year 9999 have no date to print and overflow SQLite's integers.
        last = LAST_SECOND // epoch_seconds
        if not 0 <= epoch <= last:
            fail(f"--epoch must be from 0 to {last}, not {epoch}")
        result = book.payouts(epoch)
        root = book.epoch_root(epoch)
        numerator, denominator = book.operator_share
    start = datetime.fromtimestamp(epoch * epoch_seconds, UTC)
    console.print(
        f"epoch {epoch}: from {start:%Y-%m-%d %H:%M:%S} UTC for {epoch_seconds} s, "
        f"root {root.hex()}"
    )
    console.print(
        f"total {format_price(result.total)}: operators {format_price(result.operator_total)} "
        f"({numerator}/{denominator}, rounded down per operator), "
        f"network {format_price(result.network_total)}"
    )
    if not result.operators:
        console.print("no paid receipts in this epoch")
        return
    _print_columns(
        ("operator", "receipts", "total", "operator", "network"),
        [
            (str(o.node), str(o.receipts), *map(format_price, (o.total, o.operator, o.network)))
            for o in result.operators
        ],
    )
    _print_columns(
        ("client", "receipts", "total"),
        [(c.client.hex(), str(c.receipts), format_price(c.total)) for c in result.clients],
    )


def _print_columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table padded to its widest cells, numbers right-aligned; ids are never cut short."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for first, *rest in (header, *rows):
        cells = [first.ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        console.print("  ".join(cells), markup=False)


@ledger_app.command("prove")
def prove(
    receipt_id_hex: Annotated[str, typer.Argument(help="The receipt's request id, 32 hex digits.")],
    out: Annotated[
        Path | None, typer.Option(help="File to write the proof to (default: hex on stdout).")
    ] = None,
    ledger: LedgerOption = None,
) -> None:
    """Write the proof that a paid receipt is in its epoch's Merkle root."""
    try:
        receipt_id = bytes.fromhex(receipt_id_hex)
    except ValueError:
        receipt_id = b""
    if len(receipt_id) != ID_SIZE:
        fail(f"a receipt id is {2 * ID_SIZE} hex digits, not {receipt_id_hex!r}")
    with _open(ledger) as book:
        proof = book.prove(receipt_id)
    if out is None:
        console.print(proof.hex())
        return
    try:
        out.write_bytes(proof)
    except OSError as exc:
        fail(f"{out}: {exc.strerror}")
    parsed = decode_epoch_proof(proof)
    console.print(
        f"wrote the proof of receipt {receipt_id.hex()} (entry {parsed.index} of "
        f"{parsed.size} in epoch {parsed.epoch}) to {escape(str(out))}"
    )


@ledger_app.command("verify")
def verify(
    proof_file: Annotated[Path, typer.Argument(help="A proof written by `prove` (bytes or hex).")],
    root_hex: Annotated[
        str | None, typer.Option("--root", help="The epoch root you trust, 64 hex digits.")
    ] = None,
) -> None:
    """Check a proof and its receipt's signatures; exit code 1 when it is refused."""
    root = None
    if root_hex is not None:
        try:
            root = bytes.fromhex(root_hex)
        except ValueError:
            root = b""
        if len(root) != 32:
            fail(f"a root is 64 hex digits, not {root_hex!r}")
    if proof_file.exists() and not proof_file.is_file():
        fail(f"{proof_file} is not a regular file")
    try:
        with proof_file.open("rb") as handle:
            data = handle.read(2 * MAX_PROOF + 2)
    except OSError as exc:
        fail(f"{proof_file}: {exc.strerror}")
    raw = _proof_bytes(data)
    try:
        receipt = verify_proof(raw, root)
    except DecodeError as exc:
        fail(f"refused: {exc}")
    body = receipt.body
    proof = decode_epoch_proof(raw)
    console.print(
        f"OK: receipt {body.id.hex()} is entry {proof.index} of {proof.size} in epoch "
        f"{proof.epoch} with root {proof.root.hex()}"
    )
    console.print(
        f"node {body.node_peer_id}, client {body.client.hex()}, "
        f"{body.prompt_tokens} + {body.completion_tokens} tokens, "
        f"amount {format_price(body.amount)}"
    )
    if root is None:
        console.print(
            "the root comes from the proof itself; pass --root to check it is one you trust"
        )


@ledger_app.command("export")
def export(
    csv_file: Annotated[Path, typer.Option("--csv", help="The CSV file to write.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the CSV file if it already exists.")
    ] = False,
    ledger: LedgerOption = None,
) -> None:
    """Write every stored receipt, paid and disputed, as CSV (the whole file or nothing)."""
    ledger_file = os.path.realpath(_ledger_path(ledger))
    if os.path.realpath(csv_file) in {ledger_file + suffix for suffix in LEDGER_SUFFIXES}:
        fail(f"{csv_file} is the ledger or one of its files; write the CSV elsewhere")
    if os.path.lexists(csv_file) and not force:
        fail(f"{csv_file} already exists; pass --force to replace it")
    with _open(ledger) as book:
        try:
            count = _write_whole(csv_file, book.export_csv)
        except OSError as exc:
            fail(f"{csv_file}: {exc.strerror}")
    console.print(f"exported {count} receipts to {escape(str(csv_file))}")


def _proof_bytes(data: bytes) -> bytes:
    """A proof file's bytes: as written by `--out`, or the hex `prove` prints."""
    text = data.strip()
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return data


def _write_whole(target: Path, write: Callable[[TextIO], int]) -> int:
    """Run `write` on a new file in `target`'s folder, synced then renamed over `target`.

    A failure or crash midway leaves `target` as it was, never half written.
    """
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    handle = temporary.open("x", newline="", encoding="utf-8")
    try:
        with handle:
            result = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return result


def _ledger_path(override: Path | None) -> Path:
    """The file `--ledger` names, or the default one."""
    return override.expanduser() if override is not None else default_ledger_path()


@contextmanager
def _open(override: Path | None) -> Iterator[Ledger]:
    """The ledger at `--ledger` or the default path, read-only; its failures become one line.

    Every command here only reads, so none can create, migrate or damage the file.
    """
    try:
        with Ledger.open_read_only(_ledger_path(override)) as book:
            yield book
    except (LedgerError, OSError, sqlite3.Error) as exc:
        fail(str(exc))
