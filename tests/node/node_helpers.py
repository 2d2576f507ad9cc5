"""Real peers and a shim on loopback, with the availability settings a test chooses, and a
fake sensor: the machine's state is what the test says it is.

(A uniquely named module: tests/ is no package.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path

import openai
import trio

from dbloom.cli._availability import Rules, Thermal
from dbloom.cli._node import SPEED_REFRESH, PeerNode, PeerSettings
from dbloom.cli._shim import ShimNode, ShimSettings
from dbloom.inference import NodeRecord, decode_node_record
from dbloom.p2p import Host, KeyPair, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, node_record_key, open_node_record

MODEL = "tiny"


class Sensor:
    """Implements `Probes`: an owner who touches the keyboard when the test says so."""

    def __init__(self) -> None:
        self.last_input = -1e9
        self.on_ac: bool | None = True
        self.heat: Thermal | None = Thermal.NOMINAL
        self.free: int | None = 64 << 30
        self.clock = time(23, 0)

    def touch(self) -> None:
        self.last_input = trio.current_time()

    async def idle_seconds(self) -> float | None:
        return trio.current_time() - self.last_input

    async def on_ac_power(self) -> bool | None:
        return self.on_ac

    async def thermal(self) -> Thermal | None:
        return self.heat

    async def free_memory(self) -> int | None:
        return self.free

    def local_time(self) -> time:
        return self.clock


@dataclass
class Net:
    nursery: trio.Nursery
    bootstrap: Host
    dht: KademliaDHT
    shim: ShimNode
    peers: list[PeerNode] = field(default_factory=list)

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.shim.base_url, api_key="unused", max_retries=0)

    async def start_peer(
        self,
        model_dir: Path,
        *,
        probes: Sensor | None = None,
        rules: Rules | None = None,
        price_out: int = 100_000,
        drain_timeout: float = 2.0,
        home: Path | None = None,
        speed_refresh: float | None = None,
    ) -> PeerNode:
        """A peer serving `model_dir`; with `speed_refresh` it benchmarks itself at start
        and again at that interval, otherwise never."""
        settings = PeerSettings(
            listen=["/ip4/127.0.0.1/tcp/0"],
            bootstrap=[str(self.bootstrap.listen_addrs[0])],
            models=[str(model_dir)],
            benchmark=speed_refresh is not None,
            speed_refresh=SPEED_REFRESH if speed_refresh is None else speed_refresh,
            harden=False,
            price_out=price_out,
            drain_timeout=drain_timeout,
            availability=rules or Rules(always_on=True),
            ledger=home / "ledger.sqlite3" if home else None,
            status_file=home / "peer-status.json" if home else None,
        )
        node = PeerNode(
            KeyPair.generate(), settings, model_ids={str(model_dir): MODEL}, probes=probes
        )
        await self.nursery.start(node.run)
        self.peers.append(node)
        return node

    async def published_record(self, node: PeerNode) -> NodeRecord | None:
        """The node's record as the DHT holds it (read through the bootstrap peer)."""
        raw = await self.dht.get(node_record_key(node.identity.peer_id), quorum=1)
        return None if raw is None else decode_node_record(open_node_record(raw).data)


@asynccontextmanager
async def loopback(home: Path | None = None) -> AsyncIterator[Net]:
    """A bootstrap peer and a shim (with a ledger under `home`); add peers with start_peer."""
    async with (
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as boot,
        trio.open_nursery() as nursery,
    ):
        dht = KademliaDHT(boot, KadConfig())
        await nursery.start(dht.run)
        shim = ShimNode(
            ShimSettings(
                port=0,
                bootstrap=[str(boot.listen_addrs[0])],
                allow_dev=True,
                ledger=home / "shim" / "ledger.sqlite3" if home else None,
            )
        )
        await nursery.start(shim.run)
        yield Net(nursery=nursery, bootstrap=boot, dht=dht, shim=shim)
        nursery.cancel_scope.cancel()


async def eventually(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    """Wait until `condition()` is true, failing after `timeout` seconds of trio time."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(step)
