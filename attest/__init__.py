"""Attestation: evidence, verifiers, policy and the /dbloom/attest protocol (issue 5)."""
