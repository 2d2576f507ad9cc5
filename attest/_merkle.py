"""RFC 9162 Merkle tree hashing and proofs: pure functions and an in-memory tree, no I/O.

Hashes follow RFC 6962 / RFC 9162 section 2.1.1 (SHA-256, leaf prefix 0x00, node prefix
0x01, split at the largest power of two smaller than the size), so any CT-style client
can check our proofs. Verification follows the algorithms of sections 2.1.3.2 and
2.1.4.2 step by step; two cases the RFC leaves open are defined here: a tree is
consistent with itself (empty proof, equal roots) and with the empty tree (empty proof).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof whose shape does not fit its leaf index and tree size."""


def leaf_hash(data: bytes) -> bytes:
    """The hash of one entry: SHA-256(0x00 ‖ data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an interior node: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than `n` (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only tree that keeps every complete subtree's hash.

    Every subtree the RFC's recursion visits is either complete and aligned (so it is
    stored) or the right edge of a larger one, so a root or a proof costs O(log n)
    hashes, whatever the tree size, and appending costs O(1) amortised.
    """

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        # _levels[k][i] is the hash of leaves [i·2^k, (i+1)·2^k).
        self._levels: list[list[bytes]] = [[]]
        for data in leaves:
            self.append(data)

    def __len__(self) -> int:
        return len(self._levels[0])

    def append(self, data: bytes) -> int:
        """Add one entry; returns its index."""
        index = len(self)
        node = leaf_hash(data)
        level = 0
        self._levels[0].append(node)
        while len(self._levels[level]) % 2 == 0:
            node = node_hash(self._levels[level][-2], node)
            level += 1
            if level == len(self._levels):
                self._levels.append([])
            self._levels[level].append(node)
        return index

    def root(self, size: int | None = None) -> bytes:
        """The root of the first `size` entries (default: all of them)."""
        size = len(self) if size is None else size
        self._check_size(size)
        return self._hash(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The audit path of entry `index` in the tree of the first `size` entries."""
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"index {index} is not in a tree of size {size}")
        path: list[bytes] = []
        start, n, m = 0, size, index
        while n > 1:
            k = _split(n)
            if m < k:
                path.append(self._hash(start + k, n - k))
                n = k
            else:
                path.append(self._complete(start, k))
                start, m, n = start + k, m - k, n - k
        path.reverse()
        return path

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The proof that the first `first` entries are a prefix of the first `second`."""
        self._check_size(second)
        if not 0 <= first <= second:
            raise ValueError(f"no consistency proof from size {first} to size {second}")
        if first in (0, second):
            return []
        proof: list[bytes] = []
        start, n, m, whole = 0, second, first, True
        while m != n:
            k = _split(n)
            if m <= k:
                proof.append(self._hash(start + k, n - k))
                n = k
            else:
                proof.append(self._complete(start, k))
                start, m, n, whole = start + k, m - k, n - k, False
        if not whole:
            proof.append(self._hash(start, m))
        proof.reverse()
        return proof

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= len(self):
            raise ValueError(f"size {size} is outside a tree of {len(self)} entries")

    def _complete(self, start: int, n: int) -> bytes:
        level = n.bit_length() - 1
        return self._levels[level][start >> level]

    def _hash(self, start: int, n: int) -> bytes:
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0:
            return self._complete(start, n)
        k = _split(n)
        return node_hash(self._complete(start, k), self._hash(start + k, n - k))


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root that `path` proves for the leaf hash `leaf` (RFC 9162 section 2.1.3.2).

    Raises `ProofError` when the path is too short or too long for `index` and `size`,
    which tells a malformed proof apart from one for another entry or another tree.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> bool:
    """Whether `path` proves leaf hash `leaf` at `index` in the tree of `size` with `root`."""
    try:
        return root_from_inclusion_proof(leaf, index, size, path) == root
    except ProofError:
        return False


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether `proof` shows the tree (`first`, `first_root`) is a prefix of the second one.

    RFC 9162 section 2.1.4.2 for 0 < first < second.
    """
    if not 0 <= first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    if not proof:
        return False
    path = [first_root, *proof] if first & (first - 1) == 0 else list(proof)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == first_root and sr == second_root and sn == 0
