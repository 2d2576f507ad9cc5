"""`dev` evidence: claims signed by the peer identity alone.

It proves only that whoever holds the peer's key said these things, which is enough for
a local network of one's own machines and for tests, and nothing more. Clients refuse it
unless they allow dev, and show it as untrusted even then.
"""

from __future__ import annotations

from dbloom.p2p import KeyPair

from ._evidence import Claims, Evidence, claims_digest
from ._kinds import KindResult, VerifyContext
from ._refusal import Reason, Refusal

KIND = "dev"
SIGNATURE_DOMAIN = b"dbloom/attest-dev/v1\x00"


def dev_evidence(key: KeyPair, claims: Claims) -> Evidence:
    """Sign `claims` with the peer identity."""
    claims_bytes = claims.encode()
    signature = key.sign(SIGNATURE_DOMAIN + claims_digest(claims_bytes))
    return Evidence(kind=KIND, claims_bytes=claims_bytes, proof={"sig": signature})


class DevVerifier:
    """Checks the identity signature; never hardware-backed."""

    kind = KIND

    def verify(self, evidence: Evidence, ctx: VerifyContext) -> KindResult:
        proof = evidence.proof
        signature = proof.get("sig")
        if set(proof) != {"sig"} or not isinstance(signature, bytes) or len(signature) != 64:
            return _refuse(Refusal(Reason.MALFORMED, "dev proof must be {sig: 64 bytes}"))
        key = ctx.claims.peer_id.extract_public_key()
        if key is None or not key.verify(SIGNATURE_DOMAIN + ctx.claims_digest, signature):
            return _refuse(Refusal(Reason.BAD_SIGNATURE, "claims are not signed by the peer's key"))
        return KindResult(hardware_backed=False, hardware_id=None)


def _refuse(refusal: Refusal) -> KindResult:
    return KindResult(refusals=(refusal,), hardware_backed=False)
