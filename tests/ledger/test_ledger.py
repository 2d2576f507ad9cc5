"""The payout ledger: verification on ingest, dedupe and replay, counts, payouts, roots, proofs."""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import sqlite3
import tempfile
import threading
from pathlib import Path

import msgpack
import pytest
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st
from test_receipt import (
    CLIENT,
    MODEL,
    NODE,
    OTHER,
    T0,
    TOKENS,
    body_for,
    make_receipt,
    sign_both,
)

from dbloom.attest._merkle import EMPTY_ROOT, MerkleTree
from dbloom.ledger import (
    REJECTION_KINDS,
    EpochProof,
    InvalidProof,
    Ledger,
    LedgerError,
    Observed,
    Outcome,
    ReceiptError,
    Status,
    compute_amount,
    decode_epoch_proof,
    decode_receipt,
    epoch_of,
    split_payout,
    tokens_digest,
    verify_proof,
)
from dbloom.ledger._money import MAX_PRICE_MICRO
from dbloom.ledger._receipt import MAX_TOKENS
from dbloom.ledger._store import PARALLEL_MIN
from dbloom.p2p import DecodeError, KeyPair

HOUR_MS = 3_600_000
EPOCH = T0 // HOUR_MS
IN_EPOCH = EPOCH * HOUR_MS + 1_000


def open_ledger(tmp_path: Path, name: str = "ledger.sqlite3") -> Ledger:
    return Ledger.open(tmp_path / "ledger" / name)


def test_ingest_stores_once_and_counts_duplicates(tmp_path: Path) -> None:
    raw = make_receipt(finished_ms=IN_EPOCH)
    receipt_id = decode_receipt(raw).body.id
    with open_ledger(tmp_path) as ledger:
        first = ledger.ingest(raw)
        assert (first.outcome, first.receipt_id, first.added) == (Outcome.PAID, receipt_id, True)
        again = ledger.ingest(raw)
        assert (again.outcome, again.added) == (Outcome.DUPLICATE, False)
        summary = ledger.summary()
    assert (summary.receipts, summary.paid, summary.disputed) == (1, 1, 0)
    assert summary.paid_amount == decode_receipt(raw).body.amount
    assert summary.rejections == {k: int(k == "duplicate") for k in REJECTION_KINDS}
    assert summary.first_epoch == summary.last_epoch == EPOCH


def test_a_different_receipt_under_a_known_id_is_replayed(tmp_path: Path) -> None:
    body = body_for(finished_ms=IN_EPOCH)
    first = sign_both(body)
    second = sign_both(dataclasses.replace(body, started_ms=body.started_ms + 1))
    with open_ledger(tmp_path) as ledger:
        assert ledger.ingest(first).outcome is Outcome.PAID
        replay = ledger.ingest(second)
        assert (replay.outcome, replay.receipt_id) == (Outcome.REPLAYED, body.id)
        # A forgery under a known id is counted as what it is, not as a replay.
        forged = sign_both(dataclasses.replace(body, started_ms=body.started_ms + 2), client=OTHER)
        assert ledger.ingest(forged).outcome is Outcome.FORGED
        # Within one batch the first one wins too.
        other = body_for(finished_ms=IN_EPOCH)
        results = ledger.ingest_many(
            [
                sign_both(other),
                sign_both(dataclasses.replace(other, started_ms=other.started_ms + 1)),
            ]
        )
        assert [r.outcome for r in results] == [Outcome.PAID, Outcome.REPLAYED]
        summary = ledger.summary()
    assert summary.paid == 2
    assert summary.rejections["replayed"] == 2 and summary.rejections["forged"] == 1


def test_rejections_are_counted_by_kind_and_persist(tmp_path: Path) -> None:
    good = make_receipt(finished_ms=IN_EPOCH)
    inflated = sign_both(dataclasses.replace(body_for(), amount=10**9))
    forged = sign_both(body_for(node=OTHER), node=NODE)
    batch = [good, b"garbage", inflated, forged, good, b"\x80", inflated]
    with open_ledger(tmp_path) as ledger:
        results = ledger.ingest_many(batch)
    assert [r.outcome for r in results] == [
        Outcome.PAID,
        Outcome.MALFORMED,
        Outcome.INFLATED,
        Outcome.FORGED,
        Outcome.DUPLICATE,
        Outcome.MALFORMED,
        Outcome.INFLATED,
    ]
    assert results[1].receipt_id is None and "msgpack" in results[1].detail
    assert "amount" in results[2].detail
    with open_ledger(tmp_path) as ledger:
        assert ledger.summary().rejections == {
            "malformed": 2,
            "forged": 1,
            "inflated": 2,
            "replayed": 0,
            "duplicate": 1,
        }


