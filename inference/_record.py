"""The node record: what a serving peer tells the network about itself.

A peer publishes it (signed by its identity through the DHT's node-record envelope) under
`/dbloom/node/<peer-id>` and keeps it fresh; shims read it to rank candidates before they
dial anyone. Prices are integers (micro-units per million tokens): no floats in money.
Wire form: a msgpack map with `v` = 1, at most `MAX_RECORD` bytes, strictly decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from dbloom.p2p import DecodeError, LimitExceeded

VERSION = 1
MAX_RECORD = 32 << 10
MAX_MODELS = 32
MAX_ADDRS = 16
MAX_TEXT = 256
MAX_PRICE = 10**15
DIRECTORY_KEY = "dbloom:nodes"


def model_provider_key(model_id: str) -> str:
    """The DHT provider key under which nodes serving `model_id` announce themselves."""
    return f"dbloom:model:{model_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelOffer:
    """One model a node serves, how fast, and at what price."""

    id: str
    digest: str
    context_length: int
    decode_tps: float
    prefill_tps: float
    price_in: int
    price_out: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """A serving peer's advertisement; `updated_ms` lets readers ignore stale copies."""

    addrs: tuple[str, ...]
    models: tuple[ModelOffer, ...]
    max_batch: int
    active: int
    queued: int
    attest_kind: str
    measurement: str
    updated_ms: int
    draining: bool = False

    def offer(self, model_id: str) -> ModelOffer | None:
        return next((m for m in self.models if m.id == model_id), None)

    def encode(self) -> bytes:
        body = {
            "v": VERSION,
            "addrs": list(self.addrs),
            "models": [
                {
                    "id": m.id,
                    "digest": m.digest,
                    "ctx": m.context_length,
                    "decode": m.decode_tps,
                    "prefill": m.prefill_tps,
                    "in": m.price_in,
                    "out": m.price_out,
                }
                for m in self.models
            ],
            "batch": self.max_batch,
            "active": self.active,
            "queued": self.queued,
            "attest": self.attest_kind,
            "measurement": self.measurement,
            "updated": self.updated_ms,
            "draining": self.draining,
        }
        raw: bytes = msgpack.packb(body, use_bin_type=True)
        if len(raw) > MAX_RECORD:
            raise LimitExceeded(f"node record is {len(raw)} bytes, above {MAX_RECORD}")
        return raw


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise DecodeError(f"{what} must be a string of at most {MAX_TEXT} characters")
    return value


def _count(value: Any, what: str, high: int = 1 << 32) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise DecodeError(f"{what} must be an integer in [0, {high}]")
    return value


def _speed(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value < 1e9:
        raise DecodeError(f"{what} must be a finite, non-negative number")
    return float(value)


def _keys(body: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(body, dict) or set(body) != keys:
        raise DecodeError(f"{what} must be a map with exactly {', '.join(sorted(keys))}")
    return body


def _offer(raw: Any) -> ModelOffer:
    m = _keys(raw, {"id", "digest", "ctx", "decode", "prefill", "in", "out"}, "a model offer")
    model_id = _text(m["id"], "model id")
    if not model_id:
        raise DecodeError("model id is empty")
    return ModelOffer(
        id=model_id,
        digest=_text(m["digest"], "model digest"),
        context_length=_count(m["ctx"], "context length"),
        decode_tps=_speed(m["decode"], "decode tok/s"),
        prefill_tps=_speed(m["prefill"], "prefill tok/s"),
        price_in=_count(m["in"], "input price", MAX_PRICE),
        price_out=_count(m["out"], "output price", MAX_PRICE),
    )


def decode_node_record(raw: bytes) -> NodeRecord:
    """Strictly decode a node record from the DHT (any failure is `DecodeError`)."""
    if len(raw) > MAX_RECORD:
        raise LimitExceeded(f"node record is {len(raw)} bytes, above {MAX_RECORD}")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise DecodeError(f"node record is not msgpack: {e}") from None
    fields = {"v", "addrs", "models", "batch", "active", "queued", "attest", "measurement"}
    b = _keys(body, fields | {"updated", "draining"}, "a node record")
    if b["v"] != VERSION or type(b["v"]) is not int:
        raise DecodeError(f"node record version {b['v']!r} is not {VERSION}")
    addrs, models = b["addrs"], b["models"]
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise DecodeError(f"addrs must be a list of at most {MAX_ADDRS}")
    if not isinstance(models, list) or len(models) > MAX_MODELS:
        raise DecodeError(f"models must be a list of at most {MAX_MODELS}")
    if not isinstance(b["draining"], bool):
        raise DecodeError("draining must be a boolean")
    return NodeRecord(
        addrs=tuple(_text(a, "address") for a in addrs),
        models=tuple(_offer(m) for m in models),
        max_batch=_count(b["batch"], "batch"),
        active=_count(b["active"], "active"),
        queued=_count(b["queued"], "queued"),
        attest_kind=_text(b["attest"], "attestation kind"),
        measurement=_text(b["measurement"], "measurement"),
        updated_ms=_count(b["updated"], "updated", 1 << 53),
        draining=b["draining"],
    )
