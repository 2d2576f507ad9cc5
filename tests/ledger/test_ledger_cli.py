"""`dbloom ledger …` through typer: summary, payouts, prove, verify, export."""

from __future__ import annotations

import csv
import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import TextIO

import pytest
from test_receipt import CLIENT, NODE, OTHER, TOKENS, body_for, make_receipt, sign_both
from typer.testing import CliRunner

from dbloom.cli._common import state
from dbloom.ledger import Ledger, decode_receipt
from dbloom.ledger._cli import ledger_app
from dbloom.ledger._money import format_price

runner = CliRunner()
HOUR_MS = 3_600_000


def cli(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(ledger_app, [str(a) for a in args], env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def last_epoch() -> int:
    """The last complete epoch by the wall clock: what `payouts` shows by default."""
    return time.time_ns() // 1_000_000 // HOUR_MS - 1


@pytest.fixture
def filled(tmp_path: Path, last_epoch: int) -> tuple[Path, list[bytes]]:
    """A ledger with three paid receipts (two operators) and a disputed one, last epoch."""
    path = tmp_path / "ledger.sqlite3"
    finished = last_epoch * HOUR_MS + 5_000
    raws = [
        make_receipt(finished_ms=finished, prompt_tokens=90_000),
        make_receipt(finished_ms=finished + 1, prompt_tokens=1_234_567),
        make_receipt(node=OTHER, finished_ms=finished + 2, prompt_tokens=70_001),
        make_receipt(TOKENS, received=TOKENS[:2], finished_ms=finished + 3),
    ]
    with Ledger.open(path) as ledger:
        ledger.ingest_many([*raws, b"junk", raws[0]])
    return path, raws


def test_summary(filled: tuple[Path, list[bytes]], last_epoch: int) -> None:
    path, raws = filled
    code, out, _ = cli("summary", "--ledger", path)
    assert code == 0
    paid = sum(decode_receipt(raw).body.amount for raw in raws[:3])
    assert "4 (3 paid, 1 disputed)" in out
    assert f"paid      {format_price(paid)}" in out
    assert f"{last_epoch} to {last_epoch} (3600 s each)" in out
    assert "malformed 1, forged 0, inflated 0, replayed 0, duplicate 1" in out


def test_payouts_default_to_the_last_complete_epoch(
    filled: tuple[Path, list[bytes]], last_epoch: int
) -> None:
    path, _ = filled
    code, out, _ = cli("payouts", "--ledger", path)
    assert code == 0, out
    with Ledger.open(path) as ledger:
        payouts = ledger.payouts(last_epoch)
        root = ledger.epoch_root(last_epoch)
    assert f"epoch {last_epoch}: from " in out and root.hex() in out
    assert f"total {format_price(payouts.total)}: " in out
    assert f"operators {format_price(payouts.operator_total)} (95/100" in out
    for row in payouts.operators:
        assert str(row.node) in out
        assert format_price(row.operator) in out and format_price(row.network) in out
    assert CLIENT.public_key.data.hex() in out
    assert cli("payouts", "--ledger", path, "--epoch", str(last_epoch))[1] == out
    code, out, _ = cli("payouts", "--ledger", path, "--epoch", str(last_epoch + 1))
    assert code == 0 and "no paid receipts in this epoch" in out
    assert str(NODE.peer_id) not in out


def test_prove_and_verify(tmp_path: Path, filled: tuple[Path, list[bytes]]) -> None:
    path, raws = filled
    receipt_id = decode_receipt(raws[1]).body.id.hex()
    proof_file = tmp_path / "receipt.proof"
    code, out, _ = cli("prove", receipt_id, "--ledger", path, "--out", proof_file)
    assert code == 0 and f"wrote the proof of receipt {receipt_id}" in out
    with Ledger.open(path) as ledger:
        root = ledger.epoch_root(ledger.epoch_of(decode_receipt(raws[1]).body.finished_ms))
    code, out, _ = cli("verify", proof_file, "--root", root.hex())
    assert code == 0 and out.startswith(f"OK: receipt {receipt_id} is entry ")
    assert f"node {NODE.peer_id}" in out and "pass --root" not in out
    code, out, _ = cli("verify", proof_file)
    assert code == 0 and "pass --root" in out
    code, _, err = cli("verify", proof_file, "--root", "00" * 32)
    assert code == 1 and "refused: the proof is for root" in err
    data = bytearray(proof_file.read_bytes())
    data[-40] ^= 1
    proof_file.write_bytes(bytes(data))
    code, _, err = cli("verify", proof_file)
    assert code == 1 and err.startswith("error: refused")
    # Without --out the proof is printed as hex, which verify reads as well.
    code, out, _ = cli("prove", receipt_id, "--ledger", path)
    assert code == 0
    hex_file = tmp_path / "receipt.hex"
    hex_file.write_text(out)
    assert cli("verify", hex_file, "--root", root.hex())[0] == 0


def test_prove_refusals(tmp_path: Path, filled: tuple[Path, list[bytes]]) -> None:
    path, raws = filled
    code, _, err = cli("prove", "xyz", "--ledger", path)
    assert code == 1 and "32 hex digits" in err
    code, _, err = cli("prove", "00" * 16, "--ledger", path)
    assert code == 1 and "no receipt with id" in err
    disputed = decode_receipt(raws[3]).body.id.hex()
    code, _, err = cli("prove", disputed, "--ledger", path)
    assert code == 1 and "disputed" in err
    code, _, err = cli("verify", tmp_path / "missing.proof")
    assert code == 1 and "missing.proof" in err
    code, _, err = cli("verify", tmp_path / "missing.proof", "--root", "abc")
    assert code == 1 and "64 hex digits" in err


def test_export(tmp_path: Path, filled: tuple[Path, list[bytes]]) -> None:
    path, raws = filled
    out_file = tmp_path / "receipts.csv"
    code, out, _ = cli("export", "--csv", out_file, "--ledger", path)
    assert code == 0 and f"exported 4 receipts to {out_file}" in out
    with out_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["id"] for row in rows) == sorted(
        decode_receipt(raw).body.id.hex() for raw in raws
    )


def test_default_location_is_in_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "home", None)
    env = {"DBLOOM_HOME": str(tmp_path)}
    code, _, err = cli("summary", env=env)
    assert code == 1 and f"no ledger at {tmp_path / 'ledger' / 'ledger.sqlite3'}" in err
    with Ledger.open(tmp_path / "ledger" / "ledger.sqlite3") as ledger:
        ledger.ingest(make_receipt())
    code, out, _ = cli("summary", env=env)
    assert code == 0 and "1 (1 paid, 0 disputed)" in out