def test_disputed_receipts_are_stored_and_reported_but_never_paid(tmp_path: Path) -> None:
    paid = make_receipt(finished_ms=IN_EPOCH)
    disputed = make_receipt(TOKENS, received=TOKENS[:1], finished_ms=IN_EPOCH)
    with open_ledger(tmp_path) as ledger:
        assert [r.outcome for r in ledger.ingest_many([paid, disputed])] == [
            Outcome.PAID,
            Outcome.DISPUTED,
        ]
        assert ledger.ingest(disputed).outcome is Outcome.DUPLICATE
        summary = ledger.summary()
        payouts = ledger.payouts(EPOCH)
        root = ledger.epoch_root(EPOCH)
        with pytest.raises(LedgerError, match="disputed"):
            ledger.prove(decode_receipt(disputed).body.id)
        out = io.StringIO()
        assert ledger.export_csv(out) == 2
    assert (summary.receipts, summary.paid, summary.disputed) == (2, 1, 1)
    assert summary.paid_amount == decode_receipt(paid).body.amount
    assert payouts.total == decode_receipt(paid).body.amount
    assert [o.receipts for o in payouts.operators] == [1]
    assert root == MerkleTree([paid]).root()
    statuses = sorted(row["status"] for row in csv.DictReader(io.StringIO(out.getvalue())))
    assert statuses == ["disputed", "ok"]


def test_payout_shares_add_up_exactly(tmp_path: Path) -> None:
    operators = [KeyPair.from_seed(bytes([i]) * 32) for i in range(1, 4)]
    clients = [CLIENT, OTHER]
    rng = random.Random(7)
    raws = []
    for i in range(60):
        prompt = rng.randrange(1, 5000)
        raws.append(
            make_receipt(
                TOKENS[: rng.randrange(1, 5)],
                node=operators[i % 3],
                client=clients[i % 2],
                prompt_tokens=prompt,
                price_in=rng.randrange(1, 3_000_000),
                price_out=rng.randrange(1, 9_000_000),
                finished_ms=IN_EPOCH + i,
            )
        )
    with Ledger.open(tmp_path / "l.sqlite3", operator_share=(95, 100)) as ledger:
        ledger.ingest_many(raws)
        payouts = ledger.payouts(EPOCH)
        assert ledger.payouts(EPOCH + 1).operators == ()
    amounts = [decode_receipt(raw).body.amount for raw in raws]
    assert payouts.total == sum(amounts)
    assert payouts.operator_total + payouts.network_total == payouts.total
    assert sum(c.total for c in payouts.clients) == payouts.total
    assert sorted(c.client for c in payouts.clients) == sorted(k.public_key.data for k in clients)
    assert len(payouts.operators) == 3 and sum(o.receipts for o in payouts.operators) == 60
    for row in payouts.operators:
        assert row.operator == row.total * 95 // 100
        assert row.operator + row.network == row.total
    assert any(row.total % 100 for row in payouts.operators), "no rounding exercised"


@given(st.integers(0, 2**80), st.integers(1, 10**6), st.data())
def test_split_payout_loses_nothing(total: int, denominator: int, data: st.DataObject) -> None:
    numerator = data.draw(st.integers(0, denominator))
    operator, network = split_payout(total, (numerator, denominator))
    assert operator + network == total
    assert operator == total * numerator // denominator and network >= 0


def test_sums_beyond_64_bits_stay_exact(tmp_path: Path) -> None:
    huge = MAX_TOKENS - 1
    raws = [
        sign_both(
            body_for(
                prompt_tokens=huge,
                price_in=MAX_PRICE_MICRO,
                price_out=MAX_PRICE_MICRO,
                completion_tokens=huge,
                amount=compute_amount(huge, huge, MAX_PRICE_MICRO, MAX_PRICE_MICRO),
                finished_ms=IN_EPOCH,
            )
        )
        for _ in range(3)
    ]
    with open_ledger(tmp_path) as ledger:
        assert all(r.outcome is Outcome.PAID for r in ledger.ingest_many(raws))
        payouts = ledger.payouts(EPOCH)
        summary = ledger.summary()
    expected = 3 * compute_amount(huge, huge, MAX_PRICE_MICRO, MAX_PRICE_MICRO)
    assert expected > 2**64
    assert payouts.total == summary.paid_amount == expected
    assert payouts.clients[0].total == expected


