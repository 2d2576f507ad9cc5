"""The payout ledger: verified receipts in one SQLite file, summed into payouts per epoch.

Durability: the file is in WAL mode with `synchronous=FULL`, so every commit fsyncs the
write-ahead log before it returns. A receipt is acknowledged (its `IngestResult` is
returned) only after the commit of its batch, and from then on it survives a killed
process, an OS crash and a power cut alike. `synchronous=NORMAL` would skip that fsync:
still safe against a killed process (the OS holds the written pages), but a power cut
could roll back the last commits, so "acknowledged" would no longer mean "durable". One
fsync per batch is the whole price, so callers batch (`ingest_many`). SQLite checkpoints
the log into the main file by itself (syncing it first); a crash mid-checkpoint is
recovered on open. A new file's folder entry is synced once, when it is created.

Receipts are deduplicated by request id: the same bytes again are a `duplicate` (a
no-op, not even re-verified), other bytes under a known id are `replayed` and refused.
Rejections are counted by kind in the same transactions, so the counts are as durable
as the receipts. Disputed receipts are stored and reported, never paid.

Sums: SQLite integers are 64-bit and `SUM` raises on overflow, while one receipt's
amount may come close to 2^63, so the high and low 32 bits of amounts are summed apart
and joined in Python: exact for any sum of fewer than 2^31 receipts.
"""

from __future__ import annotations

import bisect
import csv
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from dbloom.attest import _merkle
from dbloom.p2p import PeerId

from ._epochs import EpochProof, check_epoch_seconds, check_share, epoch_of, split_payout
from ._receipt import Receipt, ReceiptError, decode_receipt, verify_receipt

