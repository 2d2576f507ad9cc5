"""Synthetic Apple attestation material under a test root (a uniquely named module).

Builders for App Attest attestation objects and assertions and for MDA chains, shaped
like Apple's but issued by a throwaway CA, with a parameter to break each property the
verifiers check. `fake_helper_main` plays `dbloom-attest-helper` for the provider tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dbloom.attest import Claims, Posture, VerifierState, VerifyContext, claims_digest
from dbloom.attest._appattest import AAGUID_PRODUCTION
from dbloom.attest._mda import (
    OID_FRESHNESS,
    OID_KEXTS,
    OID_LLB_VERSION,
    OID_OS_VERSION,
    OID_SECURE_BOOT,
    OID_SEPOS_VERSION,
    OID_SERIAL,
    OID_SIP,
    OID_UDID,
    mda_nonce,
)
from dbloom.p2p import KeyPair

APP_ID = "ABCDE12345.org.dbloom.attest-helper"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
FAR_AWAY = datetime(2045, 1, 1, tzinfo=UTC)
NONCE_OID = x509.ObjectIdentifier("1.2.840.113635.100.8.2")
NODE_KEY = KeyPair.from_seed(b"a" * 32)
FLAGS_ATTESTED = 0x40


def name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dbloom tests"),
        ]
    )


@dataclass(frozen=True)
class FakeCA:
    """A root and an intermediate, like Apple's, with their keys."""

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        extensions: list[tuple[x509.ObjectIdentifier, bytes]],
        *,
        not_before: datetime = NOW - timedelta(days=1),
        not_after: datetime = NOW + timedelta(days=30),
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name("test leaf"))
            .issuer_name(self.intermediate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        for oid, value in extensions:
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
        return builder.sign(self.intermediate_key, hashes.SHA256())

    def save(self, directory: Path) -> None:
        """Write both keys and both certificates, for the fake helper."""
        for label, key, cert in (
            ("root", self.root_key, self.root),
            ("intermediate", self.intermediate_key, self.intermediate),
        ):
            (directory / f"{label}-key.pem").write_bytes(_pem_key(key))
            (directory / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def load(cls, directory: Path) -> FakeCA:
        def read(label: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
            key = serialization.load_pem_private_key(
                (directory / f"{label}-key.pem").read_bytes(), None
            )
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return x509.load_pem_x509_certificate((directory / f"{label}.pem").read_bytes()), key

        return cls(*read("root"), *read("intermediate"))


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA384())
    )


def make_ca(label: str = "Test Attestation") -> FakeCA:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _ca_cert(
        f"{label} Root CA", root_key, name(f"{label} Root CA"), root_key, LONG_AGO, FAR_AWAY
    )
    key = ec.generate_private_key(ec.SECP384R1())
    intermediate = _ca_cert(f"{label} CA 1", key, root.subject, root_key, LONG_AGO, FAR_AWAY)
    return FakeCA(root, root_key, intermediate, key)


def sibling_intermediate(ca: FakeCA) -> x509.Certificate:
    """An intermediate named like the CA's, under the same root, with another key."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = ca.intermediate.subject.rfc4514_string().split(",")[-1].removeprefix("CN=")
    return _ca_cert(subject, key, ca.root.subject, ca.root_key, LONG_AGO, FAR_AWAY)


def point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def key_id_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    return hashlib.sha256(point(key)).digest()


def nonce_extension(nonce: bytes) -> bytes:
    """Apple's credCert nonce extension: SEQUENCE { [1] EXPLICIT OCTET STRING }."""
    octets = b"\x04" + bytes([len(nonce)]) + nonce
    tagged = b"\xa1" + bytes([len(octets)]) + octets
    return b"\x30" + bytes([len(tagged)]) + tagged


def cose_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    raw = point(key)
    return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: raw[1:33], -3: raw[33:]})


