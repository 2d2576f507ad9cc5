"""The contract between the policy and each evidence kind's verifier.

A verifier checks only what its kind proves: that the claims digest is bound to a key,
and that the key chains to a root the policy trusts. Nonce, peer id, age, posture and
the transparency log are checked once, for every kind, by `verify_evidence`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509

from ._evidence import Claims, Evidence
from ._refusal import Refusal


@dataclass(slots=True)
class VerifierState:
    """What a client remembers between verifications (App Attest keys and counters)."""

    app_attest_keys: dict[bytes, bytes] = field(default_factory=dict)
    app_attest_counters: dict[bytes, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VerifyContext:
    """Everything a kind's verifier may use, fixed by the client before verification."""

    claims: Claims
    claims_digest: bytes
    roots: Sequence[x509.Certificate]
    now: datetime
    state: VerifierState
    app_ids: frozenset[str] = frozenset()
    allow_development_aaguid: bool = False


@dataclass(frozen=True, slots=True)
class KindResult:
    """A verifier's answer: refusals (empty when the proof holds) and what hardware vouched."""

    refusals: tuple[Refusal, ...] = ()
    attested_posture: Mapping[str, bool] = field(default_factory=dict)
    hardware_id: str | None = None
    hardware_backed: bool = True


class Verifier(Protocol):
    """One evidence kind's proof checker; pure (no I/O), fast (in every cold request)."""

    kind: str

    def verify(self, evidence: Evidence, ctx: VerifyContext) -> KindResult: ...
