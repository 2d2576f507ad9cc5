"""Helpers shared by the attestation tests (a uniquely named module: tests/ is no package)."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace

from dbloom.attest import Claims, Posture, Verdict, default_verifiers, verify_evidence
from dbloom.attest._dev import dev_evidence
from dbloom.attest._policy import Policy
from dbloom.p2p import KeyPair, PeerId

MEASUREMENT = bytes(range(32))


def make_claims(key: KeyPair, nonce: bytes, **changes: object) -> Claims:
    claims = Claims(
        peer_id=key.peer_id,
        measurement=MEASUREMENT,
        nonce=nonce,
        issued_at_ms=int(time.time() * 1000),
        models={"tiny": b"\x11" * 32},
        posture=Posture(sip=True, secure_boot=None, debugger_denied=True, core_dumps_off=True),
    )
    return replace(claims, **changes)  # type: ignore[arg-type]


def dev_raw(key: KeyPair, nonce: bytes, **changes: object) -> bytes:
    return dev_evidence(key, make_claims(key, nonce, **changes)).encode()


def judge(
    raw: bytes, peer: PeerId, nonce: bytes, policy: Policy | None = None, now: float | None = None
) -> Verdict:
    return verify_evidence(
        raw,
        policy=policy or Policy().with_dev(),
        peer=peer,
        nonce=nonce,
        verifiers=default_verifiers(),
        now=now,
    )


def fresh_nonce() -> bytes:
    return secrets.token_bytes(32)
