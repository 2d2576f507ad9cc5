"""Receipts on the network: the gossip topic, its validator, and feeding the ledger.

Every peer (and every shim) keeps a ledger. The shim hands each countersigned receipt to
`ReceiptService.submit`, which stores it and publishes it on `/dbloom/receipts/1`; every
subscriber checks it (a message with any bad receipt is rejected, which costs its sender
gossip score) and ingests it. Ingesting is idempotent, so a receipt heard twice is
counted once. Nothing is dropped silently: a full queue is counted in `overflow` and
logged.

A gossip message carries a batch of receipts (`{"v": 1, "receipts": [bin, ...]}`, at
most `MAX_BATCH`): at network scale the per-message costs of gossip (signature, ids,
IHAVE/IWANT) would otherwise dwarf the receipts themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import msgpack
import trio

from dbloom.p2p import DecodeError, PeerId
from dbloom.p2p.gossip import Gossip, Message, Subscription, ValidationResult

from ._receipt import MAX_RECEIPT, ReceiptError, decode_receipt, verify_receipt
from ._store import IngestResult, Ledger, Outcome

log = logging.getLogger(__name__)

TOPIC = "/dbloom/receipts/1"
VERSION = 1
QUEUE = 10_000
INGEST_BATCH = 256
MAX_BATCH = 64
PUBLISH_TIMEOUT = 10.0


def encode_batch(receipts: Sequence[bytes]) -> bytes:
    """One gossip message's payload."""
    if not 0 < len(receipts) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} receipts")
    packed: bytes = msgpack.packb({"v": VERSION, "receipts": list(receipts)}, use_bin_type=True)
    return packed


def decode_batch(data: bytes) -> list[bytes]:
    """Strictly decode a gossip payload into receipt bytes (`DecodeError` otherwise)."""
    if len(data) > MAX_BATCH * (MAX_RECEIPT + 8) + 64:
        raise DecodeError("receipt batch too large")
    try:
        body: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise DecodeError(f"receipt batch is not msgpack: {e}") from None
    if not isinstance(body, dict) or set(body) != {"v", "receipts"}:
        raise DecodeError("a receipt batch is a map of v and receipts")
    if body["v"] != VERSION or type(body["v"]) is not int:
        raise DecodeError(f"receipt batch version {body['v']!r} is not {VERSION}")
    receipts = body["receipts"]
    if not isinstance(receipts, list) or not 0 < len(receipts) <= MAX_BATCH:
        raise DecodeError(f"a batch holds 1 to {MAX_BATCH} receipts")
    if not all(isinstance(r, bytes) for r in receipts):
        raise DecodeError("receipts must be bytes")
    return receipts


class ReceiptService:
    """Joins the receipts topic and keeps `ledger` up to date with the network."""

    def __init__(self, gossip: Gossip | None, ledger: Ledger) -> None:
        self.gossip = gossip
        self.ledger = ledger
        self.overflow = 0
        self.outcomes: dict[str, int] = {o.value: 0 for o in Outcome}
        self.refused: dict[str, int] = {}
        self._verified: set[bytes] = set()
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, bool]](QUEUE)

    def submit(self, raw: bytes) -> None:
        """Store and publish a receipt we countersigned (never blocks the caller)."""
        self._enqueue(raw, publish=True)

    def _enqueue(self, raw: bytes, *, publish: bool) -> None:
        try:
            self._send.send_nowait((raw, publish))
        except trio.WouldBlock:
            self.overflow += 1
            if self.overflow == 1 or self.overflow % 1000 == 0:
                log.warning("receipt queue full: %d receipts not stored", self.overflow)

    def validate(self, source: PeerId, message: Message) -> ValidationResult:
        """Gossip validator: only batches of receipts signed by both sides travel on.

        Refusals are counted by kind here (the ledger never sees them); what passes is
        remembered so the ledger does not check the same signatures again.
        """
        try:
            receipts = decode_batch(message.data)
            for raw in receipts:
                verify_receipt(decode_receipt(raw))
        except ReceiptError as e:
            self.refused[e.kind] = self.refused.get(e.kind, 0) + 1
            return ValidationResult.REJECT
        except DecodeError:
            self.refused["malformed"] = self.refused.get("malformed", 0) + 1
            return ValidationResult.REJECT
        if len(self._verified) < QUEUE:
            self._verified.update(receipts)
        return ValidationResult.ACCEPT

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.gossip is not None:
                self.gossip.set_validator(TOPIC, self.validate)
                subscription = self.gossip.subscribe(TOPIC)
                nursery.start_soon(self._from_network, subscription)
            nursery.start_soon(self._process)
            task_status.started()

    async def _ingest(self, raws: Sequence[bytes]) -> list[IngestResult]:
        verified = {raw for raw in raws if raw in self._verified}
        self._verified -= verified
        results = await trio.to_thread.run_sync(
            partial(self.ledger.ingest_many, list(raws), verified=verified)
        )
        for result in results:
            self.outcomes[result.outcome.value] += 1
        return results

    async def _process(self) -> None:
        async for item in self._receive:
            batch = [item]
            while len(batch) < INGEST_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            results = await self._ingest([raw for raw, _ in batch])
            if self.gossip is None:
                continue
            fresh = [
                raw
                for (raw, publish), result in zip(batch, results, strict=True)
                if publish and result.added
            ]
            for start in range(0, len(fresh), MAX_BATCH):
                with trio.move_on_after(PUBLISH_TIMEOUT):
                    await self.gossip.publish(TOPIC, encode_batch(fresh[start : start + MAX_BATCH]))

    async def _from_network(self, subscription: Subscription) -> None:
        assert self.gossip is not None
        us = self.gossip.host.peer_id
        with subscription:
            async for message in subscription:
                if message.author == us:
                    continue
                try:
                    receipts = decode_batch(message.data)
                except DecodeError:
                    continue
                for raw in receipts:
                    self._enqueue(raw, publish=False)
