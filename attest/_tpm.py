"""`tpm2` evidence: a TPM 2.0 quote whose qualifying data is the claims digest.

A TPM signs a quote (`TPMS_ATTEST`) with an attestation key (AK) that never leaves it;
a restricted AK refuses to sign anything that starts with `TPM_GENERATED_VALUE` unless the
TPM produced it. The quote's `extraData` carries `claims_digest(claims)`, which already
covers the client's nonce, so the claims are bound to this TPM now, and its PCR digest
binds the PCR values the node sends along. The AK certificate chain says which TPM it is.

Proof (msgpack map):

    {"quote": bin (TPMS_ATTEST), "sig": bin (TPMT_SIGNATURE),
     "pcrs": {str: bin[32]} (decimal PCR index -> SHA-256 bank value),
     "chain": [bin (AK certificate DER), bin (intermediate DER)...]}

PCR indices are decimal strings because evidence maps only take string keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ._certs import fingerprint, load_der_chain, verify_chain
from ._errors import EvidenceDecodeError
from ._evidence import Evidence
from ._kinds import KindResult, VerifyContext
from ._refusal import Reason, Refusal

KIND = "tpm2"
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_ECDSA = 0x0018
PCR_SIZE = 32
MAX_NAME = 2 + 64
MAX_DATA = 2 + 64
MAX_DIGEST = 64
MAX_BANKS = 16
MAX_SELECT = 4
MAX_RSA_SIGNATURE = 512
MAX_ECC_PARAMETER = 66
PROOF_KEYS = frozenset({"quote", "sig", "pcrs", "chain"})

_T = TypeVar("_T")


class TpmDecodeError(EvidenceDecodeError):
    """TPM structures that are truncated, oversized, or not what a quote must be."""


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """The TPM's clock when quoting; obfuscated unless the AK is in the endorsement hierarchy."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """One bank's selected PCRs, in the ascending order the TPM hashes them."""

    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Quote:
    """A parsed `TPMS_ATTEST` of type quote; the signature covers its exact bytes."""

    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True, slots=True)
class TpmSignature:
    """A parsed `TPMT_SIGNATURE`; `value` is in the form `cryptography` verifies (DER for ECDSA)."""

    alg: int
    hash_alg: int
    value: bytes


class _Reader:
    """Big-endian TPM unmarshalling that never reads past the end."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, size: int, what: str) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise TpmDecodeError(f"{what} is truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def sized(self, cap: int, what: str) -> bytes:
        size = self.uint(2, f"{what} size")
        if size > cap:
            raise TpmDecodeError(f"{what} is {size} bytes, above {cap}")
        return self.take(size, what)

    def done(self, what: str) -> None:
        if self._pos != len(self._data):
            raise TpmDecodeError(f"{what} has {len(self._data) - self._pos} trailing bytes")


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise TpmDecodeError(f"{what} must be bytes")
    return value


def parse_attest(data: object) -> Quote:
    """Strictly parse a quote's `TPMS_ATTEST`: magic and type checked, no trailing bytes."""
    r = _Reader(_bytes(data, "quote"))
    if (magic := r.uint(4, "magic")) != TPM_GENERATED_VALUE:
        raise TpmDecodeError(f"quote magic is {magic:#010x}, not TPM_GENERATED_VALUE")
    if (st := r.uint(2, "type")) != TPM_ST_ATTEST_QUOTE:
        raise TpmDecodeError(f"attestation type is {st:#06x}, not TPM_ST_ATTEST_QUOTE")
    signer = r.sized(MAX_NAME, "qualifiedSigner")
    extra = r.sized(MAX_DATA, "extraData")
    clock = ClockInfo(
        clock=r.uint(8, "clock"),
        reset_count=r.uint(4, "resetCount"),
        restart_count=r.uint(4, "restartCount"),
        safe=_yes_no(r.uint(1, "safe")),
    )
    firmware = r.uint(8, "firmwareVersion")
    count = r.uint(4, "pcrSelect count")
    if count > MAX_BANKS:
        raise TpmDecodeError(f"quote selects {count} PCR banks, above {MAX_BANKS}")
    selections = tuple(_pcr_selection(r) for _ in range(count))
    digest = r.sized(MAX_DIGEST, "pcrDigest")
    r.done("quote")
    return Quote(signer, extra, clock, firmware, selections, digest)


