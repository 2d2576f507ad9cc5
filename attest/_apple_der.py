"""Strict readers for Apple attestation certificates and the DER in their extensions.

Both the certificates and their extension values come from a node that may have shaped
them, and the extensions need only a handful of definite-length primitives, so the DER
reader trusts nothing: one-byte tags only, minimal length encodings, no indefinite
lengths, no length running past the input, and no bytes left over.
"""

from __future__ import annotations

from cryptography import x509

from ._errors import EvidenceDecodeError
from ._refusal import Reason, Refusal

SEQUENCE = 0x30
OCTET_STRING = 0x04
INTEGER = 0x02
MAX_LENGTH_OCTETS = 3


class DerError(EvidenceDecodeError):
    """DER that is truncated, non-minimal, indefinite, or not the expected element."""


def der_value(data: bytes, tag: int, what: str) -> bytes:
    """The contents of `data`, which must be exactly one element with tag `tag`."""
    if len(data) < 2:
        raise DerError(f"{what} is truncated")
    if data[0] != tag:
        raise DerError(f"{what} has tag 0x{data[0]:02x}, expected 0x{tag:02x}")
    first = data[1]
    start = 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 0 < count <= MAX_LENGTH_OCTETS or len(data) < 2 + count:
            raise DerError(f"{what} has an unsupported or truncated length")
        length = int.from_bytes(data[2 : 2 + count], "big")
        if length < 0x80 or data[2] == 0:
            raise DerError(f"{what} has a non-minimal length")
        start = 2 + count
    if start + length != len(data):
        raise DerError(f"{what} length does not match its {len(data) - start} content bytes")
    return data[start:]


def der_small_integer(data: bytes, what: str) -> int:
    """A non-negative DER INTEGER of at most 4 bytes, minimally encoded."""
    body = der_value(data, INTEGER, what)
    if not 0 < len(body) <= 4:
        raise DerError(f"{what} must be a 1 to 4 byte integer")
    if body[0] & 0x80:
        raise DerError(f"{what} is negative")
    if len(body) > 1 and body[0] == 0 and not body[1] & 0x80:
        raise DerError(f"{what} is not minimally encoded")
    return int.from_bytes(body, "big")


def extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    """The raw `extnValue` octets of a private extension, or None when it is absent."""
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise DerError(f"extension {oid.dotted_string} is not a private extension")
    return value.value


def load_chain(items: object, what: str) -> list[x509.Certificate] | Refusal:
    """A leaf-first [leaf, intermediate] pair, parsed fully before anything relies on it.

    The certificate parser decodes names and extensions lazily and raises on hostile
    encodings, so they are read once here, where every failure becomes a refusal.
    """
    if not isinstance(items, list | tuple) or len(items) != 2:
        return Refusal(Reason.MALFORMED, f"{what} must be [leaf, intermediate]")
    chain = []
    for i, der in enumerate(items):
        if not isinstance(der, bytes):
            return Refusal(Reason.MALFORMED, f"{what}[{i}] is not bytes")
        try:
            cert = x509.load_der_x509_certificate(der)
            _ = (cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.extensions)
        except (
            ValueError,
            TypeError,
            x509.InvalidVersion,
            x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType,
        ) as e:
            return Refusal(Reason.MALFORMED, f"{what}[{i}] is not a readable certificate: {e}")
        chain.append(cert)
    return chain
