"""RFC 9162 Merkle hashing and proofs: the CT reference vectors, a naive model, and forgeries."""

from __future__ import annotations

import hashlib
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbloom.attest._merkle import (
    EMPTY_ROOT,
    MerkleTree,
    ProofError,
    leaf_hash,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

# The test data and expected values of the Certificate Transparency reference
# implementation's Merkle tree tests (RFC 6962), the de-facto interoperability vectors.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): CT_INCLUSION[0, 8],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}

LEAVES = tuple(i.to_bytes(2, "big") for i in range(64))
TREE = MerkleTree(LEAVES)


# The naive model: RFC 6962 section 2.1's recursive definitions, word for word.


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    k = 1
    while 2 * k < n:
        k *= 2
    return k


@cache
def mth(d: tuple[bytes, ...]) -> bytes:
    if not d:
        return _h(b"")
    if len(d) == 1:
        return _h(b"\x00" + d[0])
    k = _k(len(d))
    return _h(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: tuple[bytes, ...], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert MerkleTree().root() == EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_ct_roots() -> None:
    tree = MerkleTree()
    assert tree.root().hex() == CT_ROOTS[0]
    for n, data in enumerate(CT_LEAVES, start=1):
        assert tree.append(data) == n - 1
        assert tree.root().hex() == CT_ROOTS[n]
    assert [tree.root(n).hex() for n in range(9)] == CT_ROOTS


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_ct_inclusion_proofs(index: int, size: int) -> None:
    tree = MerkleTree(CT_LEAVES)
    proof = tree.inclusion_proof(index, size)
    assert [p.hex() for p in proof] == CT_INCLUSION[index, size]
    root = bytes.fromhex(CT_ROOTS[size])
    assert verify_inclusion(leaf_hash(CT_LEAVES[index]), index, size, proof, root)


@pytest.mark.parametrize(("first", "second"), sorted(CT_CONSISTENCY))
def test_ct_consistency_proofs(first: int, second: int) -> None:
    tree = MerkleTree(CT_LEAVES)
    proof = tree.consistency_proof(first, second)
    assert [p.hex() for p in proof] == CT_CONSISTENCY[first, second]
    roots = bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second])
    assert verify_consistency(first, second, *roots, proof)


def test_every_proof_up_to_64_leaves_matches_the_rfc_definitions() -> None:
    for n in range(1, 65):
        d = LEAVES[:n]
        root = TREE.root(n)
        assert root == mth(d) == MerkleTree(d).root()
        for m in range(n):
            proof = TREE.inclusion_proof(m, n)
            assert proof == path(m, d)
            assert verify_inclusion(leaf_hash(d[m]), m, n, proof, root)
        for m in range(1, n + 1):
            proof = TREE.consistency_proof(m, n)
            assert proof == subproof(m, d, True)
            assert verify_consistency(m, n, TREE.root(m), root, proof)


def test_hundred_thousand_leaves_stay_cheap() -> None:
    tree = MerkleTree(i.to_bytes(4, "big") for i in range(100_000))
    root = tree.root()
    for index in (0, 1, 65_535, 65_536, 99_999):
        proof = tree.inclusion_proof(index, len(tree))
        assert len(proof) <= 17
        assert verify_inclusion(leaf_hash(index.to_bytes(4, "big")), index, 100_000, proof, root)
    proof = tree.consistency_proof(77_777, 100_000)
    assert verify_consistency(77_777, 100_000, tree.root(77_777), root, proof)


def test_edge_cases_of_consistency() -> None:
    root5 = TREE.root(5)
    assert TREE.consistency_proof(0, 5) == []
    assert verify_consistency(0, 5, EMPTY_ROOT, root5, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, root5, [root5])
    assert not verify_consistency(0, 5, root5, root5, [])
    assert verify_consistency(5, 5, root5, root5, [])
    assert not verify_consistency(5, 5, root5, TREE.root(6), [])
    assert not verify_consistency(5, 5, root5, root5, [root5])
    assert not verify_consistency(6, 5, TREE.root(6), root5, TREE.consistency_proof(5, 6))
    assert not verify_consistency(3, 5, TREE.root(3), root5, [])


def test_out_of_range_requests_are_refused() -> None:
    tree = MerkleTree(LEAVES[:5])
    for size in (6, -1):
        with pytest.raises(ValueError, match="outside"):
            tree.root(size)
    with pytest.raises(ValueError, match="not in a tree"):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError, match="outside"):
        tree.inclusion_proof(0, 6)
    with pytest.raises(ValueError, match="no consistency proof"):
        tree.consistency_proof(4, 3)
    with pytest.raises(ValueError, match="outside"):
        tree.consistency_proof(1, 6)


