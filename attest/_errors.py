"""Errors of the attestation layer.

`EvidenceDecodeError` is the only exception a decoder of untrusted evidence bytes raises;
the verifier turns it into a refusal, never into a crash.
"""

from __future__ import annotations

from dbloom.p2p import DecodeError


class EvidenceDecodeError(DecodeError):
    """Evidence bytes that are not a well-formed, size-capped evidence message."""


class AttestationError(Exception):
    """A node could not produce evidence, or a client could not obtain it."""


class AttestationRefused(AttestationError):
    """The client's policy refused the node's evidence; no prompt was sent."""

    def __init__(self, verdict: object) -> None:
        super().__init__(str(verdict))
        self.verdict = verdict