SCHEMA_VERSION = 1
DEFAULT_EPOCH_SECONDS = 3600
DEFAULT_OPERATOR_SHARE = (95, 100)
BUSY_TIMEOUT = 30.0
VERIFY_THREADS = os.cpu_count() or 1
PARALLEL_MIN = 64
REJECTION_KINDS = ("malformed", "forged", "inflated", "replayed", "duplicate")
CSV_COLUMNS = (
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
)
_ID_CHUNK = 500
_SUM = "SUM(amount >> 32), SUM(amount & 4294967295)"
_SCHEMA = (
    """CREATE TABLE receipts (
        id BLOB NOT NULL UNIQUE,
        epoch INTEGER NOT NULL,
        disputed INTEGER NOT NULL,
        node BLOB NOT NULL,
        client BLOB NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        price_in INTEGER NOT NULL,
        price_out INTEGER NOT NULL,
        amount INTEGER NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER NOT NULL,
        raw BLOB NOT NULL
    )""",
    "CREATE INDEX receipts_by_epoch ON receipts (epoch, disputed, id)",
    "CREATE TABLE rejections (kind TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "CREATE TABLE settings (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_TABLES = frozenset({"receipts", "rejections", "settings"})
_INSERT = (
    "INSERT INTO receipts (id, epoch, disputed, node, client, model, prompt_tokens,"
    " completion_tokens, price_in, price_out, amount, started_ms, finished_ms, raw)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COUNT = (
    "INSERT INTO rejections (kind, count) VALUES (?, ?)"
    " ON CONFLICT (kind) DO UPDATE SET count = count + excluded.count"
)


class LedgerError(Exception):
    """The ledger file is unusable, or holds no such receipt."""


class Outcome(StrEnum):
    """What ingesting one receipt did: stored it (paid or disputed) or why not."""

    PAID = "paid"
    DISPUTED = "disputed"
    DUPLICATE = "duplicate"
    REPLAYED = "replayed"
    MALFORMED = "malformed"
    FORGED = "forged"
    INFLATED = "inflated"


@dataclass(frozen=True, slots=True)
class IngestResult:
    """One receipt's outcome; `receipt_id` is None when the bytes did not decode."""

    outcome: Outcome
    receipt_id: bytes | None
    detail: str = ""

    @property
    def added(self) -> bool:
        """Whether this call stored the receipt (what a gossip layer passes on)."""
        return self.outcome in (Outcome.PAID, Outcome.DISPUTED)


@dataclass(frozen=True, slots=True)
class Summary:
    """Totals over the whole ledger; `rejections` has every kind, zeros included."""

    receipts: int
    paid: int
    paid_amount: int
    disputed: int
    rejections: dict[str, int]
    first_epoch: int | None
    last_epoch: int | None


@dataclass(frozen=True, slots=True)
class OperatorPayout:
    """An operator's paid receipts in an epoch and their split (see `split_payout`)."""

    node: PeerId
    receipts: int
    total: int
    operator: int
    network: int


@dataclass(frozen=True, slots=True)
class ClientTotal:
    """What one client account owes for an epoch."""

    client: bytes
    receipts: int
    total: int


@dataclass(frozen=True, slots=True)
class Payouts:
    """An epoch's settlement: per operator and per client, in exact micro-units.

    `total == operator_total + network_total ==` the sum of the client totals.
    """

    epoch: int
    operators: tuple[OperatorPayout, ...]
    clients: tuple[ClientTotal, ...]
    total: int
    operator_total: int
    network_total: int


class Ledger:
    """Verified receipts in a SQLite file; thread-safe (one lock around the connection)."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        epoch_seconds: int,
        share: tuple[int, int],
        verify_threads: int,
    ) -> None:
        """Use `Ledger.open`."""
        self._db = connection
        self._lock = threading.Lock()
        self._threads = verify_threads
        self._pool = ThreadPoolExecutor(verify_threads, thread_name_prefix="ledger-verify")
        self.epoch_seconds = epoch_seconds
        self.operator_share = share

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        epoch_seconds: int | None = None,
        operator_share: tuple[int, int] = DEFAULT_OPERATOR_SHARE,
        verify_threads: int = VERIFY_THREADS,
    ) -> Ledger:
        """Open the ledger file at `path`, creating it (and its folder) on first use.

        The epoch length is fixed when the file is created (`DEFAULT_EPOCH_SECONDS`
        unless given); opening it with another one is refused, since stored receipts
        are filed by epoch. The operator share only affects `payouts`. Large batches are
        verified on `verify_threads` threads (a peer busy serving models may want fewer).
        """
        share = check_share(operator_share)
        if type(verify_threads) is not int or verify_threads < 1:
            raise ValueError("verify_threads must be a positive integer")
        if epoch_seconds is not None:
            check_epoch_seconds(epoch_seconds)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        try:
            db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {path}: {e}") from None
        try:
            stored = _prepare(db, path, epoch_seconds or DEFAULT_EPOCH_SECONDS)
        except BaseException as e:
            db.close()
            if isinstance(e, sqlite3.Error):
                raise LedgerError(f"cannot use the ledger {path}: {e}") from None
            raise
        if created:
            _sync_folder(path.parent)
        ledger = cls(db, stored, share, verify_threads)
        if epoch_seconds is not None and stored != epoch_seconds:
            ledger.close()
            raise LedgerError(f"the ledger {path} uses {stored}-second epochs, not {epoch_seconds}")
        return ledger

    @classmethod
    def open_read_only(cls, path: Path) -> Ledger:
        """Open an existing ledger to read it, never creating, migrating or writing the file.

        For commands that only report: a mistyped path must not turn someone else's
        SQLite file (or an empty one) into a ledger, and a ledger the user may only read
        must still be readable. Ingesting through it fails.
        """
        if not path.is_file():
            raise LedgerError(f"no ledger at {path}")
        try:
            db = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {path}: {e}") from None
        try:
            stored = _check_ledger(db, path)
        except BaseException as e:
            db.close()
            if isinstance(e, sqlite3.OperationalError):
                raise LedgerError(f"cannot read the ledger {path}: {e}") from None
            if isinstance(e, sqlite3.Error):
                raise LedgerError(f"{path} is not a dbloom ledger: {e}") from None
            raise
        return cls(db, stored, DEFAULT_OPERATOR_SHARE, 1)

    def close(self) -> None:
        """Close the file; committed receipts are already durable."""
        self._pool.shutdown()
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def epoch_of(self, finished_ms: int) -> int:
        """The epoch a receipt finished at `finished_ms` belongs to in this ledger."""
        return epoch_of(finished_ms, self.epoch_seconds)

    def ingest(self, raw: bytes) -> IngestResult:
        """Verify and store one receipt; acknowledged (and durable) once this returns."""
        return self.ingest_many([raw])[0]

    def ingest_many(
        self, raws: Iterable[bytes], *, verified: Container[bytes] = ()
    ) -> list[IngestResult]:
        """Verify and store a batch in one transaction; results in the order given.

        Nothing is acknowledged until the whole batch has committed. Signatures are
        checked outside the write transaction, so other writers wait only for the
        inserts; receipts already stored with the same bytes are not verified again,
        nor are those in `verified` (bytes this process has just run `verify_receipt` on,
        e.g. as the gossip validator).
        """
        batch = [(raw, _decoded(raw)) for raw in raws]
        ids = [item.body.id for _, item in batch if isinstance(item, Receipt)]
        with self._lock:
            known = self._stored(ids)
        unverified = {
            raw: item
            for raw, item in batch
            if isinstance(item, Receipt) and known.get(item.body.id) != raw and raw not in verified
        }
        verdicts = dict(zip(unverified, self._verify_all(list(unverified.values())), strict=True))
        verdicts.update((raw, None) for raw, _ in batch if raw in verified)
        with self._lock, _transaction(self._db):
            stored = self._stored(ids)
            rows: list[tuple[Any, ...]] = []
            results = [self._classify(raw, item, stored, verdicts, rows) for raw, item in batch]
            rejected = Counter(result.outcome.value for result in results if not result.added)
            self._db.executemany(_INSERT, rows)
            self._db.executemany(_COUNT, rejected.items())
        return results

    def _verify_all(self, receipts: list[Receipt]) -> list[ReceiptError | None]:
        """`verify_receipt`'s verdicts, on all cores for a batch (libsodium frees the GIL)."""
        if len(receipts) < PARALLEL_MIN or self._threads == 1:
            return _verdicts(receipts)
        step = -(-len(receipts) // self._threads)
        chunks = [receipts[start : start + step] for start in range(0, len(receipts), step)]
        return [verdict for part in self._pool.map(_verdicts, chunks) for verdict in part]

    def _classify(
        self,
        raw: bytes,
        item: Receipt | ReceiptError,
        stored: dict[bytes, bytes],
        verdicts: dict[bytes, ReceiptError | None],
        rows: list[tuple[Any, ...]],
    ) -> IngestResult:
        """One receipt's outcome; queues the row to insert when it is new and valid."""
        if isinstance(item, ReceiptError):
            return IngestResult(Outcome(item.kind), None, str(item))
        body = item.body
        prior = stored.get(body.id)
        if prior == raw:
            return IngestResult(Outcome.DUPLICATE, body.id)
        # Unverified only if it was stored when the batch began, and since removed by hand.
        error = verdicts[raw] if raw in verdicts else _verdicts([item])[0]
        if error is not None:
            return IngestResult(Outcome(error.kind), body.id, str(error))
        if prior is not None:
            return IngestResult(
                Outcome.REPLAYED, body.id, "another receipt with this request id is stored"
            )
        stored[body.id] = raw
        rows.append(
            (
                body.id,
                self.epoch_of(body.finished_ms),
                int(not item.paid),
                body.node,
                body.client,
                body.model,
                body.prompt_tokens,
                body.completion_tokens,
                body.price_in,
                body.price_out,
                body.amount,
                body.started_ms,
                body.finished_ms,
                raw,
            )
        )
        return IngestResult(Outcome.PAID if item.paid else Outcome.DISPUTED, body.id)

    def summary(self) -> Summary:
        """Receipts stored, paid and disputed, the paid amount, rejections by kind."""
        with self._lock, _transaction(self._db, "DEFERRED"):
            totals = {
                disputed: (count, _join(high, low))
                for disputed, count, high, low in self._db.execute(
                    f"SELECT disputed, COUNT(*), {_SUM} FROM receipts GROUP BY disputed"
                )
            }
            first, last = self._db.execute("SELECT MIN(epoch), MAX(epoch) FROM receipts").fetchone()
            counted = dict(self._db.execute("SELECT kind, count FROM rejections").fetchall())
        paid, paid_amount = totals.get(0, (0, 0))
        disputed, _ = totals.get(1, (0, 0))
        return Summary(
            receipts=paid + disputed,
            paid=paid,
            paid_amount=paid_amount,
            disputed=disputed,
            rejections={kind: counted.get(kind, 0) for kind in REJECTION_KINDS},
            first_epoch=first,
            last_epoch=last,
        )

    def payouts(self, epoch: int) -> Payouts:
        """The settlement of `epoch`: its paid receipts per operator and per client."""
        where = "FROM receipts WHERE epoch = ? AND disputed = 0"
        with self._lock, _transaction(self._db, "DEFERRED"):
            by_node = self._db.execute(
                f"SELECT node, COUNT(*), {_SUM} {where} GROUP BY node ORDER BY node", (epoch,)
            ).fetchall()
            by_client = self._db.execute(
                f"SELECT client, COUNT(*), {_SUM} {where} GROUP BY client ORDER BY client",
                (epoch,),
            ).fetchall()
        operators = []
        for node, count, high, low in by_node:
            total = _join(high, low)
            operator, network = split_payout(total, self.operator_share)
            operators.append(OperatorPayout(PeerId(node), count, total, operator, network))
        clients = tuple(
            ClientTotal(client, count, _join(high, low)) for client, count, high, low in by_client
        )
        return Payouts(
            epoch=epoch,
            operators=tuple(operators),
            clients=clients,
            total=sum(o.total for o in operators),
            operator_total=sum(o.operator for o in operators),
            network_total=sum(o.network for o in operators),
        )

    def epoch_root(self, epoch: int) -> bytes:
        """The Merkle root of `epoch`'s paid receipts ordered by id (the empty root if none)."""
        root: bytes = _merkle.MerkleTree(raw for _, raw in self._paid_in(epoch)).root()
        return root

    def prove(self, receipt_id: bytes) -> bytes:
        """An encoded `EpochProof` that the paid receipt `receipt_id` is in its epoch's root."""
        with self._lock:
            row = self._db.execute(
                "SELECT epoch, disputed FROM receipts WHERE id = ?", (receipt_id,)
            ).fetchone()
        if row is None:
            raise LedgerError(f"no receipt with id {receipt_id.hex()} in the ledger")
        epoch, disputed = row
        if disputed:
            raise LedgerError(f"receipt {receipt_id.hex()} is disputed, so it is in no root")
        rows = self._paid_in(epoch)
        index = bisect.bisect_left(rows, receipt_id, key=lambda row: row[0])
        tree = _merkle.MerkleTree(raw for _, raw in rows)
        return EpochProof(
            epoch=epoch,
            epoch_seconds=self.epoch_seconds,
            index=index,
            size=len(tree),
            path=tuple(tree.inclusion_proof(index, len(tree))),
            root=tree.root(),
            receipt=rows[index][1],
        ).encode()

    def export_csv(self, file: TextIO) -> int:
        """Write every stored receipt as CSV (`CSV_COLUMNS`, by epoch then id); returns rows.

        A model name a spreadsheet would run as a formula gets a leading `'`.
        """
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        count = 0
        with self._lock:
            for row in self._db.execute(
                "SELECT id, epoch, disputed, node, client, model, prompt_tokens,"
                " completion_tokens, price_in, price_out, amount, started_ms, finished_ms"
                " FROM receipts ORDER BY epoch, id"
            ):
                rid, epoch, disputed, node, client, model, *numbers = row
                if model.startswith(("=", "+", "-", "@", "\t", "\r")):
                    model = "'" + model
                status = "disputed" if disputed else "ok"
                writer.writerow(
                    (rid.hex(), epoch, status, PeerId(node), client.hex(), model, *numbers)
                )
                count += 1
        return count

    def _paid_in(self, epoch: int) -> list[tuple[bytes, bytes]]:
        """(id, bytes) of the paid receipts of `epoch`, by id."""
        with self._lock:
            rows: list[tuple[bytes, bytes]] = self._db.execute(
                "SELECT id, raw FROM receipts WHERE epoch = ? AND disputed = 0 ORDER BY id",
                (epoch,),
            ).fetchall()
        return rows

    def _stored(self, ids: Iterable[bytes]) -> dict[bytes, bytes]:
        """The stored bytes of those of `ids` the ledger holds (the caller holds the lock)."""
        wanted = list(ids)
        found: dict[bytes, bytes] = {}
        for start in range(0, len(wanted), _ID_CHUNK):
            chunk = wanted[start : start + _ID_CHUNK]
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT id, raw FROM receipts WHERE id IN ({marks})"
            found.update(self._db.execute(query, chunk).fetchall())
        return found


def _decoded(raw: bytes) -> Receipt | ReceiptError:
    try:
        return decode_receipt(raw)
    except ReceiptError as e:
        return e


def _verdicts(receipts: list[Receipt]) -> list[ReceiptError | None]:
    """For each receipt, None if `verify_receipt` passes it, else its error."""
    verdicts: list[ReceiptError | None] = []
    for receipt in receipts:
        try:
            verify_receipt(receipt)
        except ReceiptError as e:
            verdicts.append(e)
        else:
            verdicts.append(None)
    return verdicts


def _join(high: int | None, low: int | None) -> int:
    return ((high or 0) << 32) + (low or 0)


def _prepare(db: sqlite3.Connection, path: Path, epoch_seconds: int) -> int:
    """Set WAL and full sync, create the schema on first use; returns the stored epoch length."""
    (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode != "wal":
        raise LedgerError(f"the ledger cannot use a write-ahead log (journal mode {mode})")
    db.execute("PRAGMA synchronous = FULL")
    with _transaction(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version == 0:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT INTO settings (name, value) VALUES ('epoch_seconds', ?)", (epoch_seconds,)
            )
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise LedgerError(f"ledger schema version {version} is not {SCHEMA_VERSION}")
        return _stored_epoch_seconds(db, path)


def _check_ledger(db: sqlite3.Connection, path: Path) -> int:
    """Check, without writing, that `db` holds a ledger; returns its stored epoch length."""
    with _transaction(db, "DEFERRED"):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            raise LedgerError(
                f"{path} is not a dbloom ledger (schema version {version}, not {SCHEMA_VERSION})"
            )
        tables = db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall()
        if missing := _TABLES - {name for (name,) in tables}:
            raise LedgerError(
                f"{path} is not a dbloom ledger (missing tables: {', '.join(sorted(missing))})"
            )
        return _stored_epoch_seconds(db, path)


def _stored_epoch_seconds(db: sqlite3.Connection, path: Path) -> int:
    """The epoch length fixed when the ledger was made; inside a transaction."""
    row = db.execute("SELECT value FROM settings WHERE name = 'epoch_seconds'").fetchone()
    if row is None or type(row[0]) is not int or row[0] < 1:
        raise LedgerError(f"the ledger {path} has lost its epoch length; it is corrupted")
    stored: int = row[0]
    return stored


def _sync_folder(folder: Path) -> None:
    """Make a new file's name in `folder` durable (SQLite syncs its WAL's name itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _transaction(db: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
    """A transaction, committed on success.

    IMMEDIATE takes the write lock at once; DEFERRED reads one consistent snapshot,
    whatever other writers of the file commit meanwhile.
    """
    db.execute(f"BEGIN {kind}")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
