"""Every evidence kind this build can verify."""

from __future__ import annotations

from ._appattest import AppAttestVerifier
from ._dev import DevVerifier
from ._kinds import Verifier
from ._mda import MdaVerifier
from ._tpm import TpmVerifier


def default_verifiers() -> dict[str, Verifier]:
    """One verifier per kind; the client's policy decides which kinds it accepts."""
    verifiers: list[Verifier] = [DevVerifier(), AppAttestVerifier(), MdaVerifier(), TpmVerifier()]
    return {v.kind: v for v in verifiers}