def _yes_no(value: int) -> bool:
    if value > 1:
        raise TpmDecodeError(f"clockInfo.safe is {value}, not YES or NO")
    return value == 1


def _pcr_selection(r: _Reader) -> PcrSelection:
    hash_alg = r.uint(2, "pcrSelect hash")
    size = r.uint(1, "sizeofSelect")
    if size > MAX_SELECT:
        raise TpmDecodeError(f"sizeofSelect is {size}, above {MAX_SELECT}")
    bitmap = r.take(size, "pcrSelect")
    pcrs = tuple(
        8 * i + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1
    )
    return PcrSelection(hash_alg, pcrs)


def parse_signature(data: object) -> TpmSignature:
    """Strictly parse a `TPMT_SIGNATURE`: RSASSA, RSAPSS or ECDSA, each with SHA-256."""
    r = _Reader(_bytes(data, "signature"))
    alg = r.uint(2, "sigAlg")
    if alg not in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_ECDSA):
        raise TpmDecodeError(f"signature algorithm {alg:#06x} is not RSASSA, RSAPSS or ECDSA")
    hash_alg = r.uint(2, "signature hash")
    if hash_alg != TPM_ALG_SHA256:
        raise TpmDecodeError(f"signature hash {hash_alg:#06x} is not SHA-256")
    if alg == TPM_ALG_ECDSA:
        sig_r = r.sized(MAX_ECC_PARAMETER, "signatureR")
        sig_s = r.sized(MAX_ECC_PARAMETER, "signatureS")
        value = encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big"))
    else:
        value = r.sized(MAX_RSA_SIGNATURE, "RSA signature")
    r.done("signature")
    return TpmSignature(alg, hash_alg, value)