def test_errors_are_one_line_and_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "[bold]odd"
    folder.mkdir()
    bad = folder / "ledger.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    code, _, err = cli("summary", "--ledger", bad)
    assert code == 1 and "[bold]odd" in err and err.count("\n") == 1
    inflated = sign_both(body_for(amount=10**6))
    with Ledger.open(tmp_path / "ok.sqlite3") as ledger:
        ledger.ingest(inflated)
    code, out, _ = cli("summary", "--ledger", tmp_path / "ok.sqlite3")
    assert code == 0 and "inflated 1" in out


def test_export_never_writes_over_the_ledger(
    tmp_path: Path, filled: tuple[Path, list[bytes]]
) -> None:
    path, _ = filled
    link = tmp_path / "link.csv"
    link.symlink_to(path)
    with Ledger.open(path):  # an open writer keeps the -wal and -shm files in place
        before = path.read_bytes()
        targets = [path, tmp_path / "." / path.name, link]
        targets += [tmp_path / f"{path.name}{suffix}" for suffix in ("-wal", "-shm")]
        for target in targets:
            for force in ((), ("--force",)):
                code, _, err = cli("export", "--csv", target, "--ledger", path, *force)
                assert code == 1 and "is the ledger or one of its files" in err, target
                assert err.count("\n") == 1
        assert path.read_bytes() == before
    code, out, _ = cli("summary", "--ledger", path)
    assert code == 0 and "4 (3 paid, 1 disputed)" in out


def test_export_replaces_a_file_only_with_force(
    tmp_path: Path, filled: tuple[Path, list[bytes]]
) -> None:
    path, _ = filled
    out_file = tmp_path / "receipts.csv"
    out_file.write_text("someone's notes\n")
    code, _, err = cli("export", "--csv", out_file, "--ledger", path)
    assert code == 1 and "already exists; pass --force" in err and err.count("\n") == 1
    assert out_file.read_text() == "someone's notes\n"
    code, out, _ = cli("export", "--csv", out_file, "--ledger", path, "--force")
    assert code == 0 and "exported 4 receipts" in out
    with out_file.open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_export_leaves_the_old_file_whole(
    tmp_path: Path, filled: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = filled
    out_file = tmp_path / "receipts.csv"
    out_file.write_text("last week's export\n")
    export_csv = Ledger.export_csv

    def export_then_fill_the_disk(ledger: Ledger, handle: TextIO) -> int:
        export_csv(ledger, handle)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Ledger, "export_csv", export_then_fill_the_disk)
    code, _, err = cli("export", "--csv", out_file, "--ledger", path, "--force")
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1
    assert out_file.read_text() == "last week's export\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("foreign", [False, True], ids=["empty", "foreign"])
def test_reading_commands_refuse_a_file_that_is_not_a_ledger_and_leave_it_alone(
    tmp_path: Path, foreign: bool
) -> None:
    path = tmp_path / "other.sqlite3"
    path.write_bytes(b"")
    if foreign:
        db = sqlite3.connect(path)
        db.executescript("CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('ada');")
        db.close()
    before = path.read_bytes()
    for command in (
        ("summary",),
        ("payouts",),
        ("payouts", "--epoch", "3"),
        ("prove", "00" * 16),
        ("export", "--csv", tmp_path / "out.csv"),
    ):
        code, _, err = cli(*command, "--ledger", path)
        assert code == 1 and f"{path} is not a dbloom ledger" in err, command
        assert err.count("\n") == 1
        assert path.read_bytes() == before
    assert not (tmp_path / "out.csv").exists()


def test_payouts_refuses_an_epoch_out_of_range(filled: tuple[Path, list[bytes]]) -> None:
    path, _ = filled
    last = 253_402_300_799 // 3600  # the last epoch that starts by the end of year 9999
    for epoch in (-1, last + 1, 99_999_999_999_999, 10**30):
        code, _, err = cli("payouts", "--ledger", path, "--epoch", str(epoch))
        assert code == 1 and f"--epoch must be from 0 to {last}, not {epoch}" in err
        assert err.count("\n") == 1
    code, out, _ = cli("payouts", "--ledger", path, "--epoch", str(last))
    assert code == 0 and "from 9999-12-31 23:00:00 UTC" in out
