"""Verification time per evidence kind: it sits in every cold request's path.

Evidence is synthetic (certificate chains under a test root, built with the same fixtures
the tests use), verification is the production code. Each row times the kind's verifier
alone and the whole judge (`verify_evidence`: decode, claims, verifier, posture, log)
where the kind's fixtures make that possible at today's date. Target: 5 ms per kind.

    .venv/bin/python bench/attest.py [--runs 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "attest")]

import apple_fixtures as apple
from attest_helpers import dev_raw, fresh_nonce
from cryptography.hazmat.primitives.asymmetric import ec
from test_tpm import make_case

from dbloom.attest import (
    Evidence,
    Policy,
    VerifierState,
    default_verifiers,
    verify_evidence,
)
from dbloom.attest._appattest import KIND as APP_ATTEST
from dbloom.attest._appattest import AppAttestVerifier
from dbloom.attest._mda import KIND as MDA
from dbloom.attest._mda import MdaVerifier, mda_nonce
from dbloom.attest._tpm import TpmVerifier
from dbloom.p2p import KeyPair

TARGET_MS = 5.0


def timed(fn: Callable[[], object], runs: int) -> float:
    """Median milliseconds per call after a warm-up."""
    for _ in range(min(20, runs)):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def cases() -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    key, nonce = KeyPair.generate(), fresh_nonce()
    raw = dev_raw(key, nonce)
    verifiers = default_verifiers()
    dev_policy = Policy().with_dev()
    out["dev (whole judge)"] = lambda: verify_evidence(
        raw, policy=dev_policy, peer=key.peer_id, nonce=nonce, verifiers=verifiers
    )

    ca = apple.make_ca()
    device = ec.generate_private_key(ec.SECP256R1())
    claims = apple.make_claims()
    ctx = apple.make_ctx(claims, (ca.root,))
    attestation = {
        "attestation": apple.Attestation().build(ca, device, ctx.claims_digest),
        "key_id": apple.key_id_of(device),
    }
    evidence = Evidence(APP_ATTEST, claims.encode(), attestation)
    out["apple-app-attest attestation"] = lambda: AppAttestVerifier().verify(evidence, ctx)

    state = VerifierState()
    primed = apple.make_ctx(claims, (ca.root,), state=state)
    AppAttestVerifier().verify(evidence, primed)
    counter = iter(range(1, 1 << 30))

    def assertion() -> object:
        proof = {
            "assertion": apple.assertion(device, primed.claims_digest, next(counter)),
            "key_id": apple.key_id_of(device),
        }
        return AppAttestVerifier().verify(Evidence(APP_ATTEST, claims.encode(), proof), primed)

    out["apple-app-attest assertion (incl. signing it)"] = assertion

    mda_proof = {
        "chain": apple.MdaLeaf().chain(ca, device, mda_nonce(apple.NODE_KEY.peer_id)),
        "mda_nonce": mda_nonce(apple.NODE_KEY.peer_id),
        "sig": apple.mda_sign(device, ctx.claims_digest),
    }
    mda = Evidence(MDA, claims.encode(), mda_proof)
    out["apple-mda"] = lambda: MdaVerifier().verify(mda, ctx)

    for scheme in ("ecdsa", "rsassa"):
        case = make_case(scheme)
        out[f"tpm2 {scheme}"] = lambda case=case: TpmVerifier().verify(case.evidence, case.ctx)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    print(f"{'evidence kind':48} {'median ms':>10} {'target':>8}  result")
    for name, fn in cases().items():
        ms = timed(fn, args.runs)
        verdict = "PASS" if ms <= TARGET_MS else "MISS"
        print(f"{name:48} {ms:10.3f} {TARGET_MS:>7.1f}  {verdict}")


if __name__ == "__main__":
    main()