def auth_data(
    *,
    app_id: str = APP_ID,
    counter: int = 0,
    flags: int = FLAGS_ATTESTED,
    aaguid: bytes = AAGUID_PRODUCTION,
    credential_id: bytes | None = None,
    credential_key: bytes | None = None,
) -> bytes:
    head = hashlib.sha256(app_id.encode()).digest() + bytes([flags]) + counter.to_bytes(4, "big")
    if credential_id is None or credential_key is None:
        return head
    return head + aaguid + len(credential_id).to_bytes(2, "big") + credential_id + credential_key


@dataclass(frozen=True)
class Attestation:
    """Knobs for one App Attest attestation object; the defaults make a valid one."""

    app_id: str = APP_ID
    counter: int = 0
    aaguid: bytes = AAGUID_PRODUCTION
    credential_id: bytes | None = None
    cose_for: ec.EllipticCurvePrivateKey | None = None
    nonce: bytes | None = None
    with_nonce: bool = True
    not_before: datetime = NOW - timedelta(days=1)
    not_after: datetime = NOW + timedelta(days=30)
    fmt: str = "apple-appattest"
    receipt: bytes = b""

    def build(self, ca: FakeCA, key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
        auth = auth_data(
            app_id=self.app_id,
            counter=self.counter,
            aaguid=self.aaguid,
            credential_id=key_id_of(key) if self.credential_id is None else self.credential_id,
            credential_key=cose_key(self.cose_for or key),
        )
        nonce = self.nonce or hashlib.sha256(auth + digest).digest()
        extensions = [(NONCE_OID, nonce_extension(nonce))] if self.with_nonce else []
        leaf = ca.issue(
            key.public_key(), extensions, not_before=self.not_before, not_after=self.not_after
        )
        der = serialization.Encoding.DER
        statement = {"x5c": [leaf.public_bytes(der), ca.intermediate.public_bytes(der)]}
        statement["receipt"] = self.receipt
        return cbor2.dumps({"fmt": self.fmt, "attStmt": statement, "authData": auth})


def assertion_for_hash(
    key: ec.EllipticCurvePrivateKey,
    client_data_hash: bytes,
    counter: int,
    *,
    app_id: str = APP_ID,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    auth = auth_data(app_id=app_id, counter=counter, flags=0)
    nonce = hashlib.sha256(auth + client_data_hash).digest()
    signature = (signer or key).sign(nonce, ec.ECDSA(hashes.SHA256()))
    return cbor2.dumps({"signature": signature, "authenticatorData": auth})


def assertion(
    key: ec.EllipticCurvePrivateKey,
    digest: bytes,
    counter: int,
    *,
    app_id: str = APP_ID,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """An App Attest assertion over `digest`, as the helper makes it for the claims digest."""
    client_data_hash = hashlib.sha256(digest).digest()
    return assertion_for_hash(key, client_data_hash, counter, app_id=app_id, signer=signer)


@dataclass(frozen=True)
class MdaLeaf:
    """Knobs for one MDA leaf; None leaves an OID out, the defaults make a valid one."""

    serial: bytes | None = b"C02TEST0DBLM"
    udid: bytes | None = b"00008112-000A1C2E3F4B5C6D"
    os_version: bytes | None = b"15.3.1"
    sepos_version: bytes | None = b"24D70"
    llb_version: bytes | None = b"iBoot-11881.81.2"
    sip: bytes | None = b"\x02\x01\x00"
    secure_boot: bytes | None = b"Full Security"
    kexts: bytes | None = b"\x02\x01\x00"
    freshness: bytes | None = None
    with_freshness: bool = True
    not_before: datetime = NOW - timedelta(days=1)
    not_after: datetime = NOW + timedelta(days=30)

    def chain(self, ca: FakeCA, key: ec.EllipticCurvePrivateKey, nonce: bytes) -> list[bytes]:
        freshness = hashlib.sha256(nonce).digest() if self.freshness is None else self.freshness
        values = [
            (OID_SERIAL, self.serial),
            (OID_UDID, self.udid),
            (OID_OS_VERSION, self.os_version),
            (OID_SEPOS_VERSION, self.sepos_version),
            (OID_LLB_VERSION, self.llb_version),
            (OID_FRESHNESS, freshness if self.with_freshness else None),
            (OID_SIP, self.sip),
            (OID_SECURE_BOOT, self.secure_boot),
            (OID_KEXTS, self.kexts),
        ]
        extensions = [(oid, value) for oid, value in values if value is not None]
        leaf = ca.issue(
            key.public_key(), extensions, not_before=self.not_before, not_after=self.not_after
        )
        der = serialization.Encoding.DER
        return [leaf.public_bytes(der), ca.intermediate.public_bytes(der)]


def mda_sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    algorithm = hashes.SHA384() if isinstance(key.curve, ec.SECP384R1) else hashes.SHA256()
    return key.sign(digest, ec.ECDSA(algorithm))


def make_claims(key: KeyPair = NODE_KEY, nonce: bytes = b"\x05" * 32, **changes: object) -> Claims:
    claims = Claims(
        peer_id=key.peer_id,
        measurement=bytes(range(32)),
        nonce=nonce,
        issued_at_ms=int(time.time() * 1000),
        models={"tiny": b"\x11" * 32},
        posture=Posture(sip=True, secure_boot=None),
    )
    return replace(claims, **changes)  # type: ignore[arg-type]


def make_ctx(
    claims: Claims,
    roots: tuple[x509.Certificate, ...],
    *,
    state: VerifierState | None = None,
    now: datetime = NOW,
    app_ids: frozenset[str] = frozenset({APP_ID}),
    allow_development_aaguid: bool = False,
) -> VerifyContext:
    return VerifyContext(
        claims=claims,
        claims_digest=claims_digest(claims.encode()),
        roots=roots,
        now=now,
        state=state if state is not None else VerifierState(),
        app_ids=app_ids,
        allow_development_aaguid=allow_development_aaguid,
    )


def enroll_mda(directory: Path, ca: FakeCA, key: KeyPair, leaf: MdaLeaf = MdaLeaf()) -> None:
    """What the ACME enrollment leaves for the helper: its key and Apple's chain."""
    device_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = replace(leaf, not_before=now - timedelta(days=1), not_after=now + timedelta(days=7))
    chain = leaf.chain(ca, device_key, mda_nonce(key.peer_id))
    (directory / "mda.json").write_text(json.dumps([base64.b64encode(c).decode() for c in chain]))
    (directory / "mda-key.pem").write_bytes(_pem_key(device_key))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def fake_helper_main(argv: list[str], directory: Path) -> int:
    """`dbloom-attest-helper` for tests: same contract, synthetic evidence, test root."""
    ca = FakeCA.load(directory)
    command, options = argv[0], dict(zip(argv[1::2], argv[2::2], strict=True))
    if command == "mda":
        key = serialization.load_pem_private_key((directory / "mda-key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        chain = json.loads((directory / "mda.json").read_text())
        sig = mda_sign(key, bytes.fromhex(options["--digest"]))
        print(json.dumps({"v": 1, "kind": "apple-mda", "chain": chain, "sig": _b64(sig)}))
        return 0
    client_data_hash = bytes.fromhex(options["--client-data-hash"])
    if "--key-id" not in options:
        key = ec.generate_private_key(ec.SECP256R1())
        key_id = key_id_of(key)
        (directory / f"{key_id.hex()}.pem").write_bytes(_pem_key(key))
        now = datetime.now(UTC)
        attestation = Attestation(
            not_before=now - timedelta(days=1), not_after=now + timedelta(days=1)
        )
        raw = attestation.build(ca, key, client_data_hash)
        body = {"key_id": _b64(key_id), "attestation": _b64(raw)}
    else:
        key_id = base64.b64decode(options["--key-id"])
        path = directory / f"{key_id.hex()}.pem"
        if not path.exists():
            print("no such App Attest key", file=sys.stderr)
            return 5
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        counter_file = directory / f"{key_id.hex()}.counter"
        counter = int(counter_file.read_text()) + 1 if counter_file.exists() else 1
        counter_file.write_text(str(counter))
        raw = assertion_for_hash(key, client_data_hash, counter)
        body = {"key_id": _b64(key_id), "assertion": _b64(raw)}
    print(json.dumps({"v": 1, "kind": "apple-app-attest", **body}))
    return 0
