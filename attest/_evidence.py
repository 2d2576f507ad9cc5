"""Claims and evidence: what a node says about itself, and the proof that binds it.

Wire form (msgpack, version 1, strictly decoded, at most `MAX_EVIDENCE` bytes):

    Evidence = {"v": 1, "kind": str, "claims": bin, "proof": map, "log": bin?}
    Claims   = {"v": 1, "peer": bin, "measurement": bin[32], "models": {str: bin[32]},
                "posture": {str: bool|nil}, "nonce": bin[32], "issued_at": int (ms)}

`claims` travels as the exact bytes that were signed, so no verifier ever re-encodes
what it checks. Every kind's proof binds `claims_digest(claims_bytes)`, a SHA-256 with a
domain-separation prefix, never the claims themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dbloom.p2p import DecodeError, LimitExceeded, PeerId

from ._errors import EvidenceDecodeError

VERSION = 1
MAX_EVIDENCE = 64 << 10
MAX_CLAIMS = 8 << 10
MAX_MODELS = 32
MAX_MODEL_ID = 256
NONCE_SIZE = 32
DIGEST_SIZE = 32
CLAIMS_DOMAIN = b"dbloom/claims/v1\x00"
POSTURE_KEYS = ("sip", "secure_boot", "debugger_denied", "core_dumps_off")


@dataclass(frozen=True, slots=True)
class Posture:
    """Security posture of the node; `None` means "could not be read", never a guess."""

    sip: bool | None = None
    secure_boot: bool | None = None
    debugger_denied: bool | None = None
    core_dumps_off: bool | None = None

    def as_dict(self) -> dict[str, bool | None]:
        return {key: getattr(self, key) for key in POSTURE_KEYS}

    def merged(self, attested: Mapping[str, bool]) -> Posture:
        """This posture with hardware-attested facts taking precedence."""
        return Posture(**{**self.as_dict(), **attested})


@dataclass(frozen=True, slots=True)
class Claims:
    """What a node asserts: who it is, what it runs, how it is locked down, and for whom."""

    peer_id: PeerId
    measurement: bytes
    nonce: bytes
    issued_at_ms: int
    models: Mapping[str, bytes] = field(default_factory=dict)
    posture: Posture = field(default_factory=Posture)

    def encode(self) -> bytes:
        """Canonical msgpack (sorted keys), the bytes every proof binds."""
        body = {
            "v": VERSION,
            "peer": self.peer_id.multihash,
            "measurement": self.measurement,
            "models": {k: self.models[k] for k in sorted(self.models)},
            "posture": self.posture.as_dict(),
            "nonce": self.nonce,
            "issued_at": self.issued_at_ms,
        }
        packed: bytes = msgpack.packb(_sorted(body), use_bin_type=True)
        return packed


@dataclass(frozen=True, slots=True)
class Evidence:
    """Claims (as signed bytes), a kind-specific proof, and an optional log inclusion proof."""

    kind: str
    claims_bytes: bytes
    proof: Mapping[str, Any]
    log: bytes | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": VERSION,
            "kind": self.kind,
            "claims": self.claims_bytes,
            "proof": dict(self.proof),
        }
        if self.log is not None:
            body["log"] = self.log
        raw: bytes = msgpack.packb(_sorted(body), use_bin_type=True)
        if len(raw) > MAX_EVIDENCE:
            raise LimitExceeded(f"evidence is {len(raw)} bytes, above {MAX_EVIDENCE}")
        return raw

    @property
    def digest(self) -> bytes:
        return claims_digest(self.claims_bytes)


def claims_digest(claims_bytes: bytes) -> bytes:
    """The 32 bytes every kind binds to hardware: SHA-256 of the domain-separated claims."""
    return hashlib.sha256(CLAIMS_DOMAIN + claims_bytes).digest()


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def _unpack(raw: bytes, cap: int, what: str) -> dict[str, Any]:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise EvidenceDecodeError(f"{what} must be bytes")
    if len(raw) > cap:
        raise LimitExceeded(f"{what} is {len(raw)} bytes, above {cap}")
    try:
        value = msgpack.unpackb(
            bytes(raw),
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise EvidenceDecodeError(f"{what} is not valid msgpack: {e}") from None
    if not isinstance(value, dict):
        raise EvidenceDecodeError(f"{what} must be a map")
    return value


def _check_keys(body: Mapping[str, Any], required: set[str], optional: set[str], what: str) -> None:
    keys = set(body)
    if missing := required - keys:
        raise EvidenceDecodeError(f"{what} lacks {', '.join(sorted(missing))}")
    if unknown := keys - required - optional:
        raise EvidenceDecodeError(
            f"{what} has unknown fields {', '.join(sorted(map(str, unknown)))}"
        )
    if body["v"] != VERSION or type(body["v"]) is not int:
        raise EvidenceDecodeError(f"{what} version {body['v']!r} is not {VERSION}")


def _bin(body: Mapping[str, Any], key: str, size: int | None, what: str) -> bytes:
    value = body[key]
    if not isinstance(value, bytes):
        raise EvidenceDecodeError(f"{what}.{key} must be bytes")
    if size is not None and len(value) != size:
        raise EvidenceDecodeError(f"{what}.{key} must be {size} bytes, not {len(value)}")
    return value


def decode_evidence(raw: bytes) -> Evidence:
    """Strictly decode evidence bytes from a node (size cap first, then shape)."""
    body = _unpack(raw, MAX_EVIDENCE, "evidence")
    _check_keys(body, {"v", "kind", "claims", "proof"}, {"log"}, "evidence")
    kind = body["kind"]
    if not isinstance(kind, str) or not 0 < len(kind) <= 64:
        raise EvidenceDecodeError("evidence.kind must be a short string")
    claims = _bin(body, "claims", None, "evidence")
    if len(claims) > MAX_CLAIMS:
        raise LimitExceeded(f"claims are {len(claims)} bytes, above {MAX_CLAIMS}")
    proof = body["proof"]
    if not isinstance(proof, dict):
        raise EvidenceDecodeError("evidence.proof must be a map")
    log = body.get("log")
    if log is not None and not isinstance(log, bytes):
        raise EvidenceDecodeError("evidence.log must be bytes")
    return Evidence(kind=kind, claims_bytes=claims, proof=proof, log=log)


def decode_claims(raw: bytes) -> Claims:
    """Strictly decode the claims bytes carried in evidence."""
    body = _unpack(raw, MAX_CLAIMS, "claims")
    _check_keys(
        body,
        {"v", "peer", "measurement", "models", "posture", "nonce", "issued_at"},
        set(),
        "claims",
    )
    peer_bytes = _bin(body, "peer", None, "claims")
    try:
        peer = PeerId.from_bytes(peer_bytes)
    except (DecodeError, ValueError) as e:
        raise EvidenceDecodeError(f"claims.peer is not a peer id: {e}") from None
    measurement = _bin(body, "measurement", DIGEST_SIZE, "claims")
    nonce = _bin(body, "nonce", NONCE_SIZE, "claims")
    issued = body["issued_at"]
    if type(issued) is not int or not 0 <= issued < 1 << 53:
        raise EvidenceDecodeError("claims.issued_at must be a non-negative integer (ms)")
    models_raw = body["models"]
    if not isinstance(models_raw, dict) or len(models_raw) > MAX_MODELS:
        raise EvidenceDecodeError(f"claims.models must be a map of at most {MAX_MODELS} models")
    models: dict[str, bytes] = {}
    for name, digest in models_raw.items():
        if not 0 < len(name) <= MAX_MODEL_ID:
            raise EvidenceDecodeError("claims.models has an empty or overlong model id")
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise EvidenceDecodeError(f"claims.models[{name!r}] must be a 32-byte digest")
        models[name] = digest
    posture_raw = body["posture"]
    if not isinstance(posture_raw, dict) or set(posture_raw) != set(POSTURE_KEYS):
        raise EvidenceDecodeError(f"claims.posture must have exactly {', '.join(POSTURE_KEYS)}")
    for key, flag in posture_raw.items():
        if flag is not None and not isinstance(flag, bool):
            raise EvidenceDecodeError(f"claims.posture.{key} must be true, false or nil")
    return Claims(
        peer_id=peer,
        measurement=measurement,
        nonce=nonce,
        issued_at_ms=issued,
        models=models,
        posture=Posture(**posture_raw),
    )
