"""A serving peer that cannot be dialed is reached through a relay it finds in the DHT.

Loopback only: an in-process relay (what `dbloom relay` runs) is the bootstrap peer; a
peer that listens nowhere is private without asking, reserves a slot, republishes its
node record with the circuit address, and a shim that knows only that record gets a
completion over the relayed connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import openai
import trio
from node_helpers import MODEL, eventually

from dbloom.cli._node import PeerNode, PeerSettings, ReachabilityMode
from dbloom.cli._shim import ShimNode, ShimSettings
from dbloom.p2p import Host, KeyPair, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key
from dbloom.p2p.relay import RELAY_KEY, AutoNatService, Reachability, RelayService

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def relay_peer() -> AsyncIterator[Host]:
    """What `dbloom relay` runs: relay, AutoNAT, a DHT server providing `dbloom:relay`."""
    async with open_host(listen=[LOOPBACK]) as host, trio.open_nursery() as nursery:
        await nursery.start(RelayService(host).run)
        AutoNatService(host)
        dht = KademliaDHT(host, KadConfig(mode="server"))
        await nursery.start(dht.run)
        await dht.provide(provider_key(RELAY_KEY))
        yield host
        nursery.cancel_scope.cancel()


def settings(
    model: Path, relay: Host, listen: list[str], reachability: ReachabilityMode
) -> PeerSettings:
    return PeerSettings(
        listen=listen,
        bootstrap=[str(relay.listen_addrs[0])],
        models=[str(model)],
        benchmark=False,
        harden=False,
        drain_timeout=1.0,
        reachability=reachability,
    )


def circuits(node: PeerNode) -> list[str]:
    return [a for a in node.record.addrs if "/p2p-circuit/" in a] if node.record else []


async def test_unlistened_peer_is_served_through_a_relay(node_model: Path) -> None:
    async with relay_peer() as relay, trio.open_nursery() as nursery:
        node = PeerNode(
            KeyPair.generate(),
            settings(node_model, relay, [], "auto"),
            model_ids={str(node_model): MODEL},
        )
        await nursery.start(node.run)
        await eventually(lambda: bool(circuits(node)), timeout=20)
        assert node.autorelay is not None
        assert node.autorelay.reachability is Reachability.PRIVATE
        assert node.record is not None and node.record.addrs == tuple(circuits(node))
        assert circuits(node)[0].startswith(f"{relay.listen_addrs[0]}/p2p-circuit/p2p/")
        assert node.reachability() == "private, 1 relay"

        shim = ShimNode(
            ShimSettings(port=0, bootstrap=[str(relay.listen_addrs[0])], allow_dev=True)
        )
        await nursery.start(shim.run)
        client = openai.AsyncOpenAI(base_url=shim.base_url, api_key="unused", max_retries=0)
        with trio.fail_after(20):
            reply = await client.completions.create(
                model=MODEL, prompt="hi", max_tokens=4, temperature=0
            )
        assert reply.choices[0].text
        assert shim.host is not None
        conn = shim.host.connection(node.identity.peer_id)
        assert conn is not None and conn.relayed
        await client.close()
        nursery.cancel_scope.cancel()


async def test_public_peer_holds_no_relay_slot(node_model: Path) -> None:
    async with relay_peer() as relay, trio.open_nursery() as nursery:
        node = PeerNode(
            KeyPair.generate(),
            settings(node_model, relay, [LOOPBACK], "public"),
            model_ids={str(node_model): MODEL},
        )
        await nursery.start(node.run)
        assert node.autorelay is None and node.holepunch is not None
        assert node.reachability().startswith("public")
        assert node.record is not None and not circuits(node)
        nursery.cancel_scope.cancel()


def test_peer_command_takes_a_reachability_mode(node_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DBLOOM_HOME": str(tmp_path), "DBLOOM_CONFIG": ""}
    peer = [sys.executable, "-m", "dbloom.cli", "peer", "-m", str(node_model), "--dry-run"]
    shown = subprocess.run(
        [*peer, "--reachability", "private"], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert any(line.split() == ["reachability", "private"] for line in shown.stdout.splitlines())
    refused = subprocess.run(
        [*peer, "--reachability", "nowhere"], capture_output=True, text=True, env=env, timeout=60
    )
    assert refused.returncode == 1
    assert "--reachability must be one of auto, public, private" in refused.stderr
    assert "Traceback" not in refused.stderr
