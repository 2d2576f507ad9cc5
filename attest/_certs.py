"""X.509 chain checks shared by the Apple and TPM kinds.

We check the chain ourselves instead of using `cryptography.x509.verification`: that
builder enforces Web PKI rules (server/client EKUs, SANs) that attestation chains do not
follow. What an attestation chain needs is small: each certificate signed by the next,
every one inside its validity window at `now`, issuers marked as CAs, and the last one
issued by (or equal to) a pinned root.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from ._refusal import Reason, Refusal

MAX_CHAIN = 5


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, colon-free hex, as pinned next to embedded roots."""
    return cert.fingerprint(hashes.SHA256()).hex()


def load_der_chain(items: object, what: str) -> list[x509.Certificate] | Refusal:
    """Parse a list of DER certificates from untrusted proof data."""
    if not isinstance(items, list | tuple) or not 0 < len(items) <= MAX_CHAIN:
        return Refusal(Reason.MALFORMED, f"{what} must be a list of 1 to {MAX_CHAIN} certificates")
    chain = []
    for i, der in enumerate(items):
        if not isinstance(der, bytes):
            return Refusal(Reason.MALFORMED, f"{what}[{i}] is not bytes")
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except (ValueError, x509.InvalidVersion) as e:
            return Refusal(Reason.MALFORMED, f"{what}[{i}] is not a DER certificate: {e}")
    return chain


def _validity(cert: x509.Certificate, now: datetime, label: str) -> Refusal | None:
    if now < cert.not_valid_before_utc:
        return Refusal(
            Reason.CERT_NOT_YET_VALID,
            f"{label} is valid only from {cert.not_valid_before_utc.isoformat()}",
        )
    if now > cert.not_valid_after_utc:
        return Refusal(
            Reason.CERT_EXPIRED, f"{label} expired on {cert.not_valid_after_utc.isoformat()}"
        )
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def verify_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: datetime
) -> list[Refusal]:
    """Refusals for a leaf-first chain against pinned roots; empty when it holds.

    `cryptography` parses names and extensions lazily, so a hostile certificate can fail
    only when a field is read: any such failure is a malformed chain, never an exception.
    """
    try:
        return _verify_chain(chain, roots, now)
    except (ValueError, TypeError, x509.InvalidVersion) as e:
        return [Refusal(Reason.MALFORMED, f"a certificate in the chain is unreadable: {e}")]


def _verify_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: datetime
) -> list[Refusal]:
    refusals: list[Refusal] = []
    if not roots:
        return [Refusal(Reason.WRONG_ROOT, "the policy trusts no root for this kind")]
    for i, cert in enumerate(chain):
        label = "leaf certificate" if i == 0 else f"certificate {i}"
        if problem := _validity(cert, now, label):
            refusals.append(problem)
        if i + 1 < len(chain):
            issuer = chain[i + 1]
            if not _is_ca(issuer):
                refusals.append(Refusal(Reason.BAD_CHAIN, f"certificate {i + 1} is not a CA"))
            if not _signed_by(cert, issuer):
                refusals.append(
                    Refusal(Reason.BAD_CHAIN, f"{label} is not signed by certificate {i + 1}")
                )
    top = chain[-1]
    pinned = {fingerprint(r): r for r in roots}
    if fingerprint(top) in pinned:
        return refusals
    for root in roots:
        if top.issuer == root.subject and _signed_by(top, root):
            if problem := _validity(root, now, "root certificate"):
                refusals.append(problem)
            return refusals
    refusals.append(
        Refusal(
            Reason.WRONG_ROOT, f"chain ends at {top.issuer.rfc4514_string()!r}, not a pinned root"
        )
    )
    return refusals
