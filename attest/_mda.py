"""`apple-mda` evidence: Apple Managed Device Attestation of a Secure Enclave key.

Design. A Mac enrolled in device management gets an ACME identity whose key the Secure
Enclave generated (`HardwareBound`) and Apple attested (`Attest`): Apple's attestation
servers issue a leaf certificate for that very key, chained to the Apple Enterprise
Attestation Root CA, describing the device (serial, OS, SIP, boot policy). The ACME
server (run for the node, see docs/apple-helper.md) chooses the challenge token, and
Apple writes SHA-256(token) into the leaf as the freshness code. dbloom makes the token

    mda_nonce = base64url(SHA-256(b"dbloom/mda/v1\\0" + peer id bytes)), no padding

so Apple's certificate binds the hardware key to this node's peer identity. The token is
ASCII because ACME tokens are strings and Apple hashes the string as sent. The
attestation itself is reused (Apple rate-limits fresh ones), so per-request freshness
comes from the same key signing `claims_digest`, which covers the client's nonce.

Proof (msgpack map):

    {"chain": [bin (leaf DER), bin (intermediate DER)], "mda_nonce": bin, "sig": bin}

`sig` is ECDSA (DER) over `claims_digest` with SHA-256 for a P-256 key, SHA-384 for P-384.

Extension encodings. Apple documents what each OID means, not how its value is encoded
(apple/device-management, mdm/commands/information.device.yaml, DevicePropertiesAttestation).
Verifiers deployed against real devices (smallstep's step-ca, Fleet) read the identity,
version and freshness extensions as the bare `extnValue` octets, so those are bare UTF-8
and 32 bare bytes here; SIP (0 enabled, 1 disabled) and third-party kernel extensions
(0 none allowed) are read as DER INTEGERs, and the secure boot level as bare UTF-8, one
of "Full Security", "Reduced Security", "Permissive Security". A blank value means
Apple could not confirm the property, so it counts as absent. Anything else is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from dbloom.p2p import PeerId

from ._apple_der import DerError, der_small_integer, extension_bytes, load_chain
from ._certs import verify_chain
from ._evidence import Evidence
from ._kinds import KindResult, VerifyContext
from ._refusal import Reason, Refusal

KIND = "apple-mda"
MDA_DOMAIN = b"dbloom/mda/v1\x00"
PROOF_KEYS = frozenset({"chain", "mda_nonce", "sig"})
MAX_NONCE = 128
MAX_SIGNATURE = 120
MAX_TEXT = 128
OID_SERIAL = x509.ObjectIdentifier("1.2.840.113635.100.8.9.1")
OID_UDID = x509.ObjectIdentifier("1.2.840.113635.100.8.9.2")
OID_OS_VERSION = x509.ObjectIdentifier("1.2.840.113635.100.8.10.1")
OID_SEPOS_VERSION = x509.ObjectIdentifier("1.2.840.113635.100.8.10.2")
OID_LLB_VERSION = x509.ObjectIdentifier("1.2.840.113635.100.8.10.3")
OID_FRESHNESS = x509.ObjectIdentifier("1.2.840.113635.100.8.11.1")
OID_SIP = x509.ObjectIdentifier("1.2.840.113635.100.8.13.1")
OID_SECURE_BOOT = x509.ObjectIdentifier("1.2.840.113635.100.8.13.2")
OID_KEXTS = x509.ObjectIdentifier("1.2.840.113635.100.8.13.3")
FULL_SECURITY = "Full Security"
BOOT_LEVELS = frozenset({FULL_SECURITY, "Reduced Security", "Permissive Security"})
SIP_ENABLED, SIP_DISABLED = 0, 1


def mda_nonce(peer: PeerId) -> bytes:
    """The ACME challenge token (as bytes) whose hash binds an MDA certificate to `peer`."""
    digest = hashlib.sha256(MDA_DOMAIN + peer.multihash).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


@dataclass(frozen=True, slots=True)
class MdaProperties:
    """What Apple's leaf certificate says about the device; None where Apple said nothing."""

    serial: str | None = None
    udid: str | None = None
    os_version: str | None = None
    sepos_version: str | None = None
    llb_version: str | None = None
    freshness: bytes | None = None
    sip: bool | None = None
    secure_boot_level: str | None = None
    kexts_allowed: bool | None = None

    @property
    def secure_boot(self) -> bool | None:
        """Full Security only; reduced and permissive boot policies count as off."""
        return None if self.secure_boot_level is None else self.secure_boot_level == FULL_SECURITY

    def posture(self) -> dict[str, bool]:
        """The posture facts hardware vouched for, in `Posture`'s keys."""
        facts = {"sip": self.sip, "secure_boot": self.secure_boot}
        return {key: value for key, value in facts.items() if value is not None}


