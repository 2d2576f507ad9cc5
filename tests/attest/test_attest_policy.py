"""The policy judge on `dev` evidence: every common refusal, each named, none hidden."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from attest_helpers import MEASUREMENT, dev_raw, fresh_nonce, judge, make_claims
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st

from dbloom.attest import (
    Claims,
    Evidence,
    Policy,
    Posture,
    Reason,
    decode_claims,
    decode_evidence,
)
from dbloom.attest._dev import dev_evidence
from dbloom.attest._evidence import MAX_EVIDENCE
from dbloom.attest._tlog import TransparencyLog
from dbloom.p2p import KeyPair

KEY = KeyPair.from_seed(b"n" * 32)
NONCE = b"\x07" * 32


def test_dev_evidence_is_accepted_only_as_untrusted() -> None:
    verdict = judge(dev_raw(KEY, NONCE), KEY.peer_id, NONCE)
    assert verdict.accepted and not verdict.trusted, verdict
    assert "UNTRUSTED" in str(verdict)
    assert verdict.claims is not None and verdict.claims.models == {"tiny": b"\x11" * 32}


def test_dev_without_allow_dev_is_refused_with_a_hint() -> None:
    verdict = judge(dev_raw(KEY, NONCE), KEY.peer_id, NONCE, policy=Policy())
    assert verdict.reasons == {Reason.KIND_NOT_ALLOWED}
    assert "--allow-dev" in str(verdict)


def test_wrong_nonce_and_replay_are_refused() -> None:
    old = dev_raw(KEY, NONCE)
    assert judge(old, KEY.peer_id, fresh_nonce()).reasons == {Reason.NONCE_MISMATCH}


def test_evidence_for_another_peer_is_refused() -> None:
    other = KeyPair.generate()
    verdict = judge(dev_raw(KEY, NONCE), other.peer_id, NONCE)
    assert verdict.reasons == {Reason.PEER_MISMATCH}


def test_claims_naming_another_peer_fail_the_signature_too() -> None:
    other = KeyPair.generate()
    evidence = dev_evidence(KEY, make_claims(KEY, NONCE, peer_id=other.peer_id))
    verdict = judge(evidence.encode(), other.peer_id, NONCE)
    assert verdict.reasons == {Reason.BAD_SIGNATURE}


def test_stale_and_future_evidence_are_refused() -> None:
    now = time.time()
    assert judge(dev_raw(KEY, NONCE), KEY.peer_id, NONCE, now=now + 301).reasons == {Reason.STALE}
    assert judge(dev_raw(KEY, NONCE), KEY.peer_id, NONCE, now=now - 60).reasons == {
        Reason.FROM_FUTURE
    }


def test_posture_required_but_off_or_unknown() -> None:
    policy = replace(Policy().with_dev(), required_posture=frozenset({"sip", "secure_boot"}))
    off = Posture(sip=False, secure_boot=None, debugger_denied=True, core_dumps_off=True)
    verdict = judge(dev_raw(KEY, NONCE, posture=off), KEY.peer_id, NONCE, policy=policy)
    assert verdict.reasons == {Reason.POSTURE}
    text = str(verdict)
    assert "sip, node reports off" in text and "secure_boot, node reports unknown" in text


def test_every_reason_is_named_at_once() -> None:
    other = KeyPair.generate()
    verdict = judge(dev_raw(KEY, NONCE), other.peer_id, fresh_nonce(), policy=Policy())
    assert verdict.reasons == {Reason.KIND_NOT_ALLOWED, Reason.PEER_MISMATCH, Reason.NONCE_MISMATCH}


def test_tampered_claims_fail_the_signature() -> None:
    evidence = decode_evidence(dev_raw(KEY, NONCE))
    claims = decode_claims(evidence.claims_bytes)
    forged = replace(claims, measurement=b"\xee" * 32).encode()
    raw = replace(evidence, claims_bytes=forged).encode()
    assert judge(raw, KEY.peer_id, NONCE).reasons == {Reason.BAD_SIGNATURE}


def test_unknown_kind_and_malformed_proof() -> None:
    evidence = decode_evidence(dev_raw(KEY, NONCE))
    unknown = replace(evidence, kind="quantum").encode()
    assert judge(unknown, KEY.peer_id, NONCE).reasons == {
        Reason.UNKNOWN_KIND,
        Reason.KIND_NOT_ALLOWED,
    }
    bad_proof = replace(evidence, proof={"sig": b"short"}).encode()
    assert judge(bad_proof, KEY.peer_id, NONCE).reasons == {Reason.MALFORMED}


def test_garbage_truncated_and_oversized_evidence() -> None:
    raw = dev_raw(KEY, NONCE)
    assert judge(b"\xc1garbage", KEY.peer_id, NONCE).reasons == {Reason.MALFORMED}
    assert judge(raw[: len(raw) // 2], KEY.peer_id, NONCE).reasons == {Reason.MALFORMED}
    big = msgpack.packb({"v": 1, "pad": b"x" * MAX_EVIDENCE})
    assert judge(big, KEY.peer_id, NONCE).reasons == {Reason.OVERSIZED}
    with pytest.raises(Exception, match="above"):
        Evidence(kind="dev", claims_bytes=b"", proof={"pad": b"x" * MAX_EVIDENCE}).encode()


def test_claims_round_trip() -> None:
    claims = make_claims(KEY, NONCE)
    assert decode_claims(claims.encode()) == claims
    assert claims.encode() == decode_claims(claims.encode()).encode()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "version"),
        ({"extra": 1}, "unknown fields"),
        ({"nonce": b"short"}, "nonce"),
        ({"measurement": "hex"}, "measurement"),
        ({"issued_at": -1}, "issued_at"),
        ({"issued_at": 1.5}, "issued_at"),
        ({"peer": b"\x00"}, "peer"),
        ({"models": {"m": b"short"}}, "models"),
        ({"models": {"": b"x" * 32}}, "model id"),
        ({"posture": {"sip": True}}, "posture"),
        (
            {
                "posture": {
                    "sip": 1,
                    "secure_boot": None,
                    "debugger_denied": None,
                    "core_dumps_off": None,
                }
            },
            "posture",
        ),
    ],
)
def test_claims_decoder_names_the_bad_field(change: dict[str, object], match: str) -> None:
    body = msgpack.unpackb(make_claims(KEY, NONCE).encode())
    body.update(change)
    with pytest.raises(Exception, match=match):
        decode_claims(msgpack.packb(body))


VALID = dev_raw(KEY, NONCE)


@given(mutations(VALID))
def test_judge_never_raises_on_mutated_evidence(raw: bytes) -> None:
    verdict = judge(raw, KEY.peer_id, NONCE)
    assert verdict.accepted == (raw == VALID) or verdict.accepted


@given(mutations(make_claims(KEY, NONCE).encode()))
def test_claims_decoder_raises_only_decode_errors(raw: bytes) -> None:
    from dbloom.p2p import DecodeError

    with contextlib.suppress(DecodeError):
        assert isinstance(decode_claims(raw), Claims)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    )
)
def test_judge_never_raises_on_arbitrary_msgpack(value: object) -> None:
    raw = msgpack.packb(value)
    assert not judge(raw, KEY.peer_id, NONCE).accepted


def test_transparency_log_requirement(tmp_path: Path) -> None:
    log = TransparencyLog.init(tmp_path / "log")
    log.add(MEASUREMENT, note="dbloom 0.1.0")
    log.add(b"\x99" * 32)
    bundle = log.inclusion_bundle(MEASUREMENT).encode()
    policy = replace(Policy().with_dev(), log_keys=(log.public_key,))
    evidence = decode_evidence(dev_raw(KEY, NONCE))
    logged = replace(evidence, log=bundle).encode()
    assert judge(logged, KEY.peer_id, NONCE, policy=policy).accepted
    assert judge(evidence.encode(), KEY.peer_id, NONCE, policy=policy).reasons == {
        Reason.NOT_LOGGED
    }
    other = replace(evidence, log=log.inclusion_bundle(b"\x99" * 32).encode()).encode()
    assert Reason.NOT_LOGGED in judge(other, KEY.peer_id, NONCE, policy=policy).reasons
    wrong_key = replace(policy, log_keys=(KeyPair.generate().public_key.data,))
    assert Reason.BAD_LOG_SIGNATURE in judge(logged, KEY.peer_id, NONCE, policy=wrong_key).reasons
