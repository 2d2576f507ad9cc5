"""Apple's production attestation roots, pinned by SHA-256 so a bad edit cannot load.

Both are public (apple.com/certificateauthority, the Enterprise root on its "private"
PKI page). A root is the one input that silently redefines "genuine Apple hardware" if
it is wrong, so each PEM is checked against its fingerprint at import and a mismatch
stops the import instead of trusting whatever the bytes happen to be.

- Apple App Attestation Root CA: CN=Apple App Attestation Root CA, O=Apple Inc.,
  ST=California; P-384, ecdsa-with-SHA384; valid 2020-03-18 to 2045-03-15.
- Apple Enterprise Attestation Root CA: CN=Apple Enterprise Attestation Root CA,
  O=Apple Inc., C=US; P-384, ecdsa-with-SHA384; valid 2022-02-16 to 2047-02-20.
"""

from __future__ import annotations

from cryptography import x509

from ._appattest import KIND as APP_ATTEST_KIND
from ._certs import fingerprint
from ._mda import KIND as MDA_KIND

APP_ATTEST_ROOT_SHA256 = "1cb9823ba28ba6ad2d33a006941de2ae4f513ef1d4e831b9f7e0fa7b6242c932"
APP_ATTEST_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICITCCAaegAwIBAgIQC/O+DvHN0uD7jG5yH2IXmDAKBggqhkjOPQQDAzBSMSYw
JAYDVQQDDB1BcHBsZSBBcHAgQXR0ZXN0YXRpb24gUm9vdCBDQTETMBEGA1UECgwK
QXBwbGUgSW5jLjETMBEGA1UECAwKQ2FsaWZvcm5pYTAeFw0yMDAzMTgxODMyNTNa
Fw00NTAzMTUwMDAwMDBaMFIxJjAkBgNVBAMMHUFwcGxlIEFwcCBBdHRlc3RhdGlv
biBSb290IENBMRMwEQYDVQQKDApBcHBsZSBJbmMuMRMwEQYDVQQIDApDYWxpZm9y
bmlhMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAERTHhmLW07ATaFQIEVwTtT4dyctdh
NbJhFs/Ii2FdCgAHGbpphY3+d8qjuDngIN3WVhQUBHAoMeQ/cLiP1sOUtgjqK9au
Yen1mMEvRq9Sk3Jm5X8U62H+xTD3FE9TgS41o0IwQDAPBgNVHRMBAf8EBTADAQH/
MB0GA1UdDgQWBBSskRBTM72+aEH/pwyp5frq5eWKoTAOBgNVHQ8BAf8EBAMCAQYw
CgYIKoZIzj0EAwMDaAAwZQIwQgFGnByvsiVbpTKwSga0kP0e8EeDS4+sQmTvb7vn
53O5+FRXgeLhpJ06ysC5PrOyAjEAp5U4xDgEgllF7En3VcE3iexZZtKeYnpqtijV
oyFraWVIyd/dganmrduC1bmTBGwD
-----END CERTIFICATE-----
"""

ENTERPRISE_ATTESTATION_ROOT_SHA256 = (
    "ccf59ef8fcb3017d97f8b5fa6fa90e7a3f9283f76b55ac6cf6eda8b8b949f05b"
)
ENTERPRISE_ATTESTATION_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICJDCCAamgAwIBAgIUQsDCuyxyfFxeq/bxpm8frF15hzcwCgYIKoZIzj0EAwMw
UTEtMCsGA1UEAwwkQXBwbGUgRW50ZXJwcmlzZSBBdHRlc3RhdGlvbiBSb290IENB
MRMwEQYDVQQKDApBcHBsZSBJbmMuMQswCQYDVQQGEwJVUzAeFw0yMjAyMTYxOTAx
MjRaFw00NzAyMjAwMDAwMDBaMFExLTArBgNVBAMMJEFwcGxlIEVudGVycHJpc2Ug
QXR0ZXN0YXRpb24gUm9vdCBDQTETMBEGA1UECgwKQXBwbGUgSW5jLjELMAkGA1UE
BhMCVVMwdjAQBgcqhkjOPQIBBgUrgQQAIgNiAAT6Jigq+Ps9Q4CoT8t8q+UnOe2p
oT9nRaUfGhBTbgvqSGXPjVkbYlIWYO+1zPk2Sz9hQ5ozzmLrPmTBgEWRcHjA2/y7
7GEicps9wn2tj+G89l3INNDKETdxSPPIZpPj8VmjQjBAMA8GA1UdEwEB/wQFMAMB
Af8wHQYDVR0OBBYEFPNqTQGd8muBpV5du+UIbVbi+d66MA4GA1UdDwEB/wQEAwIB
BjAKBggqhkjOPQQDAwNpADBmAjEA1xpWmTLSpr1VH4f8Ypk8f3jMUKYz4QPG8mL5
8m9sX/b2+eXpTv2pH4RZgJjucnbcAjEA4ZSB6S45FlPuS/u4pTnzoz632rA+xW/T
ZwFEh9bhKjJ+5VQ9/Do1os0u3LEkgN/r
-----END CERTIFICATE-----
"""


class PinnedRootMismatch(RuntimeError):
    """An embedded root is not the certificate its pinned fingerprint names."""


def load_pinned(pem: bytes, pinned_sha256: str, name: str) -> x509.Certificate:
    """Parse an embedded root and insist it is exactly the pinned certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    actual = fingerprint(cert)
    if actual != pinned_sha256:
        raise PinnedRootMismatch(
            f"embedded {name} has SHA-256 {actual}, pinned {pinned_sha256}; "
            "the PEM in dbloom/attest/_apple_roots.py was altered"
        )
    return cert


APP_ATTEST_ROOT = load_pinned(
    APP_ATTEST_ROOT_PEM, APP_ATTEST_ROOT_SHA256, "Apple App Attestation Root CA"
)
ENTERPRISE_ATTESTATION_ROOT = load_pinned(
    ENTERPRISE_ATTESTATION_ROOT_PEM,
    ENTERPRISE_ATTESTATION_ROOT_SHA256,
    "Apple Enterprise Attestation Root CA",
)


def production_roots() -> dict[str, tuple[x509.Certificate, ...]]:
    """The roots a production policy pins, keyed by evidence kind."""
    return {
        APP_ATTEST_KIND: (APP_ATTEST_ROOT,),
        MDA_KIND: (ENTERPRISE_ATTESTATION_ROOT,),
    }