def _text(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    raw = extension_bytes(cert, oid)
    if not raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DerError(f"extension {oid.dotted_string} is not UTF-8") from None
    if len(raw) > MAX_TEXT or not text.isprintable():
        raise DerError(f"extension {oid.dotted_string} is not a short printable string")
    return text


def _integer(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> int | None:
    raw = extension_bytes(cert, oid)
    return der_small_integer(raw, f"extension {oid.dotted_string}") if raw else None


def read_properties(cert: x509.Certificate) -> MdaProperties:
    """Every documented MDA property of a leaf certificate, strictly parsed."""
    sip = _integer(cert, OID_SIP)
    if sip not in (None, SIP_ENABLED, SIP_DISABLED):
        raise DerError(f"SIP status {sip} is neither 0 (enabled) nor 1 (disabled)")
    level = _text(cert, OID_SECURE_BOOT)
    if level is not None and level not in BOOT_LEVELS:
        raise DerError(f"secure boot level {level!r} is not one Apple documents")
    kexts = _integer(cert, OID_KEXTS)
    return MdaProperties(
        serial=_text(cert, OID_SERIAL),
        udid=_text(cert, OID_UDID),
        os_version=_text(cert, OID_OS_VERSION),
        sepos_version=_text(cert, OID_SEPOS_VERSION),
        llb_version=_text(cert, OID_LLB_VERSION),
        freshness=extension_bytes(cert, OID_FRESHNESS) or None,
        sip=None if sip is None else sip == SIP_ENABLED,
        secure_boot_level=level,
        kexts_allowed=None if kexts is None else kexts != 0,
    )


def _signature_refusals(leaf: x509.Certificate, signature: bytes, digest: bytes) -> list[Refusal]:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return [Refusal(Reason.MALFORMED, "MDA leaf key is not an elliptic-curve key")]
    if isinstance(key.curve, ec.SECP256R1):
        algorithm: hashes.HashAlgorithm = hashes.SHA256()
    elif isinstance(key.curve, ec.SECP384R1):
        algorithm = hashes.SHA384()
    else:
        return [Refusal(Reason.MALFORMED, f"MDA leaf key is on {key.curve.name}, not P-256/384")]
    try:
        key.verify(signature, digest, ec.ECDSA(algorithm))
    except InvalidSignature:
        return [Refusal(Reason.BAD_SIGNATURE, "claims are not signed by the attested key")]
    return []


def _freshness_refusals(freshness: bytes | None, nonce: bytes) -> list[Refusal]:
    if freshness is None:
        return [Refusal(Reason.BINDING_MISMATCH, "MDA leaf has no freshness code")]
    if not hmac.compare_digest(freshness, hashlib.sha256(nonce).digest()):
        return [Refusal(Reason.BINDING_MISMATCH, "MDA freshness code is not SHA-256(mda_nonce)")]
    return []


class MdaVerifier:
    """Checks an MDA chain bound to the peer id and a fresh signature by its key."""

    kind = KIND

    def verify(self, evidence: Evidence, ctx: VerifyContext) -> KindResult:
        proof = evidence.proof
        nonce, signature = proof.get("mda_nonce"), proof.get("sig")
        if (
            set(proof) != PROOF_KEYS
            or type(nonce) is not bytes
            or type(signature) is not bytes
            or not 0 < len(nonce) <= MAX_NONCE
            or not 0 < len(signature) <= MAX_SIGNATURE
        ):
            return _refuse(Refusal(Reason.MALFORMED, "MDA proof must be {chain, mda_nonce, sig}"))
        chain = load_chain(proof["chain"], "MDA chain")
        if isinstance(chain, Refusal):
            return _refuse(chain)
        refusals = verify_chain(chain, ctx.roots, ctx.now)
        properties: MdaProperties | None = None
        try:
            properties = read_properties(chain[0])
        except DerError as e:
            refusals.append(Refusal(Reason.MALFORMED, str(e)))
        if properties is not None:
            refusals += _freshness_refusals(properties.freshness, nonce)
        if not hmac.compare_digest(nonce, mda_nonce(ctx.claims.peer_id)):
            refusals.append(
                Refusal(Reason.BINDING_MISMATCH, "mda_nonce is not bound to this node's peer id")
            )
        refusals += _signature_refusals(chain[0], signature, ctx.claims_digest)
        if refusals or properties is None:
            return KindResult(refusals=tuple(refusals), hardware_backed=False)
        return KindResult(
            attested_posture=properties.posture(),
            hardware_id=properties.serial,
            hardware_backed=True,
        )


def _refuse(refusal: Refusal) -> KindResult:
    return KindResult(refusals=(refusal,), hardware_backed=False)
