"""Managed Device Attestation: chain, peer binding, fresh signature, and the posture OIDs."""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from apple_fixtures import (
    NODE_KEY,
    NOW,
    MdaLeaf,
    make_ca,
    make_claims,
    make_ctx,
    mda_sign,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st

from dbloom.attest import Evidence, Policy, Posture, Reason, VerifyContext, verify_evidence
from dbloom.attest._apple_roots import (
    ENTERPRISE_ATTESTATION_ROOT,
    ENTERPRISE_ATTESTATION_ROOT_SHA256,
    production_roots,
)
from dbloom.attest._certs import fingerprint
from dbloom.attest._mda import KIND, MdaVerifier, mda_nonce, read_properties
from dbloom.p2p import KeyPair

CA = make_ca("MDA")
OTHER_CA = make_ca("Impostor MDA")
DEVICE_KEY = ec.generate_private_key(ec.SECP256R1())
CLAIMS = make_claims()
DIGEST = make_ctx(CLAIMS, ()).claims_digest
NONCE = mda_nonce(NODE_KEY.peer_id)
VERIFIER = MdaVerifier()
GOOD = MdaLeaf()


def proof(
    leaf: MdaLeaf = GOOD,
    *,
    nonce: bytes = NONCE,
    signed: bytes = DIGEST,
    key: ec.EllipticCurvePrivateKey = DEVICE_KEY,
) -> dict[str, object]:
    return {
        "chain": leaf.chain(CA, key, nonce),
        "mda_nonce": nonce,
        "sig": mda_sign(key, signed),
    }


VALID = proof()


def run(body: dict[str, object], ctx: VerifyContext | None = None) -> tuple[set[Reason], str]:
    result = VERIFIER.verify(
        Evidence(KIND, CLAIMS.encode(), body), ctx or make_ctx(CLAIMS, (CA.root,))
    )
    return {r.reason for r in result.refusals}, "; ".join(map(str, result.refusals))


def test_valid_mda_is_accepted_with_attested_posture() -> None:
    result = VERIFIER.verify(Evidence(KIND, CLAIMS.encode(), VALID), make_ctx(CLAIMS, (CA.root,)))
    assert result.refusals == () and result.hardware_backed
    assert result.hardware_id == "C02TEST0DBLM"
    assert result.attested_posture == {"sip": True, "secure_boot": True}


def test_a_p384_secure_enclave_key_is_accepted() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    assert run(proof(key=key))[0] == set()


def test_the_nonce_is_an_acme_token_bound_to_the_peer() -> None:
    expected = hashlib.sha256(b"dbloom/mda/v1\x00" + NODE_KEY.peer_id.multihash).digest()
    assert base64.urlsafe_b64decode(NONCE + b"=") == expected
    assert NONCE.isascii() and b"=" not in NONCE and len(NONCE) == 43
    assert mda_nonce(KeyPair.from_seed(b"b" * 32).peer_id) != NONCE


OTHER_NONCE = mda_nonce(KeyPair.from_seed(b"c" * 32).peer_id)


@pytest.mark.parametrize(
    ("body", "ctx_changes", "reason", "detail"),
    [
        (VALID, {"roots": (OTHER_CA.root,)}, Reason.WRONG_ROOT, "not a pinned root"),
        (VALID, {"now": NOW + timedelta(days=31)}, Reason.CERT_EXPIRED, "expired"),
        (VALID, {"now": NOW - timedelta(days=2)}, Reason.CERT_NOT_YET_VALID, "valid only"),
        (
            proof(MdaLeaf(freshness=b"\x00" * 32)),
            {},
            Reason.BINDING_MISMATCH,
            "freshness code is not",
        ),
        (
            proof(MdaLeaf(with_freshness=False)),
            {},
            Reason.BINDING_MISMATCH,
            "no freshness code",
        ),
        (proof(nonce=OTHER_NONCE), {}, Reason.BINDING_MISMATCH, "peer id"),
        (proof(signed=b"\x00" * 32), {}, Reason.BAD_SIGNATURE, "not signed"),
        (
            {**VALID, "sig": mda_sign(ec.generate_private_key(ec.SECP256R1()), DIGEST)},
            {},
            Reason.BAD_SIGNATURE,
            "not signed",
        ),
        ({**VALID, "sig": b"\x30\x00"}, {}, Reason.BAD_SIGNATURE, "not signed"),
    ],
    ids=[
        "wrong-root",
        "expired",
        "not-yet-valid",
        "freshness-mismatch",
        "no-freshness",
        "other-peer",
        "other-claims",
        "other-key",
        "garbage-signature",
    ],
)
def test_mda_reject_matrix(
    body: dict[str, object], ctx_changes: dict[str, object], reason: Reason, detail: str
) -> None:
    ctx = replace(make_ctx(CLAIMS, (CA.root,)), **ctx_changes)  # type: ignore[arg-type]
    reasons, text = run(body, ctx)
    assert reasons == {reason}, text
    assert detail in text


def test_a_chain_for_another_peer_is_refused_even_when_self_consistent() -> None:
    reasons, text = run(proof(nonce=OTHER_NONCE), make_ctx(CLAIMS, (CA.root,)))
    assert reasons == {Reason.BINDING_MISMATCH} and "freshness" not in text


def test_every_problem_is_reported_at_once() -> None:
    body = proof(MdaLeaf(freshness=b"\x01" * 32), nonce=OTHER_NONCE, signed=b"\x02" * 32)
    reasons, text = run(body, make_ctx(CLAIMS, (OTHER_CA.root,)))
    assert reasons == {Reason.WRONG_ROOT, Reason.BINDING_MISMATCH, Reason.BAD_SIGNATURE}
    assert "freshness" in text and "peer id" in text


@pytest.mark.parametrize(
    ("leaf", "posture"),
    [
        (MdaLeaf(), {"sip": True, "secure_boot": True}),
        (MdaLeaf(sip=b"\x02\x01\x01"), {"sip": False, "secure_boot": True}),
        (MdaLeaf(secure_boot=b"Reduced Security"), {"sip": True, "secure_boot": False}),
        (MdaLeaf(secure_boot=b"Permissive Security"), {"sip": True, "secure_boot": False}),
        (MdaLeaf(sip=None, secure_boot=None), {}),
        (MdaLeaf(sip=b"", secure_boot=b""), {}),
    ],
    ids=["full", "sip-off", "reduced", "permissive", "absent", "blank"],
)
def test_posture_is_read_from_the_oids(leaf: MdaLeaf, posture: dict[str, bool]) -> None:
    result = VERIFIER.verify(
        Evidence(KIND, CLAIMS.encode(), proof(leaf)), make_ctx(CLAIMS, (CA.root,))
    )
    assert result.refusals == ()
    assert dict(result.attested_posture) == posture


def _leaf(body: dict[str, object]) -> x509.Certificate:
    chain = body["chain"]
    assert isinstance(chain, list)
    return x509.load_der_x509_certificate(chain[0])


def test_every_documented_property_is_read() -> None:
    properties = read_properties(_leaf(proof(MdaLeaf(kexts=b"\x02\x01\x01"))))
    assert properties.serial == "C02TEST0DBLM"
    assert properties.udid == "00008112-000A1C2E3F4B5C6D"
    assert (properties.os_version, properties.sepos_version) == ("15.3.1", "24D70")
    assert properties.llb_version == "iBoot-11881.81.2"
    assert properties.sip is True and properties.secure_boot_level == "Full Security"
    assert properties.kexts_allowed is True
    assert properties.freshness == hashlib.sha256(NONCE).digest()
    assert read_properties(_leaf(VALID)).kexts_allowed is False
    bare = read_properties(_leaf(proof(MdaLeaf(serial=None, udid=b"", kexts=None))))
    assert (bare.serial, bare.udid, bare.kexts_allowed) == (None, None, None)


def test_without_a_serial_there_is_no_hardware_id() -> None:
    result = VERIFIER.verify(
        Evidence(KIND, CLAIMS.encode(), proof(MdaLeaf(serial=None))), make_ctx(CLAIMS, (CA.root,))
    )
    assert result.refusals == () and result.hardware_id is None and result.hardware_backed


@pytest.mark.parametrize(
    ("leaf", "detail"),
    [
        (MdaLeaf(sip=b"\x00"), "truncated"),
        (MdaLeaf(sip=b"\x01\x01\xff"), "tag 0x01, expected 0x02"),
        (MdaLeaf(sip=b"\x02\x01\x02"), "neither 0"),
        (MdaLeaf(sip=b"\x02\x02\x00\x01"), "not minimally"),
        (MdaLeaf(sip=b"\x02\x01\xff"), "negative"),
        (MdaLeaf(kexts=b"\x02\x05\x00"), "length does not match"),
        (MdaLeaf(kexts=b"\x02\x01\x00\x00"), "length does not match"),
        (MdaLeaf(kexts=b"\x02\x81\x01\x00"), "non-minimal length"),
        (MdaLeaf(kexts=b"\x02\x80\x00\x00"), "unsupported"),
        (MdaLeaf(secure_boot=b"Medium Security"), "not one Apple documents"),
        (MdaLeaf(serial=b"\xff\xfe"), "not UTF-8"),
        (MdaLeaf(udid=b"line\nbreak"), "printable"),
        (MdaLeaf(os_version=b"9" * 129), "printable"),
    ],
)
def test_malformed_oid_values_are_refused(leaf: MdaLeaf, detail: str) -> None:
    reasons, text = run(proof(leaf))
    assert reasons == {Reason.MALFORMED}, text
    assert detail in text


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({**VALID, "extra": b""}, "must be {chain, mda_nonce, sig}"),
        ({**VALID, "sig": "text"}, "must be {chain"),
        ({**VALID, "mda_nonce": b""}, "must be {chain"),
        ({**VALID, "sig": b"x" * 121}, "must be {chain"),
        ({**VALID, "chain": b"der"}, "[leaf, intermediate]"),
        ({**VALID, "chain": [b"\x30\x00", b"\x30\x00"]}, "not a readable certificate"),
        ({**VALID, "chain": VALID["chain"][:1]}, "[leaf, intermediate]"),  # type: ignore[index]
    ],
)
def test_malformed_proofs_are_named(body: dict[str, object], detail: str) -> None:
    reasons, text = run(body)
    assert reasons == {Reason.MALFORMED}, text
    assert detail in text


