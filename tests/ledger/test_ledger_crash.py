"""`kill -9` in the middle of ingesting loses no acknowledged receipt.

A child process ingests thousands of receipts in batches and prints `ack N` after each
commit; the test kills it with SIGKILL part way, reopens the ledger, and checks that
every acknowledged receipt is there exactly once and that ingesting everything again
gives exactly the totals the receipts add up to.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import msgpack
from test_receipt import NODE, OTHER, TOKENS, make_receipt

from dbloom.attest._merkle import MerkleTree
from dbloom.ledger import Ledger, Outcome, decode_receipt

RECEIPTS = 3000
BATCH = 100
HOUR_MS = 3_600_000
START_MS = 1_700_000_000_000

CHILD = """
import sys
from pathlib import Path

import msgpack

from dbloom.ledger import Ledger

ledger_path, receipts_path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
raws = msgpack.unpackb(Path(receipts_path).read_bytes())
with Ledger.open(Path(ledger_path)) as ledger:
    for start in range(0, len(raws), batch):
        ledger.ingest_many(raws[start : start + batch])
        print(f"ack {min(start + batch, len(raws))}", flush=True)
"""


def receipts(rng: random.Random) -> list[bytes]:
    """Paid receipts over three epochs and two operators, every tenth one disputed."""
    raws = []
    for i in range(RECEIPTS):
        finished = START_MS + rng.randrange(3 * HOUR_MS)
        raws.append(
            make_receipt(
                TOKENS,
                node=OTHER if i % 3 == 0 else NODE,
                received=TOKENS[:1] if i % 10 == 0 else None,
                finished_ms=finished,
                prompt_tokens=rng.randrange(1, 100_000),
            )
        )
    return raws


def test_kill_9_loses_no_acknowledged_receipt(tmp_path: Path) -> None:
    rng = random.Random(11)
    raws = receipts(rng)
    receipts_file = tmp_path / "receipts.msgpack"
    receipts_file.write_bytes(msgpack.packb(raws, use_bin_type=True))
    path = tmp_path / "ledger" / "ledger.sqlite3"
    kill_at = rng.randrange(RECEIPTS // 5, RECEIPTS // 2)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(receipts_file), str(BATCH)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acked = 0
    for line in child.stdout:
        acked = int(line.split()[1])
        if acked >= kill_at:
            child.send_signal(signal.SIGKILL)
            break
    # Lines already in the pipe were printed after their commits: acknowledged too.
    for line in child.stdout:
        acked = int(line.split()[1])
    assert child.wait() == -signal.SIGKILL
    assert kill_at <= acked < RECEIPTS, "the child was not killed part way"

    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()
    with Ledger.open(path) as ledger:
        stored = dict(ledger._db.execute("SELECT id, raw FROM receipts").fetchall())
        for raw in raws[:acked]:
            assert stored[decode_receipt(raw).body.id] == raw
        # At most the batch in flight committed without being acknowledged.
        assert acked <= len(stored) <= acked + BATCH
        again = ledger.ingest_many(raws)
        assert all(r.outcome is Outcome.DUPLICATE for r in again[:acked])
        assert sum(r.added for r in again) == RECEIPTS - len(stored)
        summary = ledger.summary()
        epochs = range(summary.first_epoch or 0, (summary.last_epoch or 0) + 1)
        roots = {epoch: ledger.epoch_root(epoch) for epoch in epochs}

    decoded = [decode_receipt(raw) for raw in raws]
    paid = [(r.body.id, raw) for r, raw in zip(decoded, raws, strict=True) if r.paid]
    assert summary.receipts == RECEIPTS
    assert summary.paid == len(paid) and summary.disputed == RECEIPTS // 10
    assert summary.paid_amount == sum(r.body.amount for r in decoded if r.paid)
    by_epoch: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    for receipt_id, raw in paid:
        by_epoch[decode_receipt(raw).body.finished_ms // HOUR_MS].append((receipt_id, raw))
    assert roots == {
        epoch: MerkleTree(raw for _, raw in sorted(by_epoch[epoch])).root() for epoch in epochs
    }
