"""Epochs: the periods payouts are settled for, their Merkle roots, and inclusion proofs.

A receipt belongs to epoch `finished_ms // (epoch_seconds * 1000)`. An epoch's root is
the RFC 6962 Merkle root (`dbloom.attest._merkle`) over its paid receipts ordered by
receipt id, each leaf the receipt's canonical bytes, so two ledgers holding the same
receipts agree on the root whatever order the receipts arrived in. A proof lets anyone
holding only a root check that one receipt was counted. Pure functions, no I/O.

Wire form of a proof (msgpack, canonical, at most `MAX_PROOF` bytes, strictly decoded):

    EpochProof = {"v": 1, "epoch": int, "epoch_seconds": int, "index": int, "size": int,
                  "path": [bin[32], ...≤64], "root": bin[32], "receipt": bin}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from dbloom.attest import _merkle
from dbloom.p2p import DecodeError

from ._receipt import MAX_RECEIPT, MAX_TIMESTAMP_MS, Receipt, decode_receipt, verify_receipt

VERSION = 1
MAX_PATH = 64
MAX_PROOF = MAX_RECEIPT + MAX_PATH * (_merkle.HASH_SIZE + 2) + 256
MAX_EPOCH_SECONDS = 366 * 24 * 3600
_PROOF_FIELDS = frozenset(
    {"v", "epoch", "epoch_seconds", "index", "size", "path", "root", "receipt"}
)


class InvalidProof(DecodeError):
    """A proof that does not parse, is not self-consistent, or leads to another root."""


def check_epoch_seconds(epoch_seconds: int) -> None:
    """Refuse an epoch length that is not a whole number of seconds in [1, one year]."""
    if type(epoch_seconds) is not int or not 1 <= epoch_seconds <= MAX_EPOCH_SECONDS:
        raise ValueError(f"epoch length must be 1..{MAX_EPOCH_SECONDS} seconds")


def epoch_of(finished_ms: int, epoch_seconds: int) -> int:
    """The epoch of a receipt that finished at `finished_ms` (Unix milliseconds)."""
    return finished_ms // (epoch_seconds * 1000)


def split_payout(total: int, share: tuple[int, int]) -> tuple[int, int]:
    """An operator's epoch total split as (operator, network), nothing lost.

    The operator gets `total * numerator // denominator`, rounded down once per operator
    and epoch, and the network the rest, so the two always add up to `total` exactly.
    """
    numerator, denominator = share
    operator = total * numerator // denominator
    return operator, total - operator


def check_share(share: tuple[int, int]) -> tuple[int, int]:
    """`share` if it is a fraction (numerator, denominator) in [0, 1]."""
    numerator, denominator = share
    if type(numerator) is not int or type(denominator) is not int:
        raise ValueError("the operator share must be two integers")
    if not 0 <= numerator <= denominator or denominator == 0:
        raise ValueError(f"the operator share {numerator}/{denominator} is not in [0, 1]")
    return share


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochProof:
    """That `receipt` is leaf `index` of the `size` paid receipts of `epoch` with `root`."""

    epoch: int
    epoch_seconds: int
    index: int
    size: int
    path: tuple[bytes, ...]
    root: bytes
    receipt: bytes

    def encode(self) -> bytes:
        """Canonical msgpack (sorted keys)."""
        fields = {
            "epoch": self.epoch,
            "epoch_seconds": self.epoch_seconds,
            "index": self.index,
            "path": list(self.path),
            "receipt": self.receipt,
            "root": self.root,
            "size": self.size,
            "v": VERSION,
        }
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return packed


def decode_epoch_proof(raw: bytes) -> EpochProof:
    """Strictly decode a proof from untrusted bytes; raises only `InvalidProof`."""
    if not isinstance(raw, bytes):
        raise InvalidProof("proof must be bytes")
    if len(raw) > MAX_PROOF:
        raise InvalidProof(f"proof is {len(raw)} bytes, above {MAX_PROOF}")
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise InvalidProof(f"proof is not valid msgpack: {e}") from None
    if not isinstance(fields, dict) or fields.keys() != _PROOF_FIELDS:
        raise InvalidProof(f"proof must be a map of exactly {', '.join(sorted(_PROOF_FIELDS))}")
    if type(fields["v"]) is not int or fields["v"] != VERSION:
        raise InvalidProof(f"proof version {fields['v']!r} is not {VERSION}")
    path = fields["path"]
    if not isinstance(path, list) or len(path) > MAX_PATH:
        raise InvalidProof(f"proof path must be a list of at most {MAX_PATH} hashes")
    if not all(type(h) is bytes and len(h) == _merkle.HASH_SIZE for h in path):
        raise InvalidProof("proof path must hold 32-byte hashes")
    root, receipt = fields["root"], fields["receipt"]
    if type(root) is not bytes or len(root) != _merkle.HASH_SIZE:
        raise InvalidProof("proof root must be 32 bytes")
    if type(receipt) is not bytes:
        raise InvalidProof("proof receipt must be bytes")
    size = _int(fields, "size", 1, 1 << 63)
    proof = EpochProof(
        epoch=_int(fields, "epoch", 0, MAX_TIMESTAMP_MS),
        epoch_seconds=_int(fields, "epoch_seconds", 1, MAX_EPOCH_SECONDS + 1),
        index=_int(fields, "index", 0, size),
        size=size,
        path=tuple(path),
        root=root,
        receipt=receipt,
    )
    if proof.encode() != raw:
        raise InvalidProof("proof is not canonically encoded")
    return proof


def _int(fields: dict[str, Any], name: str, low: int, high: int) -> int:
    value = fields[name]
    if type(value) is not int or not low <= value < high:
        raise InvalidProof(f"proof {name} must be an integer in [{low}, {high})")
    return value


def verify_proof(raw: bytes, root: bytes | None = None) -> Receipt:
    """The receipt a proof proves was paid in its epoch, after checking everything.

    Checks the receipt's signatures and amount (`verify_receipt`), that it is paid and
    finished in the proof's epoch, that the audit path leads from its leaf to the
    proof's root and, when given, that this root is `root` (one obtained from a ledger
    one trusts). Raises `InvalidProof` or the receipt's `ReceiptError`.
    """
    proof = decode_epoch_proof(raw)
    receipt = decode_receipt(proof.receipt)
    verify_receipt(receipt)
    if not receipt.paid:
        raise InvalidProof("the receipt is disputed, and only paid receipts are in epoch roots")
    finished_in = epoch_of(receipt.body.finished_ms, proof.epoch_seconds)
    if finished_in != proof.epoch:
        raise InvalidProof(f"the receipt belongs to epoch {finished_in}, not {proof.epoch}")
    leaf = _merkle.leaf_hash(proof.receipt)
    try:
        computed = _merkle.root_from_inclusion_proof(leaf, proof.index, proof.size, proof.path)
    except _merkle.ProofError as e:
        raise InvalidProof(str(e)) from None
    if computed != proof.root:
        raise InvalidProof(
            f"the path does not lead from the receipt to the root (entry {proof.index} "
            f"of {proof.size})"
        )
    if root is not None and root != proof.root:
        raise InvalidProof(f"the proof is for root {proof.root.hex()}, not {root.hex()}")
    return receipt
