"""The `tpm2` kind without a TPM: strict parsers, and quotes signed by software keys."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache

import pytest
from attest_helpers import fresh_nonce, make_claims
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st

from dbloom.attest._certs import fingerprint
from dbloom.attest._evidence import Claims, Evidence, claims_digest
from dbloom.attest._kinds import KindResult, VerifierState, VerifyContext
from dbloom.attest._policy import Policy, verify_evidence
from dbloom.attest._refusal import Reason
from dbloom.attest._tpm import (
    TPM_ALG_ECDSA,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SHA256,
    ClockInfo,
    PcrSelection,
    TpmDecodeError,
    TpmVerifier,
    parse_attest,
    parse_signature,
    quoted_pcrs,
)
from dbloom.p2p import KeyPair

SHA1 = 0x0004
SIGNER = b"\x00\x0b" + bytes(range(32))
NOW = datetime.now(UTC)
KEY = KeyPair.from_seed(b"t" * 32)
PCRS = {i: hashlib.sha256(bytes([i])).digest() for i in (0, 1, 2, 3, 4, 5, 6, 7, 16)}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# --- hand-built TPM structures -------------------------------------------------------------


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def selection(banks: Sequence[tuple[int, Sequence[int]]], size: int = 3) -> bytes:
    out = struct.pack(">I", len(banks))
    for alg, pcrs in banks:
        bitmap = bytearray(size)
        for i in pcrs:
            bitmap[i // 8] |= 1 << (i % 8)
        out += struct.pack(">HB", alg, size) + bytes(bitmap)
    return out


def attest(
    extra: bytes,
    pcrs: Sequence[int] = tuple(PCRS),
    digest: bytes | None = None,
    *,
    magic: int = 0xFF544347,
    st_type: int = 0x8018,
    banks: Sequence[tuple[int, Sequence[int]]] | None = None,
) -> bytes:
    if digest is None:
        digest = hashlib.sha256(b"".join(PCRS[i] for i in sorted(pcrs))).digest()
    return (
        struct.pack(">IH", magic, st_type)
        + tpm2b(SIGNER)
        + tpm2b(extra)
        + struct.pack(">QIIB", 123456, 7, 2, 1)
        + struct.pack(">Q", 0x2019102300163636)
        + selection(banks if banks is not None else [(TPM_ALG_SHA256, pcrs)])
        + tpm2b(digest)
    )


def ecdsa_sig(r: int, s: int, hash_alg: int = TPM_ALG_SHA256) -> bytes:
    return (
        struct.pack(">HH", TPM_ALG_ECDSA, hash_alg) + tpm2b(r.to_bytes(32)) + tpm2b(s.to_bytes(32))
    )


def sign(key: PrivateKey, message: bytes, alg: int) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ecdsa_sig(*decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256()))))
    if alg == TPM_ALG_RSAPSS:
        pad: padding.AsymmetricPadding = padding.PSS(
            mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
        )
    else:
        pad = padding.PKCS1v15()
    value = key.sign(message, pad, hashes.SHA256())
    return struct.pack(">HH", alg, TPM_ALG_SHA256) + tpm2b(value)


# --- a test PKI ----------------------------------------------------------------------------


def name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    issuer: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    *,
    ca: bool,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=30),
) -> x509.Certificate:
    """A certificate for `public_key`, self-signed when `issuer` is None."""
    return (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer.subject if issuer else name(subject))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    def issue(
        self, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, **validity: datetime
    ) -> x509.Certificate:
        """An AK certificate from the intermediate CA."""
        return certificate(
            "test AK", public_key, self.intermediate, self.intermediate_key, ca=False, **validity
        )


def make_pki(label: str) -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = certificate(f"{label} root", root_key.public_key(), None, root_key, ca=True)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = certificate(f"{label} intermediate", inter_key.public_key(), root, root_key, ca=True)
    return Pki(root, root_key, inter, inter_key)


@cache
def pki() -> Pki:
    return make_pki("test")


@cache
def ak_key(kind: str) -> PrivateKey:
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


ALGS = {"ecdsa": TPM_ALG_ECDSA, "rsassa": TPM_ALG_RSASSA, "rsapss": TPM_ALG_RSAPSS}


@dataclass(frozen=True)
class Case:
    """One synthetic `tpm2` evidence and the context a client would verify it in."""

    evidence: Evidence
    ctx: VerifyContext
    ak_cert: x509.Certificate

    def verify(self, **proof_changes: object) -> KindResult:
        evidence = replace(self.evidence, proof={**self.evidence.proof, **proof_changes})
        return TpmVerifier().verify(evidence, self.ctx)

    def reasons(self, **proof_changes: object) -> set[Reason]:
        return {r.reason for r in self.verify(**proof_changes).refusals}


def make_case(
    scheme: str = "ecdsa",
    *,
    claims: Claims | None = None,
    extra: bytes | None = None,
    quote: bytes | None = None,
    cert: x509.Certificate | None = None,
    signer: PrivateKey | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> Case:
    claims = claims or make_claims(KEY, fresh_nonce())
    claims_bytes = claims.encode()
    digest = claims_digest(claims_bytes)
    key = ak_key(scheme)
    cert = cert or pki().issue(key.public_key())
    quote = quote or attest(digest if extra is None else extra)
    proof = {
        "quote": quote,
        "sig": sign(signer or key, quote, ALGS[scheme]),
        "pcrs": {str(i): v for i, v in PCRS.items()},
        "chain": [cert.public_bytes(Encoding.DER), pki().intermediate.public_bytes(Encoding.DER)],
    }
    ctx = VerifyContext(
        claims=claims,
        claims_digest=digest,
        roots=(pki().root,) if roots is None else roots,
        now=NOW,
        state=VerifierState(),
    )
    return Case(Evidence(kind="tpm2", claims_bytes=claims_bytes, proof=proof), ctx, cert)


@cache
def valid_case() -> Case:
    return make_case()


# --- parsers ------------------------------------------------------------------------------


def test_parse_attest_reads_every_field() -> None:
    quote = parse_attest(attest(b"\xaa" * 32, (0, 7, 16), b"\xbb" * 32))
    assert quote.qualified_signer == SIGNER
    assert quote.extra_data == b"\xaa" * 32
    assert quote.clock_info == ClockInfo(clock=123456, reset_count=7, restart_count=2, safe=True)
    assert quote.firmware_version == 0x2019102300163636
    assert quote.pcr_select == (PcrSelection(TPM_ALG_SHA256, (0, 7, 16)),)
    assert quote.pcr_digest == b"\xbb" * 32


def test_parse_attest_reads_several_banks_in_order() -> None:
    quote = parse_attest(attest(b"", banks=[(SHA1, (1, 2)), (TPM_ALG_SHA256, (23, 0))]))
    assert quote.pcr_select == (PcrSelection(SHA1, (1, 2)), PcrSelection(TPM_ALG_SHA256, (0, 23)))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (attest(b"", magic=0xFF544348), "magic"),
        (attest(b"", st_type=0x8017), "TPM_ST_ATTEST_QUOTE"),
        (attest(b"") + b"\x00", "trailing"),
        (attest(b"")[:-1], "truncated"),
        (attest(b"\x00" * 67), "extraData is 67 bytes"),
        (attest(b"", banks=[(TPM_ALG_SHA256, ())] * 17), "17 PCR banks"),
        (attest(b"").replace(b"\x00\x0b\x03", b"\x00\x0b\x05", 1), "sizeofSelect"),
        (attest(b"").replace(struct.pack(">IIB", 7, 2, 1), struct.pack(">IIB", 7, 2, 2)), "safe"),
        (b"", "truncated"),
        ("not bytes", "must be bytes"),
    ],
)
def test_parse_attest_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(TpmDecodeError, match=message):
        parse_attest(raw)


def test_every_truncation_of_a_quote_is_refused() -> None:
    raw = attest(b"\x01" * 32)
    for end in range(len(raw)):
        with pytest.raises(TpmDecodeError):
            parse_attest(raw[:end])


def test_parse_signature_ecdsa_and_rsa() -> None:
    sig = parse_signature(ecdsa_sig(5, 7))
    assert (sig.alg, sig.hash_alg) == (TPM_ALG_ECDSA, TPM_ALG_SHA256)
    assert decode_dss_signature(sig.value) == (5, 7)
    for alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        sig = parse_signature(struct.pack(">HH", alg, TPM_ALG_SHA256) + tpm2b(b"\x42" * 256))
        assert (sig.alg, sig.value) == (alg, b"\x42" * 256)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack(">HH", 0x0005, TPM_ALG_SHA256) + tpm2b(b"x"), "not RSASSA, RSAPSS or ECDSA"),
        (ecdsa_sig(1, 1, hash_alg=0x000C), "not SHA-256"),
        (ecdsa_sig(1, 1) + b"\x00", "trailing"),
        (ecdsa_sig(1, 1)[:-1], "truncated"),
        (struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA256) + tpm2b(b"\x01" * 67), "above 66"),
        (struct.pack(">HH", TPM_ALG_RSASSA, TPM_ALG_SHA256) + tpm2b(b"\x01" * 513), "above 512"),
        (b"\x00", "truncated"),
        (None, "must be bytes"),
    ],
)
def test_parse_signature_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(TpmDecodeError, match=message):
        parse_signature(raw)


@given(st.binary(max_size=512))
def test_parsers_raise_only_decode_errors(raw: bytes) -> None:
    for parse in (parse_attest, parse_signature):
        with contextlib.suppress(TpmDecodeError):
            parse(raw)


# --- the verifier ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["ecdsa", "rsassa", "rsapss"])
def test_accepts_a_quote_signed_by_a_certified_ak(scheme: str) -> None:
    case = make_case(scheme)
    result = case.verify()
    assert result.refusals == ()
    assert result.hardware_backed
    assert result.hardware_id == fingerprint(case.ak_cert)


def test_quoted_pcrs_gives_the_values_in_quote_order() -> None:
    assert quoted_pcrs(valid_case().evidence) == PCRS
    assert list(quoted_pcrs(valid_case().evidence)) == sorted(PCRS)


def test_quoted_pcrs_refuses_values_the_quote_does_not_cover() -> None:
    evidence = valid_case().evidence
    pcrs = {**evidence.proof["pcrs"], "0": b"\x00" * 32}
    with pytest.raises(TpmDecodeError, match="pcrDigest"):
        quoted_pcrs(replace(evidence, proof={**evidence.proof, "pcrs": pcrs}))


def test_through_the_policy_judge() -> None:
    nonce = fresh_nonce()
    case = make_case(claims=make_claims(KEY, nonce))
    policy = Policy(allowed_kinds=frozenset({"tpm2"}), roots={"tpm2": (pki().root,)})
    raw = case.evidence.encode()

    def judge(nonce: bytes) -> frozenset[Reason]:
        verdict = verify_evidence(
            raw, policy=policy, peer=KEY.peer_id, nonce=nonce, verifiers={"tpm2": TpmVerifier()}
        )
        assert verdict.accepted == (not verdict.reasons)
        assert verdict.trusted == verdict.accepted
        return verdict.reasons

    assert judge(nonce) == frozenset()
    assert judge(fresh_nonce()) == {Reason.NONCE_MISMATCH}


def test_wrong_root() -> None:
    case = make_case(roots=(make_pki("other").root,))
    assert case.reasons() == {Reason.WRONG_ROOT}


def test_no_root_for_the_kind() -> None:
    assert make_case(roots=()).reasons() == {Reason.WRONG_ROOT}


@pytest.mark.parametrize(
    ("validity", "reason"),
    [
        ({"not_after": NOW - timedelta(seconds=1)}, Reason.CERT_EXPIRED),
        ({"not_before": NOW + timedelta(hours=1)}, Reason.CERT_NOT_YET_VALID),
    ],
)
def test_ak_certificate_validity(validity: dict[str, datetime], reason: Reason) -> None:
    cert = pki().issue(ak_key("ecdsa").public_key(), **validity)
    assert make_case(cert=cert).reasons() == {reason}


def test_ak_certificate_not_issued_by_the_chain() -> None:
    other = make_pki("other")
    cert = other.issue(ak_key("ecdsa").public_key())
    assert make_case(cert=cert).reasons() == {Reason.BAD_CHAIN}


def test_replayed_quote_for_other_claims_is_a_binding_mismatch() -> None:
    assert make_case(extra=b"\x00" * 32).reasons() == {Reason.BINDING_MISMATCH}
    assert make_case(extra=b"").reasons() == {Reason.BINDING_MISMATCH}


def test_pcr_value_not_covered_by_the_digest() -> None:
    case = valid_case()
    pcrs = {**case.evidence.proof["pcrs"], "7": b"\xff" * 32}
    assert case.reasons(pcrs=pcrs) == {Reason.BINDING_MISMATCH}


@pytest.mark.parametrize(
    "pcrs",
    [
        {str(i): PCRS[i] for i in (0, 1)},
        {**{str(i): v for i, v in PCRS.items()}, "8": b"\x00" * 32},
    ],
)
def test_pcr_set_differs_from_the_selection(pcrs: dict[str, bytes]) -> None:
    assert valid_case().reasons(pcrs=pcrs) == {Reason.BINDING_MISMATCH}


def test_pcr_digest_in_the_quote_differs() -> None:
    claims = make_claims(KEY, fresh_nonce())
    quote = attest(claims_digest(claims.encode()), digest=hashlib.sha256(b"other").digest())
    assert make_case(claims=claims, quote=quote).reasons() == {Reason.BINDING_MISMATCH}


def test_quote_over_another_bank() -> None:
    claims = make_claims(KEY, fresh_nonce())
    quote = attest(claims_digest(claims.encode()), banks=[(SHA1, tuple(PCRS))])
    assert make_case(claims=claims, quote=quote).reasons() == {Reason.BINDING_MISMATCH}


def test_signature_by_another_key() -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    assert make_case(signer=stranger).reasons() == {Reason.BAD_SIGNATURE}


def test_signature_algorithm_differs_from_the_ak_key() -> None:
    case = make_case("rsassa")
    ecdsa = sign(ak_key("ecdsa"), case.evidence.proof["quote"], TPM_ALG_ECDSA)
    assert case.reasons(sig=ecdsa) == {Reason.BAD_SIGNATURE}


def test_correctly_signed_non_quote_is_malformed() -> None:
    claims = make_claims(KEY, fresh_nonce())
    digest = claims_digest(claims.encode())
    for quote in (attest(digest, magic=0x12345678), attest(digest, st_type=0x8014)):
        assert make_case(claims=claims, quote=quote).reasons() == {Reason.MALFORMED}


def test_tampered_quote_byte_is_a_bad_signature() -> None:
    case = valid_case()
    quote = bytearray(case.evidence.proof["quote"])
    quote[20] ^= 1
    assert case.reasons(quote=bytes(quote)) == {Reason.BAD_SIGNATURE}


def test_every_problem_is_reported() -> None:
    cert = pki().issue(ak_key("ecdsa").public_key(), not_after=NOW - timedelta(days=1))
    stranger = ec.generate_private_key(ec.SECP256R1())
    case = make_case(cert=cert, signer=stranger, extra=b"\x01" * 32)
    assert case.reasons() == {Reason.CERT_EXPIRED, Reason.BAD_SIGNATURE, Reason.BINDING_MISMATCH}


@pytest.mark.parametrize(
    "changes",
    [
        {"quote": "text"},
        {"sig": 5},
        {"pcrs": [b"\x00" * 32]},
        {"pcrs": {0: b"\x00" * 32}},
        {"pcrs": {"00": b"\x00" * 32}},
        {"pcrs": {"٣": b"\x00" * 32}},
        {"pcrs": {"32": b"\x00" * 32}},
        {"pcrs": {"9" * 5000: b"\x00" * 32}},
        {"pcrs": {"": b"\x00" * 32}},
        {"pcrs": {b"0": b"\x00" * 32}},
        {"pcrs": {"0": b"\x00" * 31}},
        {"chain": []},
        {"chain": [b"not a certificate"]},
        {"chain": b"\x30"},
    ],
)
def test_malformed_proof_fields(changes: dict[str, object]) -> None:
    assert Reason.MALFORMED in valid_case().reasons(**changes)


@pytest.mark.parametrize(
    ("index", "old", "new"),
    [
        (0, b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x39"),  # X.509 version 58
        (1, b"\x30\x03\x01\x01\xff", b"\x30\x03\x01\x01\x01"),  # non-DER boolean: CA
    ],
)
def test_certificates_that_fail_when_read_lazily(index: int, old: bytes, new: bytes) -> None:
    case = valid_case()
    chain = list(case.evidence.proof["chain"])
    assert old in chain[index]
    chain[index] = chain[index].replace(old, new, 1)
    assert case.reasons(chain=chain) == {Reason.MALFORMED}


def test_proof_with_missing_or_extra_fields() -> None:
    case = valid_case()
    proof = dict(case.evidence.proof)
    del proof["pcrs"]
    for bad in (proof, {**case.evidence.proof, "extra": b""}):
        result = TpmVerifier().verify(replace(case.evidence, proof=bad), case.ctx)
        assert {r.reason for r in result.refusals} == {Reason.MALFORMED}
        assert not result.hardware_backed


# --- hostile input --------------------------------------------------------------------------


def _valid_proof_field(key: str) -> bytes:
    value = valid_case().evidence.proof[key]
    assert isinstance(value, bytes)
    return value


@given(mutations(_valid_proof_field("quote")))
def test_mutated_quotes_are_refused(quote: bytes) -> None:
    result = valid_case().verify(quote=quote)
    assert result.refusals or quote == valid_case().evidence.proof["quote"]


@given(mutations(_valid_proof_field("sig")))
def test_mutated_signatures_are_refused(sig: bytes) -> None:
    result = valid_case().verify(sig=sig)
    assert result.refusals or sig == valid_case().evidence.proof["sig"]


@given(mutations(valid_case().evidence.proof["chain"][0]))
def test_mutated_ak_certificates_are_refused(der: bytes) -> None:
    chain = valid_case().evidence.proof["chain"]
    result = valid_case().verify(chain=[der, *chain[1:]])
    assert result.refusals or der == chain[0]


@given(st.dictionaries(st.integers(0, 40).map(str), st.binary(min_size=30, max_size=34)))
def test_arbitrary_pcr_maps_are_refused(pcrs: dict[str, bytes]) -> None:
    assert valid_case().verify(pcrs=pcrs).refusals


PROOF_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.binary(max_size=64) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["quote", "sig", "pcrs", "chain", "x"]), PROOF_VALUES))
def test_arbitrary_proofs_are_refused(proof: dict[str, object]) -> None:
    case = valid_case()
    result = TpmVerifier().verify(replace(case.evidence, proof=proof), case.ctx)
    assert result.refusals
    assert not result.hardware_backed


@given(mutations(valid_case().evidence.encode()))
def test_mutated_evidence_never_crashes_the_judge(raw: bytes) -> None:
    case = valid_case()
    verdict = verify_evidence(
        raw,
        policy=Policy(allowed_kinds=frozenset({"tpm2"}), roots={"tpm2": (pki().root,)}),
        peer=KEY.peer_id,
        nonce=case.ctx.claims.nonce,
        verifiers={"tpm2": TpmVerifier()},
    )
    assert not verdict.accepted or raw == case.evidence.encode()