def test_a_leaf_key_off_the_nist_curves_is_malformed() -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    sig = key.sign(DIGEST, ec.ECDSA(hashes.SHA256()))
    body = {**proof(key=ec.generate_private_key(ec.SECP256R1())), "sig": sig}
    body["chain"] = MdaLeaf().chain(CA, key, NONCE)
    reasons, text = run(body)
    assert reasons == {Reason.MALFORMED} and "secp256k1" in text


def test_end_to_end_posture_conflict_is_flagged_by_the_policy() -> None:
    nonce = b"\x31" * 32
    claims = make_claims(nonce=nonce, posture=Posture(sip=True, secure_boot=True))
    digest = make_ctx(claims, ()).claims_digest
    now = datetime.now(UTC)
    leaf = MdaLeaf(
        sip=b"\x02\x01\x01", not_before=now - timedelta(hours=1), not_after=now + timedelta(hours=1)
    )
    body = {
        "chain": leaf.chain(CA, DEVICE_KEY, NONCE),
        "mda_nonce": NONCE,
        "sig": mda_sign(DEVICE_KEY, digest),
    }
    verdict = verify_evidence(
        Evidence(KIND, claims.encode(), body).encode(),
        policy=Policy(roots={KIND: (CA.root,)}, required_posture=frozenset({"sip"})),
        peer=NODE_KEY.peer_id,
        nonce=nonce,
        verifiers={KIND: MdaVerifier()},
        now=time.time(),
    )
    assert verdict.reasons == {Reason.POSTURE_MISMATCH, Reason.POSTURE}, verdict
    assert verdict.posture is not None and verdict.posture.sip is False
    assert verdict.hardware_id == "C02TEST0DBLM"


