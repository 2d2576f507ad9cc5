"""Every finished request ends as a receipt signed by both sides, in every ledger."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import trio
from network_helpers import MODEL, Network, network

from dbloom.cli._node import PeerNode
from dbloom.inference import Final, GenerateRequest
from dbloom.ledger import compute_amount


async def settled(net: Network, receipts: int) -> None:
    """Wait until the shim's and every peer's ledger hold `receipts` receipts."""
    ledgers = [p.ledger for p in net.peers]
    assert net.shim is not None
    ledgers.append(net.shim.ledger)
    with trio.fail_after(20):
        for _ in range(1000):
            if all(book is not None and book.summary().receipts == receipts for book in ledgers):
                return
            await trio.sleep(0.02)


async def test_a_request_ends_as_a_countersigned_receipt_in_every_ledger(
    e2e_model: Path, tmp_path: Path
) -> None:
    async with network(e2e_model, home=tmp_path) as net:
        client = net.async_client()
        replies = [
            await client.completions.with_raw_response.create(
                model=MODEL, prompt=f"hello {i}", max_tokens=7, temperature=0
            )
            for i in range(3)
        ]
        await settled(net, 3)
        assert net.shim is not None and net.shim.ledger is not None
        summary = net.shim.ledger.summary()
        assert summary.paid == 3 and summary.disputed == 0
        expected = 0
        for raw in replies:
            reply = raw.parse()
            node = next(p for p in net.peers if p.peer_id == raw.headers["x-dbloom-node"])
            offer = node.offers[0]
            assert reply.usage is not None
            expected += compute_amount(
                reply.usage.prompt_tokens,
                reply.usage.completion_tokens,
                offer.price_in,
                offer.price_out,
            )
        assert summary.paid_amount == expected
        for peer in net.peers:
            assert peer.ledger is not None and peer.ledger.summary() == summary
        epoch = net.shim.ledger.summary().last_epoch
        assert epoch is not None
        roots = {p.ledger.epoch_root(epoch) for p in net.peers if p.ledger}
        assert roots == {net.shim.ledger.epoch_root(epoch)}
        await client.close()


class InflatingPeer(PeerNode):
    """Bills two more tokens than it sent (with an amount that matches its lie)."""

    def _sign_receipt(
        self, request: GenerateRequest, final: Final, token_ids: Sequence[int], started_ms: int
    ) -> bytes | None:
        inflated = replace(final, completion_tokens=final.completion_tokens + 2)
        return super()._sign_receipt(request, inflated, token_ids, started_ms)


async def test_an_inflated_receipt_is_disputed_and_never_paid(
    e2e_model: Path, tmp_path: Path
) -> None:
    async with network(e2e_model, peers=1, home=tmp_path, peer_class=InflatingPeer) as net:
        client = net.async_client()
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0)
        await settled(net, 1)
        assert net.shim is not None and net.shim.ledger is not None
        summary = net.shim.ledger.summary()
        assert summary.disputed == 1 and summary.paid == 0 and summary.paid_amount == 0
        assert net.shim.engine is not None and net.shim.engine.receipts["disputed"] == 1
        await client.close()
