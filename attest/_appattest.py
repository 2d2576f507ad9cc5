"""`apple-app-attest` evidence: Apple App Attest, the attestation of a signed app's key.

A signed helper app (docs/apple-helper.md) asks the Secure Enclave for a key and Apple's
servers for an attestation of it, passing `claims_digest` as the client data hash, so
Apple's certificate for the key carries SHA-256(authData ‖ claims_digest): the claims,
the key and the app id are bound together by Apple, then checked here as Apple's
"Validating apps that connect to your server" describes. On a long-lived connection the
same key answers later challenges with cheap assertions, whose counter must grow.

Proof (msgpack map), one of:

    {"attestation": bin (Apple's CBOR attestation object), "key_id": bin[32]}
    {"assertion": bin (CBOR {"signature", "authenticatorData"}), "key_id": bin[32]}

An assertion is only accepted for a key this client saw attested (kept in
`VerifierState`); nonce = SHA-256(authenticatorData ‖ SHA-256(claims_digest)).
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dbloom.p2p import LimitExceeded

from ._apple_der import OCTET_STRING, SEQUENCE, DerError, der_value, extension_bytes, load_chain
from ._certs import verify_chain
from ._errors import EvidenceDecodeError
from ._evidence import Evidence
from ._kinds import KindResult, VerifyContext
from ._refusal import Reason, Refusal

KIND = "apple-app-attest"
NONCE_OID = x509.ObjectIdentifier("1.2.840.113635.100.8.2")
MAX_CBOR = 16 << 10
KEY_ID_SIZE = 32
RP_ID_HASH_SIZE = 32
AUTH_DATA_HEADER = 37
AAGUID_SIZE = 16
AAGUID_PRODUCTION = b"appattest" + bytes(7)
AAGUID_DEVELOPMENT = b"appattestdevelop"
FLAG_ATTESTED_DATA = 0x40
FLAG_EXTENSION_DATA = 0x80
MAX_SIGNATURE = 80
COSE_KTY, COSE_ALG, COSE_CRV, COSE_X, COSE_Y = 1, 3, -1, -2, -3
COSE_EC2, COSE_ES256, COSE_P256 = 2, -7, 1
# Every tag cbor2 decodes by itself; Apple's objects use none, so each one is refused.
BUILTIN_TAGS = (
    *(0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100),
    *(256, 258, 260, 261, 1004, 55799),
)


def _reject_tag(*_: object) -> NoReturn:
    raise ValueError("CBOR tags are not allowed here")


_NO_TAGS = {tag: _reject_tag for tag in BUILTIN_TAGS}


def decode_cbor(raw: object, what: str, *, depth: int, text_keys: bool = True) -> Any:
    """One size-capped CBOR item, no tags, no indefinite lengths, no trailing bytes.

    Apple's objects are small maps of byte strings; anything richer is refused before it
    can cost memory or time, never interpreted.
    """
    if not isinstance(raw, bytes):
        raise EvidenceDecodeError(f"{what} must be bytes")
    if len(raw) > MAX_CBOR:
        raise LimitExceeded(f"{what} is {len(raw)} bytes, above {MAX_CBOR}")
    decoder = cbor2.CBORDecoder(
        io.BytesIO(raw),
        tag_hook=_reject_tag,
        semantic_decoders=_NO_TAGS,
        max_depth=depth,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=text_keys,
    )
    try:
        value = decoder.decode()
    except (cbor2.CBORDecodeError, ValueError, OverflowError) as e:
        raise EvidenceDecodeError(f"{what} is not valid CBOR: {e}") from None
    if decoder.fp.tell() != len(raw):
        raise EvidenceDecodeError(f"{what} has {len(raw) - decoder.fp.tell()} trailing bytes")
    return value


def _cbor_map(raw: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    value = decode_cbor(raw, what, depth=4)
    if not isinstance(value, dict) or set(value) != keys:
        raise EvidenceDecodeError(f"{what} must be a map of exactly {', '.join(sorted(keys))}")
    return value


def _field(body: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = body[key]
    if type(value) is not kind:
        raise EvidenceDecodeError(f"{what}.{key} must be {kind.__name__}")
    return value


@dataclass(frozen=True, slots=True)
class AuthData:
    """Authenticator data; the attested credential fields are empty in an assertion."""

    rp_id_hash: bytes
    flags: int
    counter: int
    aaguid: bytes = b""
    credential_id: bytes = b""
    credential_key: Mapping[Any, Any] = field(default_factory=dict)


def parse_auth_data(data: bytes, *, attested: bool) -> AuthData:
    """Authenticator data with every length checked against what is actually there."""
    if len(data) < AUTH_DATA_HEADER:
        raise EvidenceDecodeError(f"authenticator data is {len(data)} bytes, too short")
    rp_id_hash, flags = data[:RP_ID_HASH_SIZE], data[RP_ID_HASH_SIZE]
    counter = int.from_bytes(data[RP_ID_HASH_SIZE + 1 : AUTH_DATA_HEADER], "big")
    if flags & FLAG_EXTENSION_DATA:
        raise EvidenceDecodeError("authenticator data must not carry extensions")
    if not attested:
        if len(data) != AUTH_DATA_HEADER or flags & FLAG_ATTESTED_DATA:
            raise EvidenceDecodeError("assertion authenticator data must be exactly 37 bytes")
        return AuthData(rp_id_hash, flags, counter)
    if not flags & FLAG_ATTESTED_DATA:
        raise EvidenceDecodeError("attestation authenticator data lacks attested credential data")
    at = AUTH_DATA_HEADER
    if len(data) < at + AAGUID_SIZE + 2:
        raise EvidenceDecodeError("attested credential data is truncated")
    aaguid = data[at : at + AAGUID_SIZE]
    at += AAGUID_SIZE
    id_length = int.from_bytes(data[at : at + 2], "big")
    at += 2
    if len(data) < at + id_length:
        raise EvidenceDecodeError(f"credential id of {id_length} bytes runs past the data")
    credential_id = data[at : at + id_length]
    key = decode_cbor(data[at + id_length :], "credential public key", depth=2, text_keys=False)
    if not isinstance(key, dict):
        raise EvidenceDecodeError("credential public key must be a COSE key map")
    return AuthData(rp_id_hash, flags, counter, aaguid, credential_id, key)


def _cose_point(key: Mapping[Any, Any]) -> bytes | None:
    x, y = key.get(COSE_X), key.get(COSE_Y)
    if key.get(COSE_KTY) != COSE_EC2 or key.get(COSE_CRV) != COSE_P256:
        return None
    if key.get(COSE_ALG, COSE_ES256) != COSE_ES256:
        return None
    if type(x) is not bytes or type(y) is not bytes or len(x) != 32 or len(y) != 32:
        return None
    return b"\x04" + x + y


def _p256_point(cert: x509.Certificate) -> bytes | None:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def credential_nonce(cert: x509.Certificate) -> bytes | None:
    """The nonce Apple put in the credential certificate: SEQUENCE { [1] { OCTET STRING } }."""
    raw = extension_bytes(cert, NONCE_OID)
    if raw is None:
        return None
    sequence = der_value(raw, SEQUENCE, "nonce extension")
    explicit = der_value(sequence, 0xA1, "nonce extension [1]")
    return der_value(explicit, OCTET_STRING, "nonce extension octet string")


def _rp_id_refusals(rp_id_hash: bytes, app_ids: Iterable[str]) -> list[Refusal]:
    expected = [hashlib.sha256(app_id.encode()).digest() for app_id in app_ids]
    if not expected:
        return [Refusal(Reason.APP_ID_MISMATCH, "the policy names no app id for App Attest")]
    if not any(hmac.compare_digest(rp_id_hash, e) for e in expected):
        return [Refusal(Reason.APP_ID_MISMATCH, "the key was attested for another app id")]
    return []


def _aaguid_refusals(aaguid: bytes, allow_development: bool) -> list[Refusal]:
    if aaguid == AAGUID_PRODUCTION:
        return []
    if aaguid == AAGUID_DEVELOPMENT:
        if allow_development:
            return []
        return [
            Refusal(Reason.AAGUID_MISMATCH, "development App Attest key; policy wants production")
        ]
    return [Refusal(Reason.AAGUID_MISMATCH, f"aaguid {aaguid.hex()} is not App Attest's")]


class AppAttestVerifier:
    """Checks App Attest attestations and assertions of the claims digest."""

    kind = KIND

    def verify(self, evidence: Evidence, ctx: VerifyContext) -> KindResult:
        proof = evidence.proof
        if set(proof) == {"attestation", "key_id"}:
            check, raw = _attestation, proof["attestation"]
        elif set(proof) == {"assertion", "key_id"}:
            check, raw = _assertion, proof["assertion"]
        else:
            return _refuse(
                Refusal(
                    Reason.MALFORMED,
                    "App Attest proof must be {attestation, key_id} or {assertion, key_id}",
                )
            )
        key_id = proof["key_id"]
        if type(key_id) is not bytes or len(key_id) != KEY_ID_SIZE:
            return _refuse(Refusal(Reason.MALFORMED, "App Attest key_id must be 32 bytes"))
        try:
            refusals = check(raw, key_id, ctx)
        except LimitExceeded as e:
            refusals = [Refusal(Reason.OVERSIZED, str(e))]
        except EvidenceDecodeError as e:
            refusals = [Refusal(Reason.MALFORMED, str(e))]
        if refusals:
            return KindResult(refusals=tuple(refusals), hardware_backed=False)
        return KindResult(hardware_backed=True, hardware_id=key_id.hex())


def _refuse(refusal: Refusal) -> KindResult:
    return KindResult(refusals=(refusal,), hardware_backed=False)


ATTESTATION_KEYS = frozenset({"fmt", "attStmt", "authData"})
STATEMENT_KEYS = frozenset({"x5c", "receipt"})
ASSERTION_KEYS = frozenset({"signature", "authenticatorData"})


def _attestation(raw: object, key_id: bytes, ctx: VerifyContext) -> list[Refusal]:
    body = _cbor_map(raw, ATTESTATION_KEYS, "attestation")
    if _field(body, "fmt", str, "attestation") != "apple-appattest":
        raise EvidenceDecodeError("attestation.fmt must be apple-appattest")
    statement = body["attStmt"]
    if not isinstance(statement, dict) or set(statement) != STATEMENT_KEYS:
        raise EvidenceDecodeError("attestation.attStmt must be a map of exactly receipt, x5c")
    _field(statement, "receipt", bytes, "attStmt")
    x5c = _field(statement, "x5c", list, "attStmt")
    auth_bytes = _field(body, "authData", bytes, "attestation")
    auth = parse_auth_data(auth_bytes, attested=True)
    chain = load_chain(x5c, "attStmt.x5c")
    if isinstance(chain, Refusal):
        return [chain]
    refusals = verify_chain(chain, ctx.roots, ctx.now)
    point = _p256_point(chain[0])
    refusals += _key_refusals(point, key_id, auth)
    refusals += _nonce_refusals(chain[0], auth_bytes, ctx.claims_digest)
    if not hmac.compare_digest(auth.credential_id, key_id):
        refusals.append(Refusal(Reason.BINDING_MISMATCH, "credential id is not the key_id"))
    refusals += _rp_id_refusals(auth.rp_id_hash, ctx.app_ids)
    if auth.counter != 0:
        refusals.append(Refusal(Reason.COUNTER, f"attestation counter is {auth.counter}, not 0"))
    if ctx.state.app_attest_counters.get(key_id, 0) > 0:
        refusals.append(Refusal(Reason.COUNTER, "key already made assertions; cannot re-attest"))
    refusals += _aaguid_refusals(auth.aaguid, ctx.allow_development_aaguid)
    if point is not None and not refusals:
        ctx.state.app_attest_keys[key_id] = point
        ctx.state.app_attest_counters[key_id] = 0
    return refusals


def _key_refusals(point: bytes | None, key_id: bytes, auth: AuthData) -> list[Refusal]:
    if point is None:
        return [Refusal(Reason.MALFORMED, "credential certificate key is not P-256")]
    refusals = []
    if not hmac.compare_digest(hashlib.sha256(point).digest(), key_id):
        refusals.append(Refusal(Reason.BINDING_MISMATCH, "key_id is not the attested key's"))
    cose = _cose_point(auth.credential_key)
    if cose is None or not hmac.compare_digest(cose, point):
        refusals.append(
            Refusal(Reason.BINDING_MISMATCH, "authenticator data holds another public key")
        )
    return refusals


def _nonce_refusals(cert: x509.Certificate, auth_bytes: bytes, digest: bytes) -> list[Refusal]:
    try:
        nonce = credential_nonce(cert)
    except DerError as e:
        return [Refusal(Reason.MALFORMED, str(e))]
    if nonce is None:
        return [Refusal(Reason.BINDING_MISMATCH, "credential certificate has no nonce")]
    if not hmac.compare_digest(nonce, hashlib.sha256(auth_bytes + digest).digest()):
        return [Refusal(Reason.BINDING_MISMATCH, "Apple's nonce does not bind these claims")]
    return []


def _assertion(raw: object, key_id: bytes, ctx: VerifyContext) -> list[Refusal]:
    body = _cbor_map(raw, ASSERTION_KEYS, "assertion")
    signature = _field(body, "signature", bytes, "assertion")
    auth_bytes = _field(body, "authenticatorData", bytes, "assertion")
    if not 0 < len(signature) <= MAX_SIGNATURE:
        raise EvidenceDecodeError(f"assertion.signature must be 1 to {MAX_SIGNATURE} bytes")
    auth = parse_auth_data(auth_bytes, attested=False)
    refusals = _rp_id_refusals(auth.rp_id_hash, ctx.app_ids)
    point = ctx.state.app_attest_keys.get(key_id)
    if point is None:
        return [Refusal(Reason.BINDING_MISMATCH, "unknown key id; attest first"), *refusals]
    nonce = hashlib.sha256(auth_bytes + hashlib.sha256(ctx.claims_digest).digest()).digest()
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    try:
        key.verify(signature, nonce, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        refusals.append(Refusal(Reason.BAD_SIGNATURE, "assertion is not signed by the key"))
    stored = ctx.state.app_attest_counters.get(key_id, 0)
    if auth.counter <= stored:
        refusals.append(
            Refusal(Reason.COUNTER, f"assertion counter {auth.counter} is not above {stored}")
        )
    if not refusals:
        ctx.state.app_attest_counters[key_id] = auth.counter
    return refusals