def test_epochs_split_at_the_boundary(tmp_path: Path) -> None:
    start = (EPOCH + 1) * HOUR_MS
    before = make_receipt(finished_ms=start - 1)
    at = make_receipt(finished_ms=start)
    with open_ledger(tmp_path) as ledger:
        ledger.ingest_many([before, at])
        assert ledger.epoch_of(start - 1) == epoch_of(start - 1, 3600) == EPOCH
        assert [o.receipts for o in ledger.payouts(EPOCH).operators] == [1]
        assert [o.receipts for o in ledger.payouts(EPOCH + 1).operators] == [1]
    with Ledger.open(tmp_path / "short.sqlite3", epoch_seconds=60) as ledger:
        ledger.ingest(at)
        assert ledger.summary().first_epoch == start // 60_000


def test_epoch_roots_do_not_depend_on_arrival_order(tmp_path: Path) -> None:
    raws = [make_receipt(finished_ms=IN_EPOCH + i) for i in range(40)]
    raws.append(make_receipt(TOKENS, received=(), finished_ms=IN_EPOCH))
    raws.append(make_receipt(finished_ms=IN_EPOCH + HOUR_MS))
    shuffled = raws[:]
    random.Random(3).shuffle(shuffled)
    with open_ledger(tmp_path, "a.sqlite3") as a, open_ledger(tmp_path, "b.sqlite3") as b:
        a.ingest_many(raws)
        for start in range(0, len(shuffled), 7):
            b.ingest_many(shuffled[start : start + 7])
        assert a.epoch_root(EPOCH) == b.epoch_root(EPOCH)
        assert a.epoch_root(EPOCH + 1) == b.epoch_root(EPOCH + 1)
        assert a.epoch_root(EPOCH - 1) == EMPTY_ROOT
        paid = sorted((r for r in raws[:40]), key=lambda raw: decode_receipt(raw).body.id)
        assert a.epoch_root(EPOCH) == MerkleTree(paid).root()


def test_proofs_verify_against_the_epoch_root(tmp_path: Path) -> None:
    raws = [make_receipt(finished_ms=IN_EPOCH + i) for i in range(13)]
    with open_ledger(tmp_path) as ledger:
        ledger.ingest_many(raws)
        root = ledger.epoch_root(EPOCH)
        for raw in raws:
            receipt_id = decode_receipt(raw).body.id
            proof = ledger.prove(receipt_id)
            assert verify_proof(proof, root) == decode_receipt(raw)
            assert verify_proof(proof).body.id == receipt_id
            parsed = decode_epoch_proof(proof)
            assert (parsed.epoch, parsed.size, parsed.root) == (EPOCH, 13, root)
            assert parsed.receipt == raw
        with pytest.raises(LedgerError, match="no receipt"):
            ledger.prove(bytes(16))


def _proof(tmp_path: Path) -> tuple[bytes, bytes]:
    """The proof of entry 0 of 5 (so entry 1 has a path as long) and the epoch root."""
    raws = [make_receipt(finished_ms=IN_EPOCH + i) for i in range(5)]
    first = min(decode_receipt(raw).body.id for raw in raws)
    with open_ledger(tmp_path) as ledger:
        ledger.ingest_many(raws)
        return ledger.prove(first), ledger.epoch_root(EPOCH)


