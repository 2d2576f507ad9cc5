"""`dbloom demo`: a whole network on loopback, answering a real OpenAI-client request.

A bootstrap peer, three peers serving a generated model with `dev` attestation, and a
shim; the official `openai` client streams one chat completion through the shim, which
found the peers in the DHT, attested the chosen one and opened a Noise channel to it.
`--keep` leaves everything running for your own client until Ctrl-C.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
import typer

from dbloom.inference import build_tiny_model
from dbloom.ledger._money import format_price
from dbloom.p2p import KeyPair, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT

from ._common import console, run
from ._node import PeerNode, PeerSettings
from ._shim import ShimNode, ShimSettings
from .p2p import wait_for_interrupt

MODEL = "tiny"
PEERS = 3
PROMPT = "Explain how decentralized AI inference improves privacy."


def demo(
    keep: bool = typer.Option(False, "--keep", help="Leave the network and shim up."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Shim port (0: any free port)."),
) -> None:
    """A local network (bootstrap, 3 serving peers, a shim) answers an OpenAI-client request."""

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            console.rule("[bold]dbloom demo: a small network on 127.0.0.1")
            model_dir = build_tiny_model(Path(tmp) / MODEL, size="tiny")
            console.print(f"generated model {MODEL!r} (random weights: its text is meaningless)")
            await _network(model_dir, Path(tmp), keep=keep, port=port)

    run(main)


async def _network(model_dir: Path, home: Path, *, keep: bool, port: int) -> None:
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        boot_host = await stack.enter_async_context(
            open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"])
        )
        await nursery.start(KademliaDHT(boot_host, KadConfig()).run)
        bootstrap = [str(boot_host.listen_addrs[0])]
        console.print(f"[bold]bootstrap[/bold] {bootstrap[0]}")
        peers = []
        for i in range(PEERS):
            settings = PeerSettings(
                listen=["/ip4/127.0.0.1/tcp/0"],
                bootstrap=bootstrap,
                models=[str(model_dir)],
                price_in=50_000,
                price_out=200_000 + 100_000 * i,
                harden=False,
                ledger=home / f"peer-{i + 1}" / "ledger.sqlite3",
            )
            node = PeerNode(KeyPair.generate(), settings)
            await nursery.start(node.run)
            offer = node.offers[0]
            console.print(
                f"[bold]peer {i + 1}[/bold]    {node.identity.peer_id.short()} serves {offer.id!r} "
                f"({offer.decode_tps:.0f} tok/s measured), dev attestation"
            )
            peers.append(node)
        shim_ledger = home / "shim" / "ledger.sqlite3"
        shim = ShimNode(
            ShimSettings(port=port, bootstrap=bootstrap, allow_dev=True, ledger=shim_ledger)
        )
        await nursery.start(shim.run)
        console.print(f"[bold]shim[/bold]      OpenAI-compatible API on {shim.base_url}")
        result = await trio.to_thread.run_sync(_ask, shim.base_url)
        names = {str(p.identity.peer_id): f"peer {i + 1}" for i, p in enumerate(peers)}
        _report(result, names)
        await _show_receipt(shim, peers)
        if keep:
            console.print(f"dbloom ledger summary --ledger {shim_ledger}")
            console.print(f"\nexport OPENAI_BASE_URL={shim.base_url} OPENAI_API_KEY=unused")
            console.print(f"model id: {MODEL!r}. Ctrl-C stops everything.")
            await wait_for_interrupt()
        for node in peers:
            node.request_stop()
        nursery.cancel_scope.cancel()


async def _show_receipt(shim: ShimNode, peers: list[PeerNode]) -> None:
    """Wait for the countersigned receipt to reach the ledgers, then show the totals."""
    assert shim.ledger is not None
    for _ in range(200):
        if all(p.ledger and p.ledger.summary().receipts for p in peers):
            break
        await trio.sleep(0.05)
    summary = shim.ledger.summary()
    stored = sum(1 for p in peers if p.ledger and p.ledger.summary().receipts)
    console.print(
        f"receipt: signed by the node, countersigned by the shim, gossiped to {stored} of "
        f"{len(peers)} peers' ledgers; `dbloom ledger summary` shows {summary.paid} paid "
        f"receipt(s), {format_price(summary.paid_amount)} in total (95% to the operator)"
    )


def _ask(base_url: str) -> dict[str, Any]:
    """One streamed chat completion through the official `openai` client (in a thread)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    console.print(f"[bold]prompt[/bold]    {PROMPT}")
    console.print("[bold]answer[/bold]    ", end="")
    start = time.perf_counter()
    first = None
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                console.print(choice.delta.content, end="", markup=False, highlight=False)
    end = time.perf_counter()
    console.print()
    return {
        "node": raw.headers.get("x-dbloom-node", "?"),
        "ttft": (first or end) - start,
        "tokens": usage.completion_tokens if usage else 0,
        "decode": end - (first or end),
    }


def _report(result: dict[str, Any], names: dict[str, str]) -> None:
    node = result["node"]
    rate = (result["tokens"] - 1) / result["decode"] if result["decode"] > 0 else 0.0
    console.print(
        f"served by {names.get(node, '?')} ({node}); {result['tokens']} tokens; "
        f"time to first token {result['ttft'] * 1000:.0f} ms; {rate:.0f} tok/s"
    )
    console.print(
        "[green]done[/green]: found through the DHT, attested, served over an encrypted "
        "channel; nobody in between saw the prompt or the answer"
    )
