"""Node records and model offers for tests (a uniquely named module: tests/ is no package)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dbloom.inference import ModelOffer, NodeRecord

_OFFER = ModelOffer(
    id="tiny",
    digest="ab" * 32,
    context_length=2048,
    decode_tps=150.0,
    prefill_tps=900.0,
    price_in=100_000,
    price_out=500_000,
)
_RECORD = NodeRecord(
    addrs=(),
    models=(_OFFER,),
    max_batch=8,
    active=0,
    queued=0,
    attest_kind="dev",
    measurement="cd" * 32,
    updated_ms=1_790_000_000_000,
)


def make_offer(model: str = "tiny", **changes: Any) -> ModelOffer:
    """A valid offer of `model`; `changes` override any field."""
    return replace(_OFFER, id=model, **changes)


def make_record(**changes: Any) -> NodeRecord:
    """A valid dev-attested record offering `tiny`; `changes` override any field."""
    return replace(_RECORD, **changes)