def test_tampered_proofs_fail(tmp_path: Path) -> None:
    proof, root = _proof(tmp_path)
    parsed = decode_epoch_proof(proof)
    with pytest.raises(InvalidProof, match="for root " + root.hex()):
        verify_proof(proof, bytes(32))
    changes = {
        "index": (dataclasses.replace(parsed, index=1), "does not lead"),
        "short path": (dataclasses.replace(parsed, path=parsed.path[:-1]), "shorter"),
        "long path": (dataclasses.replace(parsed, path=(*parsed.path, root)), "longer"),
        "path": (dataclasses.replace(parsed, path=(bytes(32), *parsed.path[1:])), "lead"),
        "root": (dataclasses.replace(parsed, root=bytes(32)), "does not lead"),
        "epoch": (dataclasses.replace(parsed, epoch=parsed.epoch + 1), "belongs to epoch"),
        "epoch length": (dataclasses.replace(parsed, epoch_seconds=60), "belongs to epoch"),
        "index past size": (dataclasses.replace(parsed, index=5), "index must be"),
    }
    for changed, message in changes.values():
        with pytest.raises(InvalidProof, match=message):
            verify_proof(changed.encode())
    fields = msgpack.unpackb(proof, raw=False)
    receipt = msgpack.unpackb(fields["receipt"], raw=False)
    receipt["body"]["amount"] += 1
    fields["receipt"] = msgpack.packb(receipt, use_bin_type=True)
    with pytest.raises(ReceiptError, match="signature"):
        verify_proof(msgpack.packb(fields, use_bin_type=True))


def test_a_proof_of_a_disputed_receipt_fails(tmp_path: Path) -> None:
    body = body_for(finished_ms=IN_EPOCH)
    disputed = sign_both(body, status=Status.DISPUTED, observed=Observed(0, tokens_digest(())))
    tree = MerkleTree([disputed])
    proof = EpochProof(
        epoch=EPOCH,
        epoch_seconds=3600,
        index=0,
        size=1,
        path=(),
        root=tree.root(),
        receipt=disputed,
    )
    with pytest.raises(InvalidProof, match="disputed"):
        verify_proof(proof.encode())


def _module_proof() -> tuple[bytes, bytes]:
    """A proof and its root, made once (hypothesis reruns the test many times)."""
    with tempfile.TemporaryDirectory() as folder:
        return _proof(Path(folder))


PROOF, PROOF_ROOT = _module_proof()


@given(mutations(PROOF))
def test_mutated_proofs_raise_only_decode_errors(raw: bytes) -> None:
    try:
        verify_proof(raw, PROOF_ROOT)
    except DecodeError:
        return
    assert raw == PROOF


def test_export_csv(tmp_path: Path) -> None:
    raws = [
        make_receipt(finished_ms=IN_EPOCH + 5),
        make_receipt(finished_ms=IN_EPOCH, model='=HYPERLINK("x")'),
    ]
    with open_ledger(tmp_path) as ledger:
        ledger.ingest_many(raws)
        out = io.StringIO()
        assert ledger.export_csv(out) == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == [
        "id",
        "epoch",
        "status",
        "node",
        "client",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "price_in",
        "price_out",
        "amount",
        "started_ms",
        "finished_ms",
    ]
    by_id = {row["id"]: row for row in rows}
    for raw in raws:
        body = decode_receipt(raw).body
        row = by_id[body.id.hex()]
        assert row["node"] == str(NODE.peer_id) and row["client"] == CLIENT.public_key.data.hex()
        assert int(row["amount"]) == body.amount and int(row["epoch"]) == EPOCH
        assert int(row["finished_ms"]) == body.finished_ms
    models = sorted(row["model"] for row in rows)
    assert models == ['\'=HYPERLINK("x")', MODEL]


