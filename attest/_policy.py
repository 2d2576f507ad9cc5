"""The client's policy and the one function that judges a node's evidence against it.

`verify_evidence` is pure and total: any bytes in, a `Verdict` out that names every
reason for refusal it found (not just the first), so an operator can fix them all at once.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cryptography import x509

from dbloom.p2p import LimitExceeded, PeerId

from ._errors import EvidenceDecodeError
from ._evidence import Claims, Evidence, Posture, claims_digest, decode_claims, decode_evidence
from ._kinds import KindResult, Verifier, VerifierState, VerifyContext
from ._refusal import Reason, Refusal

HARDWARE_KINDS = frozenset({"apple-app-attest", "apple-mda", "tpm2"})
DEFAULT_MAX_AGE = 300.0
MAX_CLOCK_SKEW = 30.0


@dataclass(frozen=True, slots=True)
class Policy:
    """What a client accepts. Defaults refuse `dev`; `allow_dev()` is for local networks."""

    allowed_kinds: frozenset[str] = HARDWARE_KINDS
    roots: Mapping[str, Sequence[x509.Certificate]] = field(default_factory=dict)
    log_keys: Sequence[bytes] = ()
    max_age: float = DEFAULT_MAX_AGE
    required_posture: frozenset[str] = frozenset()
    app_ids: frozenset[str] = frozenset()
    allow_development_aaguid: bool = False

    def with_dev(self) -> Policy:
        """The same policy that also accepts `dev` evidence (shown as untrusted)."""
        return replace(self, allowed_kinds=self.allowed_kinds | {"dev"})

    @property
    def requires_log(self) -> bool:
        return bool(self.log_keys)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one verification; refused whenever `refusals` is not empty."""

    kind: str | None
    refusals: tuple[Refusal, ...]
    claims: Claims | None = None
    posture: Posture | None = None
    hardware_backed: bool = False
    hardware_id: str | None = None
    verified_at: float = 0.0

    @property
    def accepted(self) -> bool:
        return not self.refusals

    @property
    def trusted(self) -> bool:
        """Accepted on hardware evidence; `dev` is never trusted even when accepted."""
        return self.accepted and self.hardware_backed

    @property
    def reasons(self) -> frozenset[Reason]:
        return frozenset(r.reason for r in self.refusals)

    def __str__(self) -> str:
        if self.accepted:
            trust = "trusted" if self.trusted else "UNTRUSTED"
            return f"accepted {self.kind} evidence ({trust})"
        return f"refused {self.kind or 'unreadable'} evidence: " + "; ".join(
            map(str, self.refusals)
        )


def verify_evidence(
    raw: bytes,
    *,
    policy: Policy,
    peer: PeerId,
    nonce: bytes,
    verifiers: Mapping[str, Verifier],
    state: VerifierState | None = None,
    now: float | None = None,
) -> Verdict:
    """Judge evidence bytes from `peer`, answering the client's `nonce`, against `policy`."""
    now = time.time() if now is None else now
    try:
        evidence = decode_evidence(raw)
    except LimitExceeded as e:
        return Verdict(None, (Refusal(Reason.OVERSIZED, str(e)),), verified_at=now)
    except EvidenceDecodeError as e:
        return Verdict(None, (Refusal(Reason.MALFORMED, str(e)),), verified_at=now)
    refusals: list[Refusal] = []
    verifier = verifiers.get(evidence.kind)
    if verifier is None:
        refusals.append(Refusal(Reason.UNKNOWN_KIND, f"no verifier for {evidence.kind!r}"))
    if evidence.kind not in policy.allowed_kinds:
        hint = " (pass --allow-dev to accept it, untrusted)" if evidence.kind == "dev" else ""
        refusals.append(
            Refusal(Reason.KIND_NOT_ALLOWED, f"policy does not allow {evidence.kind!r}{hint}")
        )
    try:
        claims = decode_claims(evidence.claims_bytes)
    except LimitExceeded as e:
        return Verdict(
            evidence.kind, (*refusals, Refusal(Reason.OVERSIZED, str(e))), verified_at=now
        )
    except EvidenceDecodeError as e:
        return Verdict(
            evidence.kind, (*refusals, Refusal(Reason.MALFORMED, str(e))), verified_at=now
        )
    refusals += _check_claims(claims, peer, nonce, now, policy)
    result = KindResult(hardware_backed=False)
    if verifier is not None:
        ctx = VerifyContext(
            claims=claims,
            claims_digest=claims_digest(evidence.claims_bytes),
            roots=tuple(policy.roots.get(evidence.kind, ())),
            now=datetime.fromtimestamp(now, UTC),
            state=state if state is not None else VerifierState(),
            app_ids=policy.app_ids,
            allow_development_aaguid=policy.allow_development_aaguid,
        )
        result = verifier.verify(evidence, ctx)
        refusals += result.refusals
    posture = claims.posture.merged(result.attested_posture)
    refusals += _check_posture(claims.posture, result.attested_posture, posture, policy)
    if policy.requires_log:
        refusals += _check_log(evidence, claims, policy)
    return Verdict(
        kind=evidence.kind,
        refusals=tuple(refusals),
        claims=claims,
        posture=posture,
        hardware_backed=result.hardware_backed,
        hardware_id=result.hardware_id,
        verified_at=now,
    )


def _check_claims(
    claims: Claims, peer: PeerId, nonce: bytes, now: float, policy: Policy
) -> list[Refusal]:
    refusals = []
    if claims.peer_id != peer:
        refusals.append(
            Refusal(
                Reason.PEER_MISMATCH,
                f"claims name {claims.peer_id.short()}, the channel is {peer.short()}",
            )
        )
    if not hmac.compare_digest(claims.nonce, nonce):
        refusals.append(Refusal(Reason.NONCE_MISMATCH, "claims do not carry this request's nonce"))
    age = now - claims.issued_at_ms / 1000
    if age > policy.max_age:
        refusals.append(
            Refusal(Reason.STALE, f"issued {age:.0f} s ago, policy allows {policy.max_age:.0f} s")
        )
    elif age < -MAX_CLOCK_SKEW:
        refusals.append(Refusal(Reason.FROM_FUTURE, f"issued {-age:.0f} s in the future"))
    return refusals


def _check_posture(
    claimed: Posture, attested: Mapping[str, bool], effective: Posture, policy: Policy
) -> list[Refusal]:
    refusals = []
    for key, value in attested.items():
        said = getattr(claimed, key, None)
        if said is not None and said != value:
            refusals.append(
                Refusal(
                    Reason.POSTURE_MISMATCH,
                    f"node claims {key}={said} but its hardware attests {key}={value}",
                )
            )
    for key in sorted(policy.required_posture):
        required: bool | None = getattr(effective, key, None)
        if required is not True:
            state = "unknown" if required is None else "off"
            refusals.append(Refusal(Reason.POSTURE, f"policy requires {key}, node reports {state}"))
    return refusals


def _check_log(evidence: Evidence, claims: Claims, policy: Policy) -> list[Refusal]:
    from ._tlog import check_log_proof

    if evidence.log is None:
        return [
            Refusal(
                Reason.NOT_LOGGED,
                "policy requires the measurement in a transparency log; no inclusion proof sent",
            )
        ]
    refusals: list[Refusal] = check_log_proof(evidence.log, claims.measurement, policy.log_keys)
    return refusals
