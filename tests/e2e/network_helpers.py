"""A whole network on loopback for one test: bootstrap, serving peers, a shim.

(A uniquely named module: tests/ is no package.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai
import trio

from dbloom.cli._node import PeerNode, PeerSettings
from dbloom.cli._shim import ShimNode, ShimSettings
from dbloom.p2p import Host, KeyPair, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT

MODEL = "tiny"
T = TypeVar("T")


@dataclass
class Network:
    """Handles on everything a test may poke at."""

    nursery: trio.Nursery
    bootstrap: Host
    peers: list[PeerNode] = field(default_factory=list)
    scopes: list[trio.CancelScope] = field(default_factory=list)
    shim: ShimNode | None = None

    @property
    def base_url(self) -> str:
        assert self.shim is not None
        return self.shim.base_url

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, **options)

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key="unused", max_retries=0, **options
        )

    def kill(self, index: int) -> None:
        """Stop a peer abruptly: its host and engine go away without a goodbye."""
        self.scopes[index].cancel()

    def active(self) -> int:
        return sum(p.pool.load().active for p in self.peers if p.pool is not None)

    def served(self) -> list[int]:
        return [p.pool.requests_total if p.pool else 0 for p in self.peers]


async def _run_peer(node: PeerNode, scope_out: list[trio.CancelScope], *, task_status: Any) -> None:
    with trio.CancelScope() as scope:
        scope_out.append(scope)
        await node.run(task_status=task_status)


@asynccontextmanager
async def network(
    model_dir: Path,
    *,
    peers: int = 3,
    allow_dev: bool = True,
    max_batch: int = 8,
    max_queue: int = 16,
    shim: bool = True,
    home: Path | None = None,
    peer_class: type[PeerNode] = PeerNode,
    drain_timeout: float = 2.0,
) -> AsyncIterator[Network]:
    """`home` (a fresh folder) gives every peer and the shim a ledger under it."""
    async with (
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as boot,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(KademliaDHT(boot, KadConfig()).run)
        net = Network(nursery=nursery, bootstrap=boot)
        addr = [str(boot.listen_addrs[0])]
        for i in range(peers):
            settings = PeerSettings(
                listen=["/ip4/127.0.0.1/tcp/0"],
                bootstrap=addr,
                models=[str(model_dir)],
                max_batch=max_batch,
                max_queue=max_queue,
                benchmark=False,
                harden=False,
                price_out=100_000 * (i + 1),
                drain_timeout=drain_timeout,
                ledger=home / f"peer-{i}" / "ledger.sqlite3" if home else None,
            )
            node = peer_class(KeyPair.generate(), settings, model_ids={str(model_dir): MODEL})
            await nursery.start(_run_peer, node, net.scopes)
            net.peers.append(node)
        if shim:
            net.shim = ShimNode(
                ShimSettings(
                    port=0,
                    bootstrap=addr,
                    allow_dev=allow_dev,
                    ledger=home / "shim" / "ledger.sqlite3" if home else None,
                )
            )
            await nursery.start(net.shim.run)
        yield net
        nursery.cancel_scope.cancel()


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking SDK call without blocking trio (abandon it if the test is cancelled)."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