def test_misshapen_inclusion_proofs_are_told_apart() -> None:
    proof = TREE.inclusion_proof(3, 10)
    leaf = leaf_hash(LEAVES[3])
    assert root_from_inclusion_proof(leaf, 3, 10, proof) == TREE.root(10)
    with pytest.raises(ProofError, match="not in a tree"):
        root_from_inclusion_proof(leaf, 10, 10, proof)
    with pytest.raises(ProofError, match="longer"):
        root_from_inclusion_proof(leaf, 3, 10, [*proof, proof[0]])
    with pytest.raises(ProofError, match="shorter"):
        root_from_inclusion_proof(leaf, 3, 10, proof[:-1])


sizes = st.integers(1, 64)


@st.composite
def entries(draw: st.DrawFn) -> tuple[int, int]:
    """An (index, size) pair of a tree of up to 64 leaves."""
    size = draw(sizes)
    return draw(st.integers(0, size - 1)), size


@st.composite
def prefixes(draw: st.DrawFn) -> tuple[int, int]:
    """A (first, second) pair with 0 < first < second ≤ 64."""
    second = draw(st.integers(2, 64))
    return draw(st.integers(1, second - 1)), second


def _flip(hashes: list[bytes], which: int, byte: int, bit: int) -> list[bytes]:
    out = list(hashes)
    target = out[which % len(out)]
    i = byte % len(target)
    out[which % len(out)] = target[:i] + bytes([target[i] ^ (1 << bit)]) + target[i + 1 :]
    return out


@given(entries(), st.integers(0, 100), st.integers(0, 31), st.integers(0, 7))
def test_any_flipped_bit_breaks_an_inclusion_proof(
    entry: tuple[int, int], which: int, byte: int, bit: int
) -> None:
    index, size = entry
    leaf, proof, root = leaf_hash(LEAVES[index]), TREE.inclusion_proof(index, size), TREE.root(size)
    [bad_leaf] = _flip([leaf], 0, byte, bit)
    [bad_root] = _flip([root], 0, byte, bit)
    assert not verify_inclusion(bad_leaf, index, size, proof, root)
    assert not verify_inclusion(leaf, index, size, proof, bad_root)
    if proof:
        assert not verify_inclusion(leaf, index, size, _flip(proof, which, byte, bit), root)
        assert not verify_inclusion(leaf, index, size, proof[:-1], root)
    assert not verify_inclusion(leaf, index, size, [*proof, root], root)


@given(entries(), entries())
def test_an_inclusion_proof_proves_only_its_own_entry(
    entry: tuple[int, int], other: tuple[int, int]
) -> None:
    index, size = entry
    leaf, proof, root = leaf_hash(LEAVES[index]), TREE.inclusion_proof(index, size), TREE.root(size)
    for wrong_index in {(index + 1) % size, (index - 1) % size} - {index}:
        assert not verify_inclusion(leaf, wrong_index, size, proof, root)
    # Against another entry's true leaf and root, it verifies only where both proofs coincide.
    o_index, o_size = other
    verified = verify_inclusion(
        leaf_hash(LEAVES[o_index]), o_index, o_size, proof, TREE.root(o_size)
    )
    assert verified == (TREE.inclusion_proof(o_index, o_size) == proof)


@given(prefixes(), st.integers(0, 100), st.integers(0, 31), st.integers(0, 7))
def test_any_flipped_bit_breaks_a_consistency_proof(
    pair: tuple[int, int], which: int, byte: int, bit: int
) -> None:
    first, second = pair
    proof = TREE.consistency_proof(first, second)
    roots = TREE.root(first), TREE.root(second)
    assert verify_consistency(first, second, *roots, proof)
    assert not verify_consistency(first, second, *roots, _flip(proof, which, byte, bit))
    assert not verify_consistency(
        first, second, _flip([roots[0]], 0, byte, bit)[0], roots[1], proof
    )
    assert not verify_consistency(
        first, second, roots[0], _flip([roots[1]], 0, byte, bit)[0], proof
    )
    assert not verify_consistency(first, second, *roots, proof[:-1])
    assert not verify_consistency(first, second, *roots, proof[1:])
    assert not verify_consistency(first, second, *roots, [*proof, roots[1]])


@given(prefixes(), prefixes())
def test_a_consistency_proof_holds_only_for_its_own_sizes(
    pair: tuple[int, int], other: tuple[int, int]
) -> None:
    proof = TREE.consistency_proof(*pair)
    first, second = other
    verified = verify_consistency(first, second, TREE.root(first), TREE.root(second), proof)
    assert verified == (TREE.consistency_proof(first, second) == proof)
