"""Why evidence was refused: one code per reason, so tests and users can tell them apart."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Every reason a client can refuse a node's evidence."""

    MALFORMED = "malformed-evidence"
    OVERSIZED = "oversized-evidence"
    UNKNOWN_KIND = "unknown-kind"
    KIND_NOT_ALLOWED = "kind-not-allowed"
    BAD_SIGNATURE = "bad-signature"
    WRONG_ROOT = "wrong-root"
    BAD_CHAIN = "bad-chain"
    CERT_EXPIRED = "cert-expired"
    CERT_NOT_YET_VALID = "cert-not-yet-valid"
    BINDING_MISMATCH = "binding-mismatch"
    APP_ID_MISMATCH = "app-id-mismatch"
    AAGUID_MISMATCH = "aaguid-mismatch"
    COUNTER = "counter-not-increasing"
    NONCE_MISMATCH = "nonce-mismatch"
    PEER_MISMATCH = "peer-mismatch"
    STALE = "stale-evidence"
    FROM_FUTURE = "evidence-from-future"
    NOT_LOGGED = "measurement-not-logged"
    BAD_LOG_SIGNATURE = "bad-log-signature"
    BAD_LOG_PROOF = "bad-log-proof"
    POSTURE = "posture-not-met"
    POSTURE_MISMATCH = "posture-mismatch"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One reason for refusal, with a human-readable detail."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"
