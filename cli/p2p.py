"""`dbloom p2p`: serve, ping and identify peers, for operators and debugging."""

from __future__ import annotations

import signal
import statistics
from pathlib import Path

import trio
import typer

from dbloom.p2p import (
    KEY_FILE_NAME,
    KeyPair,
    Multiaddr,
    identify,
    load_or_create_identity,
    open_host,
    ping,
)
from dbloom.p2p.kad import KadConfig, KademliaDHT

from ._common import console, fail, home_dir, run

app = typer.Typer(help="Low-level peer-to-peer tools.", no_args_is_help=True)

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/4001"
ROUTING_TABLE_FILE = "routing-table.json"


async def wait_for_interrupt() -> None:
    """Return on Ctrl-C or SIGTERM, so shutdown runs through the nurseries."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


@app.command("serve")
def serve(
    listen: list[str] = typer.Option(
        [DEFAULT_LISTEN], "--listen", "-l", help="Multiaddr to listen on (repeatable)."
    ),
    dht: str = typer.Option("server", help="Kademlia mode: server, client or off."),
    bootstrap: list[str] = typer.Option(
        [], "--bootstrap", "-b", help="DHT peer to start from (repeatable)."
    ),
    home: Path | None = typer.Option(None, help="Home folder holding the identity key."),
) -> None:
    """Listen and answer ping, identify (and Kademlia) until interrupted."""
    if dht not in ("server", "client", "off"):
        fail(f"--dht must be server, client or off, not {dht!r}")

    async def main() -> None:
        addrs = [Multiaddr.parse(a) for a in listen]
        peers = tuple(Multiaddr.parse(b) for b in bootstrap)
        home_path = home_dir(home)
        identity = load_or_create_identity(home_path / KEY_FILE_NAME)
        async with open_host(identity, listen=addrs) as host, trio.open_nursery() as nursery:
            for addr in host.listen_addrs:
                console.print(f"listening on {addr}")
            if dht != "off":
                config = KadConfig(
                    mode="server" if dht == "server" else "client",
                    bootstrap=peers,
                    table_path=home_path / ROUTING_TABLE_FILE,
                )
                table = KademliaDHT(host, config)
                await nursery.start(table.run)
                console.print(f"DHT {dht} mode, {len(table.table)} peers in the routing table")
            await wait_for_interrupt()
            console.print("shutting down")
            nursery.cancel_scope.cancel()

    run(main)


@app.command("ping")
def ping_command(
    address: str = typer.Argument(
        ..., help="Multiaddr of the peer, ideally ending in /p2p/<peer-id>."
    ),
    count: int = typer.Option(4, "--count", "-n", min=1, max=10_000, help="How many pings."),
    timeout: float = typer.Option(
        10.0, min=0.001, max=3600, help="Seconds to wait for each answer."
    ),
) -> None:
    """Ping a peer and print each round trip and a summary."""

    async def main() -> None:
        target = Multiaddr.parse(address)
        async with open_host(KeyPair.generate()) as host:
            conn = await host.connect(target, timeout=timeout)
            console.print(f"connected to {conn.peer_id} via {conn.remote_addr}")
            rtts = []
            for i in range(count):
                rtt = (await ping(host, conn.peer_id, timeout=timeout))[0]
                rtts.append(rtt)
                console.print(f"ping {i + 1}: {rtt * 1000:.3f} ms")
            console.print(
                f"{len(rtts)} pings: min {min(rtts) * 1000:.3f} ms, "
                f"median {statistics.median(rtts) * 1000:.3f} ms, max {max(rtts) * 1000:.3f} ms"
            )

    run(main)


@app.command("id")
def id_command(
    address: str = typer.Argument(..., help="Multiaddr of the peer."),
    timeout: float = typer.Option(10.0, min=0.001, max=3600, help="Seconds to wait."),
) -> None:
    """Print what a peer says about itself (identify)."""

    async def main() -> None:
        target = Multiaddr.parse(address)
        async with open_host(KeyPair.generate()) as host:
            conn = await host.connect(target, timeout=timeout)
            info = await identify(host, conn.peer_id, timeout=timeout)
            console.print(f"peer id          {conn.peer_id}")
            console.print(f"agent            {info.agent_version or '-'}")
            console.print(f"protocol version {info.protocol_version or '-'}")
            console.print(f"observed us at   {info.observed_addr or '-'}")
            console.print("listen addrs")
            for addr in info.listen_addrs:
                console.print(f"  {addr}")
            console.print("protocols")
            for proto in info.protocols:
                console.print(f"  {proto}")

    run(main)