def signature_holds(key: CertificatePublicKeyTypes, quote: bytes, sig: TpmSignature) -> bool:
    """Whether `sig` over the exact quote bytes verifies with the AK's public key."""
    try:
        if sig.alg == TPM_ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig.value, quote, ec.ECDSA(hashes.SHA256()))
        elif sig.alg == TPM_ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig.value, quote, padding.PKCS1v15(), hashes.SHA256())
        elif sig.alg == TPM_ALG_RSAPSS and isinstance(key, rsa.RSAPublicKey):
            # TPMs choose the salt length (the digest size, or the maximum on older ones).
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            key.verify(sig.value, quote, pss, hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _pcr_values(pcrs: object) -> dict[int, bytes]:
    if not isinstance(pcrs, dict) or len(pcrs) > 8 * MAX_SELECT:
        raise TpmDecodeError(f"pcrs must be a map of at most {8 * MAX_SELECT} PCR values")
    values = {}
    for key, value in pcrs.items():
        if not (
            isinstance(key, str)
            and 0 < len(key) <= 2
            and key.isascii()
            and key.isdigit()
            and str(int(key)) == key
            and int(key) < 8 * MAX_SELECT
        ):
            raise TpmDecodeError("pcrs has a key that is not a decimal PCR index below 32")
        if not isinstance(value, bytes) or len(value) != PCR_SIZE:
            raise TpmDecodeError(f"pcrs[{key}] must be a {PCR_SIZE}-byte SHA-256 PCR value")
        values[int(key)] = value
    return values


def _pcr_problem(quote: Quote, pcrs: Mapping[int, bytes]) -> str | None:
    """Why `pcrs` are not what the quote covers, or None when they are exactly that."""
    if any(s.hash_alg != TPM_ALG_SHA256 for s in quote.pcr_select):
        return "quote covers PCR banks other than SHA-256"
    order = [i for s in quote.pcr_select for i in s.pcrs]
    if len(order) != len(set(order)) or set(order) != set(pcrs):
        return f"quote covers PCRs {sorted(order)}, proof sends {sorted(pcrs)}"
    values = b"".join(pcrs[i] for i in order)
    if not hmac.compare_digest(hashlib.sha256(values).digest(), quote.pcr_digest):
        return "PCR values do not hash to the quote's pcrDigest"
    return None


def quoted_pcrs(evidence: Evidence) -> dict[int, bytes]:
    """The PCR values a `tpm2` proof's quote covers, in quote order, for policies that pin them.

    Raises `TpmDecodeError` if the proof does not hold together; it checks no signature, so
    use it only on evidence whose verdict was accepted.
    """
    quote = parse_attest(evidence.proof.get("quote"))
    pcrs = _pcr_values(evidence.proof.get("pcrs"))
    if problem := _pcr_problem(quote, pcrs):
        raise TpmDecodeError(problem)
    return {i: pcrs[i] for s in quote.pcr_select for i in s.pcrs}


class TpmVerifier:
    """Checks the AK chain, the quote's signature, and that it binds the claims and PCRs."""

    kind = KIND

    def verify(self, evidence: Evidence, ctx: VerifyContext) -> KindResult:
        proof = evidence.proof
        if set(proof) != PROOF_KEYS:
            keys = ", ".join(sorted(PROOF_KEYS))
            return _refuse([Refusal(Reason.MALFORMED, f"{KIND} proof must have exactly {keys}")])
        refusals: list[Refusal] = []
        leaf = _check_chain(proof["chain"], ctx, refusals)
        quote = _parsed(parse_attest, proof["quote"], refusals)
        sig = _parsed(parse_signature, proof["sig"], refusals)
        pcrs = _parsed(_pcr_values, proof["pcrs"], refusals)
        if leaf is not None and sig is not None and isinstance(proof["quote"], bytes):
            refusals += _check_signature(leaf, proof["quote"], sig)
        if quote is not None:
            if not hmac.compare_digest(quote.extra_data, ctx.claims_digest):
                refusals.append(
                    Refusal(Reason.BINDING_MISMATCH, "quote's extraData is not the claims digest")
                )
            if pcrs is not None and (problem := _pcr_problem(quote, pcrs)):
                refusals.append(Refusal(Reason.BINDING_MISMATCH, problem))
        if refusals or leaf is None:
            return _refuse(refusals)
        return KindResult(hardware_backed=True, hardware_id=fingerprint(leaf))


def _parsed(parse: Callable[[object], _T], value: object, refusals: list[Refusal]) -> _T | None:
    try:
        return parse(value)
    except TpmDecodeError as e:
        refusals.append(Refusal(Reason.MALFORMED, f"{KIND} {e}"))
        return None


def _check_chain(
    items: object, ctx: VerifyContext, refusals: list[Refusal]
) -> x509.Certificate | None:
    # `cryptography` parses some certificate fields only when they are read, so hostile
    # DER can raise from inside the chain check, and a bad version raises its own error.
    try:
        chain = load_der_chain(items, f"{KIND} chain")
        if isinstance(chain, Refusal):
            refusals.append(chain)
            return None
        refusals += verify_chain(chain, ctx.roots, ctx.now)
    except (ValueError, x509.InvalidVersion) as e:
        refusals.append(
            Refusal(Reason.MALFORMED, f"{KIND} chain has an unreadable certificate: {e}")
        )
        return None
    return chain[0]


def _check_signature(leaf: x509.Certificate, quote: bytes, sig: TpmSignature) -> list[Refusal]:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        return [Refusal(Reason.BAD_SIGNATURE, f"AK certificate key is unusable: {e}")]
    if not signature_holds(key, quote, sig):
        return [Refusal(Reason.BAD_SIGNATURE, "quote signature does not verify with the AK key")]
    return []


def _refuse(refusals: list[Refusal]) -> KindResult:
    return KindResult(refusals=tuple(refusals), hardware_backed=False)
