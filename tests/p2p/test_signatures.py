"""Signature checks: remembered once valid, never fooled by the memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbloom.p2p import KeyPair, KeyType, PublicKey, _identity

ALICE = KeyPair.from_seed(b"\x01" * 32)
BOB = KeyPair.from_seed(b"\x02" * 32)


def test_a_valid_signature_verifies_again_from_memory() -> None:
    signature = ALICE.sign(b"hello")
    assert ALICE.public_key.verify(b"hello", signature)
    assert _identity._proof(1, ALICE.public_key.data, b"hello", signature) in _identity._verified
    assert ALICE.public_key.verify(b"hello", signature)


@settings(max_examples=100, deadline=None)
@given(message=st.binary(max_size=64), other=st.binary(max_size=64), cut=st.integers(0, 64))
def test_a_remembered_signature_vouches_for_nothing_else(
    message: bytes, other: bytes, cut: int
) -> None:
    signature = ALICE.sign(message)
    assert ALICE.public_key.verify(message, signature)
    if other != message:
        assert not ALICE.public_key.verify(other, signature)
    assert not BOB.public_key.verify(message, signature)
    # Moving bytes between the message and the signature must not match a remembered check.
    if message[:cut]:
        assert not ALICE.public_key.verify(message[cut:], message[:cut] + signature)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not ALICE.public_key.verify(message, flipped)


def test_wrong_types_are_refused_not_raised() -> None:
    key = ALICE.public_key
    assert not key.verify("text", ALICE.sign(b"text"))  # type: ignore[arg-type]
    assert not key.verify(b"text", None)  # type: ignore[arg-type]
    assert not PublicKey(KeyType.ED25519, b"short").verify(b"x", b"\x00" * 64)


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_identity, "VERIFIED_CACHE_SIZE", 3)
    monkeypatch.setattr(_identity, "_verified", {})
    messages = [b"m%d" % i for i in range(5)]
    for message in messages:
        assert ALICE.public_key.verify(message, ALICE.sign(message))
    assert len(_identity._verified) == 3
    first = _identity._proof(1, ALICE.public_key.data, messages[0], ALICE.sign(messages[0]))
    assert first not in _identity._verified
    assert ALICE.public_key.verify(messages[0], ALICE.sign(messages[0]))  # checked afresh
