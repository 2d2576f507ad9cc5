"""Ledger benchmark: receipts ingested per second with every check (both signatures).

Builds `--receipts` receipts the way the network makes them (a node signs, its client
countersigns; 20 operators, 200 clients, 5% disputed), then measures, each the median
of `--repeats` runs on a fresh ledger file, the measures taken in turn in each round:

  verify only      decode and `verify_receipt` in one thread, no database: the CPU floor;
  ingest           `Ledger.ingest_many` in batches, committed (fsynced) once per batch,
                   signatures checked on one thread per CPU (and on one thread alone);
  re-ingest        the same receipts again: all duplicates, which skip verification;
  one at a time    `Ledger.ingest` per receipt (one commit each), on the first 1,000.

Target: ingest >= 5,000 receipts/s at batches of 1,000.

    .venv/bin/python bench/ledger_ingest.py [--receipts 20000] [--batch 100 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dbloom.ledger import (
    Ledger,
    Outcome,
    ReceiptBody,
    Terms,
    compute_amount,
    countersign,
    decode_node_receipt,
    decode_receipt,
    sign_as_node,
    tokens_digest,
    verify_receipt,
)
from dbloom.ledger._store import VERIFY_THREADS
from dbloom.p2p import KeyPair

TARGET = 5_000
MODEL = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
PRICE_IN, PRICE_OUT = 50_000, 200_000
START_MS = 1_700_000_000_000


def build(count: int, seed: int) -> list[bytes]:
    """`count` countersigned receipts over a day, from 20 operators to 200 clients."""
    rng = random.Random(seed)
    nodes = [KeyPair.from_seed(rng.randbytes(32)) for _ in range(20)]
    clients = [KeyPair.from_seed(rng.randbytes(32)) for _ in range(200)]
    raws = []
    for _ in range(count):
        node, client = rng.choice(nodes), rng.choice(clients)
        tokens = [rng.randrange(150_000) for _ in range(rng.randrange(1, 400))]
        prompt = rng.randrange(1, 8000)
        finished = START_MS + rng.randrange(86_400_000)
        body = ReceiptBody(
            id=rng.randbytes(16),
            node=node.peer_id.multihash,
            client=client.public_key.data,
            model=MODEL,
            prompt_tokens=prompt,
            completion_tokens=len(tokens),
            price_in=PRICE_IN,
            price_out=PRICE_OUT,
            amount=compute_amount(prompt, len(tokens), PRICE_IN, PRICE_OUT),
            started_ms=finished - rng.randrange(60_000),
            finished_ms=finished,
            tokens_digest=tokens_digest(tokens),
        )
        terms = Terms(
            id=body.id, node=node.peer_id, model=MODEL, price_in=PRICE_IN, price_out=PRICE_OUT
        )
        received = tokens[:-1] if rng.random() < 0.05 else tokens
        node_receipt = decode_node_receipt(sign_as_node(body, node))
        raws.append(countersign(node_receipt, client, received_tokens=received, terms=terms))
    return raws


def verify_only(raws: list[bytes]) -> float:
    start = time.perf_counter()
    for raw in raws:
        verify_receipt(decode_receipt(raw))
    return time.perf_counter() - start


def ingest(
    raws: list[bytes], batch: int, *, twice: bool = False, threads: int = VERIFY_THREADS
) -> float:
    """Seconds to ingest `raws` in batches into a fresh ledger (the second pass if `twice`)."""
    with (
        tempfile.TemporaryDirectory() as folder,
        Ledger.open(Path(folder) / "l.sqlite3", verify_threads=threads) as book,
    ):
        for attempt in range(2 if twice else 1):
            start = time.perf_counter()
            for first in range(0, len(raws), batch):
                results = book.ingest_many(raws[first : first + batch])
                expected = (Outcome.DUPLICATE,) if attempt else (Outcome.PAID, Outcome.DISPUTED)
                assert all(r.outcome in expected for r in results), results[0]
            seconds = time.perf_counter() - start
    return seconds


def one_at_a_time(raws: list[bytes]) -> float:
    with tempfile.TemporaryDirectory() as folder, Ledger.open(Path(folder) / "l.sqlite3") as book:
        start = time.perf_counter()
        for raw in raws:
            assert book.ingest(raw).added
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--receipts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    console = Console()
    start = time.perf_counter()
    raws = build(args.receipts, args.seed)
    console.print(
        f"built {len(raws):,} receipts in {time.perf_counter() - start:.1f} s "
        f"(mean {statistics.fmean(map(len, raws)):.0f} bytes); {os.cpu_count()} CPUs, "
        f"{VERIFY_THREADS} verify threads; medians of {args.repeats} runs"
    )
    few = raws[:1000]
    measures: list[tuple[str, int, str, Callable[[], float]]] = [
        ("verify only (1 thread, no database)", len(raws), "-", partial(verify_only, raws)),
        *(
            ("ingest, full checks", len(raws), f"{batch:,}", partial(ingest, raws, batch))
            for batch in args.batch
        ),
        ("ingest, 1 verify thread", len(raws), "1,000", partial(ingest, raws, 1000, threads=1)),
        ("re-ingest (all duplicates)", len(raws), "1,000", partial(ingest, raws, 1000, twice=True)),
        ("one at a time (a commit each)", len(few), "1", partial(one_at_a_time, few)),
    ]
    # Round robin, so load from other processes drifting during the run hits every measure.
    rates: list[list[float]] = [[] for _ in measures]
    for _ in range(args.repeats):
        for (_, count, _, run), samples in zip(measures, rates, strict=True):
            samples.append(count / run())
    table = Table("measure", "receipts", "batch", "receipts/s", "vs target")
    for (label, count, batch, _), samples in zip(measures, rates, strict=True):
        rate = statistics.median(samples)
        table.add_row(label, f"{count:,}", batch, f"{rate:,.0f}", f"{rate / TARGET:.2f}x")
    console.print(table)
    console.print(f"target: ingest >= {TARGET:,} receipts/s with full signature checks")


if __name__ == "__main__":
    main()
