"""The receipts layer's two figures, in one run: gossip delivery and ledger ingest.

Runs `bench/gossip.py` (delivery p50/p99 to all of 100 in-memory peers with 20 ms
one-way latency, virtual time) and then `bench/ledger_ingest.py` (receipts/s with both
signatures checked; target 5,000/s on 2 cores), each printing its own table.

    .venv/bin/python bench/ledger.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer peers and receipts.")
    args = parser.parse_args()
    gossip = ["--peers", "30", "--messages", "50"] if args.quick else []
    ingest = ["--receipts", "4000", "--repeats", "1"] if args.quick else []
    for script, extra in (("gossip.py", gossip), ("ledger_ingest.py", ingest)):
        print(f"== {script} {' '.join(extra)}".rstrip(), flush=True)
        subprocess.run([sys.executable, str(HERE / script), *extra], check=True)


if __name__ == "__main__":
    main()