@given(st.dictionaries(st.text(max_size=12), st.binary(max_size=64) | st.lists(st.binary())))
def test_arbitrary_proofs_are_refused_never_raised(body: dict[str, object]) -> None:
    assert run(body)[0]


LEAF_DER = VALID["chain"][0]  # type: ignore[index]


# Hostile certificates make the parser warn (e.g. about a negative serial); expected.
@pytest.mark.filterwarnings("ignore::UserWarning")
@given(mutations(LEAF_DER))
def test_mutated_leaf_certificates_never_raise(der: bytes) -> None:
    body = {**VALID, "chain": [der, VALID["chain"][1]]}  # type: ignore[index]
    reasons, _ = run(body)
    assert reasons or der == LEAF_DER


def test_production_enterprise_root_is_apples() -> None:
    root = ENTERPRISE_ATTESTATION_ROOT
    der = root.public_bytes(serialization.Encoding.DER)
    assert fingerprint(root) == ENTERPRISE_ATTESTATION_ROOT_SHA256
    assert hashlib.sha256(der).hexdigest() == ENTERPRISE_ATTESTATION_ROOT_SHA256
    assert root.subject.rfc4514_string() == (
        "C=US,O=Apple Inc.,CN=Apple Enterprise Attestation Root CA"
    )
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert root.not_valid_before_utc == datetime(2022, 2, 16, 19, 1, 24, tzinfo=UTC)
    assert root.not_valid_after_utc == datetime(2047, 2, 20, tzinfo=UTC)
    assert production_roots()[KIND] == (root,)