def test_open_sets_wal_and_full_sync_and_keeps_the_epoch_length(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "ledger.sqlite3"
    with Ledger.open(path, epoch_seconds=600) as ledger:
        assert ledger.epoch_seconds == 600
        assert ledger._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with Ledger.open(path) as ledger:
        assert ledger.epoch_seconds == 600
    with pytest.raises(LedgerError, match="600-second epochs, not 3600"):
        Ledger.open(path, epoch_seconds=3600)
    for bad in (0, -5, 10**9):
        with pytest.raises(ValueError, match="epoch length"):
            Ledger.open(path, epoch_seconds=bad)
    for share in ((101, 100), (1, 0), (-1, 100)):
        with pytest.raises(ValueError, match="operator share"):
            Ledger.open(path, operator_share=share)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database, just text" * 100)
    with pytest.raises(LedgerError, match="cannot use the ledger"):
        Ledger.open(junk)


def test_large_batches_verify_in_parallel_and_keep_order(tmp_path: Path) -> None:
    good = [make_receipt(finished_ms=IN_EPOCH + i) for i in range(PARALLEL_MIN)]
    bad = sign_both(body_for(client=OTHER), client=CLIENT)
    batch = [*good[:10], bad, *good[10:], bad, good[0]]
    for threads in (1, 3):
        with Ledger.open(tmp_path / f"{threads}.sqlite3", verify_threads=threads) as ledger:
            results = ledger.ingest_many(batch)
        outcomes = [r.outcome for r in results]
        assert outcomes[10] is outcomes[-2] is Outcome.FORGED
        assert outcomes[-1] is Outcome.DUPLICATE
        assert outcomes.count(Outcome.PAID) == PARALLEL_MIN
    with pytest.raises(ValueError, match="verify_threads"):
        Ledger.open(tmp_path / "0.sqlite3", verify_threads=0)


def test_two_writers_on_one_file_store_each_receipt_once(tmp_path: Path) -> None:
    raws = [make_receipt(finished_ms=IN_EPOCH + i) for i in range(200)]
    path = tmp_path / "shared.sqlite3"
    Ledger.open(path).close()
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        order = raws[:]
        random.Random(seed).shuffle(order)
        with Ledger.open(path) as ledger:
            for start in range(0, len(order), 25):
                results = ledger.ingest_many(order[start : start + 25])
                with lock:
                    outcomes.extend(r.outcome for r in results)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(Outcome.PAID) == 200
    assert outcomes.count(Outcome.DUPLICATE) == 400
    with Ledger.open(path) as ledger:
        summary = ledger.summary()
    assert summary.paid == 200 and summary.rejections["duplicate"] == 400


def test_a_row_removed_during_a_batch_is_verified_before_it_is_stored_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = make_receipt(finished_ms=IN_EPOCH)
    forged = sign_both(body_for(node=OTHER, finished_ms=IN_EPOCH), node=NODE)
    with open_ledger(tmp_path) as ledger:
        ledger.ingest(honest)
        # Someone slips a forged row in by hand; the batch's first read sees both rows,
        # then both are deleted before the write transaction reads them again.
        receipt = decode_receipt(forged)
        ledger._db.execute(
            "INSERT INTO receipts SELECT ?, epoch, disputed, node, client, model,"
            " prompt_tokens, completion_tokens, price_in, price_out, amount, started_ms,"
            " finished_ms, ? FROM receipts",
            (receipt.body.id, forged),
        )
        read = ledger._stored

        def read_then_delete(ids: list[bytes]) -> dict[bytes, bytes]:
            found = read(ids)
            if len(found) == 2:
                ledger._db.execute("DELETE FROM receipts")
            return found

        monkeypatch.setattr(ledger, "_stored", read_then_delete)
        results = ledger.ingest_many([honest, forged])
    assert [r.outcome for r in results] == [Outcome.PAID, Outcome.FORGED]


def test_open_read_only_reads_a_ledger_and_never_writes_one(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    raw = make_receipt(finished_ms=IN_EPOCH)
    with Ledger.open(path, epoch_seconds=600) as ledger:
        ledger.ingest(raw)
        summary, payouts = ledger.summary(), ledger.payouts(ledger.epoch_of(IN_EPOCH))
    before = path.read_bytes()
    with Ledger.open_read_only(path) as reader:
        assert reader.epoch_seconds == 600
        assert reader.summary() == summary
        assert reader.payouts(reader.epoch_of(IN_EPOCH)) == payouts
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.ingest(make_receipt(finished_ms=IN_EPOCH + 1))
    assert path.read_bytes() == before


def test_open_read_only_refuses_what_is_not_a_ledger_and_leaves_it_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite3"
    db = sqlite3.connect(foreign)
    db.executescript("CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('ada');")
    db.close()
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database, just text" * 100)
    future = tmp_path / "future.sqlite3"
    Ledger.open(future).close()
    db = sqlite3.connect(future)
    db.execute("PRAGMA user_version = 2")
    db.close()
    for path in (foreign, empty, junk, future):
        before = path.read_bytes()
        with pytest.raises(LedgerError, match=f"{path} is not a dbloom ledger"):
            Ledger.open_read_only(path)
        assert path.read_bytes() == before
    missing = tmp_path / "missing.sqlite3"
    with pytest.raises(LedgerError, match=f"no ledger at {missing}"):
        Ledger.open_read_only(missing)
    assert not missing.exists()
