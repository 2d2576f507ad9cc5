"""The `/dbloom/attest/1.0.0` wire format (sans-IO).

One stream, one exchange: the client sends a fresh nonce, the node answers with its
evidence or an error, and closes. Frames are a 4-byte big-endian length and one msgpack
map with `v` = 1, like `/dbloom/infer`. The client sends nothing else before it has
verified the answer, so a node that fails attestation never sees a prompt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from dbloom.p2p import LimitExceeded

from ._errors import EvidenceDecodeError
from ._evidence import MAX_EVIDENCE, NONCE_SIZE

PROTOCOL_ID = "/dbloom/attest/1.0.0"
VERSION = 1
HEADER = struct.Struct(">I")
MAX_REQUEST = 256
MAX_RESPONSE = MAX_EVIDENCE + 1024
MAX_ERROR = 1024


@dataclass(frozen=True, slots=True)
class AttestRequest:
    """The client's challenge."""

    nonce: bytes


@dataclass(frozen=True, slots=True)
class AttestResponse:
    """The node's answer: evidence bytes, or why it has none."""

    evidence: bytes | None = None
    error: str | None = None


def frame(body: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def encode_request(request: AttestRequest) -> bytes:
    return frame({"v": VERSION, "nonce": request.nonce})


def encode_response(response: AttestResponse) -> bytes:
    if response.evidence is not None:
        return frame({"v": VERSION, "evidence": response.evidence})
    return frame({"v": VERSION, "error": (response.error or "no evidence")[:MAX_ERROR]})


def frame_length(header: bytes, cap: int) -> int:
    """Length announced by a frame header; refuses oversized frames before reading them."""
    (length,) = HEADER.unpack(header)
    if length > cap:
        raise LimitExceeded(f"attest frame of {length} bytes, above {cap}")
    return int(length)


def _body(payload: bytes, keys: set[str]) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise EvidenceDecodeError(f"attest frame is not msgpack: {e}") from None
    if not isinstance(body, dict) or "v" not in body:
        raise EvidenceDecodeError("attest frame must be a map with a version")
    if body["v"] != VERSION or type(body["v"]) is not int:
        raise EvidenceDecodeError(f"attest version {body['v']!r} is not {VERSION}")
    if set(body) - {"v"} - keys or len(body) != 2:
        raise EvidenceDecodeError(f"attest frame must hold v and one of {sorted(keys)}")
    return body


def decode_request(payload: bytes) -> AttestRequest:
    """Strictly decode a challenge (the node side)."""
    if len(payload) > MAX_REQUEST:
        raise LimitExceeded("attest request too large")
    body = _body(payload, {"nonce"})
    nonce = body.get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise EvidenceDecodeError(f"nonce must be {NONCE_SIZE} bytes")
    return AttestRequest(nonce)


def decode_response(payload: bytes) -> AttestResponse:
    """Strictly decode an answer (the client side)."""
    if len(payload) > MAX_RESPONSE:
        raise LimitExceeded("attest response too large")
    body = _body(payload, {"evidence", "error"})
    if "evidence" in body:
        if not isinstance(body["evidence"], bytes):
            raise EvidenceDecodeError("evidence must be bytes")
        return AttestResponse(evidence=body["evidence"])
    error = body["error"]
    if not isinstance(error, str) or len(error) > MAX_ERROR:
        raise EvidenceDecodeError("error must be a short string")
    return AttestResponse(error=error)
