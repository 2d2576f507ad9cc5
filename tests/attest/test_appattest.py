"""App Attest: Apple's validation steps, each broken on its own and named in the refusal."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from apple_fixtures import (
    APP_ID,
    NODE_KEY,
    NONCE_OID,
    NOW,
    Attestation,
    FakeCA,
    assertion,
    key_id_of,
    make_ca,
    make_claims,
    make_ctx,
    point,
    sibling_intermediate,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st

from dbloom.attest import Evidence, Policy, Reason, VerifierState, VerifyContext, verify_evidence
from dbloom.attest._appattest import (
    AAGUID_DEVELOPMENT,
    KIND,
    MAX_CBOR,
    AppAttestVerifier,
)
from dbloom.attest._apple_roots import (
    APP_ATTEST_ROOT,
    APP_ATTEST_ROOT_PEM,
    ENTERPRISE_ATTESTATION_ROOT_SHA256,
    PinnedRootMismatch,
    load_pinned,
    production_roots,
)
from dbloom.attest._certs import fingerprint

CA = make_ca()
OTHER_CA = make_ca("Impostor")
KEY = ec.generate_private_key(ec.SECP256R1())
KEY_ID = key_id_of(KEY)
CLAIMS = make_claims()
VERIFIER = AppAttestVerifier()
GOOD = Attestation()


def attest_proof(
    attestation: Attestation = GOOD,
    digest: bytes | None = None,
    ca: FakeCA = CA,
    key_id: bytes = KEY_ID,
) -> dict[str, bytes]:
    ctx_digest = make_ctx(CLAIMS, ()).claims_digest
    raw = attestation.build(ca, KEY, ctx_digest if digest is None else digest)
    return {"attestation": raw, "key_id": key_id}


def run(proof: dict[str, object], ctx: VerifyContext | None = None) -> tuple[set[Reason], str]:
    result = VERIFIER.verify(
        Evidence(KIND, CLAIMS.encode(), proof), ctx or make_ctx(CLAIMS, (CA.root,))
    )
    return {r.reason for r in result.refusals}, "; ".join(map(str, result.refusals))


VALID = attest_proof()


def test_valid_attestation_is_accepted_and_remembered() -> None:
    ctx = make_ctx(CLAIMS, (CA.root,))
    result = VERIFIER.verify(Evidence(KIND, CLAIMS.encode(), VALID), ctx)
    assert result.refusals == () and result.hardware_backed
    assert result.hardware_id == KEY_ID.hex()
    assert ctx.state.app_attest_keys[KEY_ID] == point(KEY)
    assert ctx.state.app_attest_counters[KEY_ID] == 0


def test_development_aaguid_is_accepted_only_when_allowed() -> None:
    proof = attest_proof(Attestation(aaguid=AAGUID_DEVELOPMENT))
    assert run(proof)[0] == {Reason.AAGUID_MISMATCH}
    allowed = make_ctx(CLAIMS, (CA.root,), allow_development_aaguid=True)
    assert run(proof, allowed)[0] == set()


LATER = NOW + timedelta(days=31)
EARLIER = NOW - timedelta(days=2)


@pytest.mark.parametrize(
    ("proof", "ctx_changes", "reason", "detail"),
    [
        (VALID, {"roots": (OTHER_CA.root,)}, Reason.WRONG_ROOT, "not a pinned root"),
        (VALID, {"roots": ()}, Reason.WRONG_ROOT, "trusts no root"),
        (VALID, {"now": LATER}, Reason.CERT_EXPIRED, "leaf certificate expired"),
        (VALID, {"now": EARLIER}, Reason.CERT_NOT_YET_VALID, "valid only from"),
        (attest_proof(digest=b"\x00" * 32), {}, Reason.BINDING_MISMATCH, "nonce does not bind"),
        (attest_proof(Attestation(with_nonce=False)), {}, Reason.BINDING_MISMATCH, "no nonce"),
        (attest_proof(Attestation(app_id="ZZZ.evil")), {}, Reason.APP_ID_MISMATCH, "another app"),
        (VALID, {"app_ids": frozenset()}, Reason.APP_ID_MISMATCH, "names no app id"),
        (VALID, {"app_ids": frozenset({"X.y"})}, Reason.APP_ID_MISMATCH, "another app id"),
        (
            attest_proof(Attestation(aaguid=AAGUID_DEVELOPMENT)),
            {},
            Reason.AAGUID_MISMATCH,
            "development",
        ),
        (
            attest_proof(Attestation(aaguid=b"somethingelse123")),
            {},
            Reason.AAGUID_MISMATCH,
            "not App Attest",
        ),
        (attest_proof(Attestation(counter=1)), {}, Reason.COUNTER, "counter is 1"),
        (attest_proof(key_id=b"\x01" * 32), {}, Reason.BINDING_MISMATCH, "not the attested key"),
        (
            attest_proof(Attestation(credential_id=b"\x02" * 32)),
            {},
            Reason.BINDING_MISMATCH,
            "credential id",
        ),
        (
            attest_proof(Attestation(cose_for=ec.generate_private_key(ec.SECP256R1()))),
            {},
            Reason.BINDING_MISMATCH,
            "another public key",
        ),
        (attest_proof(ca=OTHER_CA), {}, Reason.WRONG_ROOT, "not a pinned root"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_attestation_reject_matrix(
    proof: dict[str, bytes], ctx_changes: dict[str, object], reason: Reason, detail: str
) -> None:
    ctx = replace(make_ctx(CLAIMS, (CA.root,)), **ctx_changes)  # type: ignore[arg-type]
    reasons, text = run(proof, ctx)
    assert reasons == {reason}, text
    assert detail in text
    assert KEY_ID not in ctx.state.app_attest_keys


def _with_intermediate(der: bytes) -> dict[str, object]:
    body = cbor2.loads(VALID["attestation"])
    body["attStmt"]["x5c"][1] = der
    return {"attestation": cbor2.dumps(body), "key_id": KEY_ID}


def test_a_leaf_not_signed_by_its_intermediate_is_a_bad_chain() -> None:
    impostor = sibling_intermediate(CA).public_bytes(serialization.Encoding.DER)
    reasons, text = run(_with_intermediate(impostor))
    assert reasons == {Reason.BAD_CHAIN} and "not signed by certificate 1" in text


def test_every_problem_is_reported_at_once() -> None:
    proof = attest_proof(Attestation(app_id="Q.q", counter=7), digest=b"\x09" * 32)
    ctx = make_ctx(CLAIMS, (CA.root,), now=LATER)
    reasons, _ = run(proof, ctx)
    assert reasons == {
        Reason.CERT_EXPIRED,
        Reason.BINDING_MISMATCH,
        Reason.APP_ID_MISMATCH,
        Reason.COUNTER,
    }


def _cbor_attestation(**changes: object) -> bytes:
    body = cbor2.loads(VALID["attestation"])
    body.update(changes)
    return cbor2.dumps(body)


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"", "not valid CBOR"),
        (b"\xff" * 10, "not valid CBOR"),
        (VALID["attestation"] + b"\x00", "trailing bytes"),
        (cbor2.dumps(cbor2.CBORTag(55799, cbor2.loads(VALID["attestation"]))), "semantic tag"),
        (cbor2.dumps(cbor2.CBORTag(1234, 1)), "semantic tag"),
        (b"\xbf" + VALID["attestation"][1:], "not valid CBOR"),
        (cbor2.dumps([1, 2]), "must be a map"),
        (_cbor_attestation(fmt="packed"), "apple-appattest"),
        (_cbor_attestation(fmt=b"apple-appattest"), "fmt must be str"),
        (_cbor_attestation(extra=1), "must be a map of exactly"),
        (_cbor_attestation(attStmt={"x5c": []}), "attStmt must be a map"),
        (_cbor_attestation(attStmt={"x5c": [b"\x30"], "receipt": b""}), "[leaf, intermediate]"),
        (
            _cbor_attestation(attStmt={"x5c": [b"\x30", b"\x30"], "receipt": b""}),
            "not a readable certificate",
        ),
        (_cbor_attestation(authData=b"\x00" * 36), "too short"),
        (_cbor_attestation(authData=b"\x00" * 37), "lacks attested credential"),
        (_cbor_attestation(authData=b"\x00" * 32 + b"\xc0" + b"\x00" * 60), "extensions"),
        (_cbor_attestation(authData=b"\x00" * 32 + b"\x40" + b"\x00" * 20), "truncated"),
        (
            _cbor_attestation(authData=b"\x00" * 32 + b"\x40" + b"\x00" * 20 + b"\xff\xff"),
            "runs past",
        ),
        ("not bytes", "must be bytes"),
    ],
)
def test_malformed_attestations_are_named(raw: object, detail: str) -> None:
    reasons, text = run({"attestation": raw, "key_id": KEY_ID})
    assert reasons == {Reason.MALFORMED}, text
    assert detail in text


def test_bad_nonce_extension_is_malformed() -> None:
    leaf = CA.issue(KEY.public_key(), [(NONCE_OID, b"\x30\x80\x00\x00")])
    body = cbor2.loads(VALID["attestation"])
    body["attStmt"]["x5c"][0] = leaf.public_bytes(serialization.Encoding.DER)
    reasons, text = run({"attestation": cbor2.dumps(body), "key_id": KEY_ID})
    assert Reason.MALFORMED in reasons and "length" in text


def test_oversized_and_odd_proofs_are_refused() -> None:
    assert run({"attestation": b"\xa0" * (MAX_CBOR + 1), "key_id": KEY_ID})[0] == {Reason.OVERSIZED}
    assert run({"attestation": VALID["attestation"], "key_id": b"short"})[0] == {Reason.MALFORMED}
    assert run({"attestation": VALID["attestation"], "key_id": KEY_ID, "x": 1})[0] == {
        Reason.MALFORMED
    }


def _attested_ctx(**changes: object) -> VerifyContext:
    ctx = make_ctx(CLAIMS, (CA.root,), **changes)  # type: ignore[arg-type]
    assert run(VALID, ctx)[0] == set()
    return ctx


def _assert_proof(raw: bytes, key_id: bytes = KEY_ID) -> dict[str, object]:
    return {"assertion": raw, "key_id": key_id}


def test_assertions_must_count_up() -> None:
    ctx = _attested_ctx()
    digest = ctx.claims_digest
    assert run(_assert_proof(assertion(KEY, digest, 1)), ctx)[0] == set()
    assert ctx.state.app_attest_counters[KEY_ID] == 1
    reasons, text = run(_assert_proof(assertion(KEY, digest, 1)), ctx)
    assert reasons == {Reason.COUNTER} and "not above 1" in text
    assert run(_assert_proof(assertion(KEY, digest, 5)), ctx)[0] == set()
    assert run(_assert_proof(assertion(KEY, digest, 3)), ctx)[0] == {Reason.COUNTER}
    assert ctx.state.app_attest_counters[KEY_ID] == 5


def test_a_key_that_asserted_cannot_be_attested_again() -> None:
    ctx = _attested_ctx()
    assert run(_assert_proof(assertion(KEY, ctx.claims_digest, 1)), ctx)[0] == set()
    reasons, text = run(VALID, ctx)
    assert reasons == {Reason.COUNTER} and "re-attest" in text


@pytest.mark.parametrize(
    ("make", "reason", "detail"),
    [
        (
            lambda d: assertion(KEY, d, 1, signer=ec.generate_private_key(ec.SECP256R1())),
            Reason.BAD_SIGNATURE,
            "not signed",
        ),
        (lambda d: assertion(KEY, b"\x00" * 32, 1), Reason.BAD_SIGNATURE, "not signed"),
        (lambda d: assertion(KEY, d, 0), Reason.COUNTER, "not above 0"),
        (lambda d: assertion(KEY, d, 1, app_id="Z.z"), Reason.APP_ID_MISMATCH, "another app"),
    ],
    ids=["foreign-signer", "other-claims", "counter-zero", "app-id"],
)
def test_assertion_reject_matrix(make, reason: Reason, detail: str) -> None:  # type: ignore[no-untyped-def]
    ctx = _attested_ctx()
    reasons, text = run(_assert_proof(make(ctx.claims_digest)), ctx)
    assert reasons == {reason}, text
    assert detail in text
    assert ctx.state.app_attest_counters[KEY_ID] == 0


def test_assertion_for_an_unknown_key_asks_for_attestation() -> None:
    ctx = make_ctx(CLAIMS, (CA.root,))
    reasons, text = run(_assert_proof(assertion(KEY, ctx.claims_digest, 1)), ctx)
    assert reasons == {Reason.BINDING_MISMATCH} and "unknown key id; attest first" in text


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (cbor2.dumps({"signature": b"x", "authenticatorData": b"\x00" * 38}), "exactly 37"),
        (cbor2.dumps({"signature": b"", "authenticatorData": b"\x00" * 37}), "signature must"),
        (cbor2.dumps({"signature": b"x" * 81, "authenticatorData": b"\x00" * 37}), "signature"),
        (cbor2.dumps({"signature": b"x"}), "exactly authenticatorData, signature"),
        (cbor2.dumps({"signature": "x", "authenticatorData": b"\x00" * 37}), "must be bytes"),
    ],
)
def test_malformed_assertions_are_named(raw: bytes, detail: str) -> None:
    reasons, text = run(_assert_proof(raw), _attested_ctx())
    assert reasons == {Reason.MALFORMED}, text
    assert detail in text


def test_garbage_signature_is_a_bad_signature() -> None:
    ctx = _attested_ctx()
    body = cbor2.loads(assertion(KEY, ctx.claims_digest, 1))
    body["signature"] = b"\x30\x02\x00\x00"
    assert run(_assert_proof(cbor2.dumps(body)), ctx)[0] == {Reason.BAD_SIGNATURE}


@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_never_raised(raw: bytes) -> None:
    for proof in ({"attestation": raw, "key_id": KEY_ID}, _assert_proof(raw)):
        reasons, _ = run(proof, _attested_ctx())
        assert reasons and reasons <= {Reason.MALFORMED, Reason.OVERSIZED}


FLAGS_AT = VALID["attestation"].index(cbor2.loads(VALID["attestation"])["authData"]) + 32


# Hostile certificates make the parser warn (e.g. about a negative serial); expected.
@pytest.mark.filterwarnings("ignore::UserWarning")
@given(mutations(VALID["attestation"]))
def test_mutated_attestations_never_raise(raw: bytes) -> None:
    reasons, text = run({"attestation": raw, "key_id": KEY_ID})
    if not reasons:
        changed = [
            i for i, (a, b) in enumerate(zip(raw, VALID["attestation"], strict=False)) if a != b
        ]
        unchecked_flag_bits = changed == [FLAGS_AT] and not (raw[FLAGS_AT] ^ 0x40) & 0xC0
        assert len(raw) == len(VALID["attestation"]) and changed in ([], [FLAGS_AT]), text
        assert unchecked_flag_bits or not changed


VALID_ASSERTION = assertion(KEY, make_ctx(CLAIMS, ()).claims_digest, 1)


@given(mutations(VALID_ASSERTION))
def test_mutated_assertions_never_raise(raw: bytes) -> None:
    reasons, _ = run(_assert_proof(raw), _attested_ctx())
    assert reasons or raw == VALID_ASSERTION


def test_end_to_end_through_the_policy() -> None:
    nonce = b"\x42" * 32
    claims = make_claims(nonce=nonce)
    digest = make_ctx(claims, ()).claims_digest
    now = datetime.now(UTC)
    window = Attestation(not_before=now - timedelta(hours=1), not_after=now + timedelta(hours=1))
    policy = Policy(roots={KIND: (CA.root,)}, app_ids=frozenset({APP_ID}))
    state = VerifierState()

    def judge(proof: dict[str, object]) -> set[Reason]:
        verdict = verify_evidence(
            Evidence(KIND, claims.encode(), proof).encode(),
            policy=policy,
            peer=NODE_KEY.peer_id,
            nonce=nonce,
            verifiers={KIND: AppAttestVerifier()},
            state=state,
            now=time.time(),
        )
        assert verdict.trusted or verdict.refusals
        return set(verdict.reasons)

    assert judge({"attestation": window.build(CA, KEY, digest), "key_id": KEY_ID}) == set()
    assert judge(_assert_proof(assertion(KEY, digest, 1))) == set()
    assert judge(_assert_proof(assertion(KEY, digest, 1))) == {Reason.COUNTER}
    other_app_policy = replace(policy, app_ids=frozenset({"other.app"}))
    verdict = verify_evidence(
        Evidence(KIND, claims.encode(), _assert_proof(assertion(KEY, digest, 2))).encode(),
        policy=other_app_policy,
        peer=NODE_KEY.peer_id,
        nonce=nonce,
        verifiers={KIND: AppAttestVerifier()},
        state=state,
    )
    assert verdict.reasons == {Reason.APP_ID_MISMATCH}


def test_production_app_attest_root_is_apples() -> None:
    root = APP_ATTEST_ROOT
    der = root.public_bytes(serialization.Encoding.DER)
    assert fingerprint(root) == hashlib.sha256(der).hexdigest()
    assert root.subject.rfc4514_string() == (
        "ST=California,O=Apple Inc.,CN=Apple App Attestation Root CA"
    )
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert isinstance(root.signature_hash_algorithm, hashes.SHA384)
    assert root.not_valid_before_utc == datetime(2020, 3, 18, 18, 32, 53, tzinfo=UTC)
    assert root.not_valid_after_utc == datetime(2045, 3, 15, tzinfo=UTC)
    assert production_roots()[KIND] == (root,)


def test_a_root_that_does_not_match_its_pin_refuses_to_load() -> None:
    with pytest.raises(PinnedRootMismatch, match="was altered"):
        load_pinned(APP_ATTEST_ROOT_PEM, ENTERPRISE_ATTESTATION_ROOT_SHA256, "App Attest root")
