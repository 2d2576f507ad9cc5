"""`dbloom relay`: a relay-only peer that lets Macs behind home NAT be reached.

It serves circuit relay v2 (`hop`) within the limits given, answers AutoNAT dial-back
requests (so peers learn whether they are reachable), and announces itself in the DHT
under `dbloom:relay` so NATed peers can find it. It holds no models and sees no
content: every circuit carries a Noise session between its two ends. `--shim` adds an
OpenAI-compatible API for those who cannot run their own; that one does see plaintext,
and says so at start and in `/v1/models`.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import trio
import typer

from dbloom.api import ApiKeys, InsecureBind, is_loopback
from dbloom.p2p import KEY_FILE_NAME, Multiaddr, MultiaddrError, load_or_create_identity, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key
from dbloom.p2p.relay import RELAY_KEY, AutoNatService, RelayLimits, RelayService

from ._common import console, fail, home_dir, run
from ._node import expand_addrs
from ._shim import ShimNode, ShimSettings
from .p2p import ROUTING_TABLE_FILE

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT = 30.0
SHIM_NOTICE = (
    "served by a shim on a relay: its operator can read prompts and outputs; "
    "run `dbloom shim` on your own machine for privacy"
)
DEFAULTS = RelayLimits()


def relay(
    listen: list[str] = typer.Option(
        ["/ip4/0.0.0.0/tcp/4001"],
        "--listen",
        "-l",
        envvar="DBLOOM_LISTEN",
        help="Multiaddr to listen on (repeatable).",
    ),
    bootstrap: list[str] = typer.Option(
        [],
        "--bootstrap",
        "-b",
        envvar="DBLOOM_BOOTSTRAP",
        help="Peer to join through (repeatable).",
    ),
    announce: list[str] = typer.Option(
        [],
        "--announce",
        help="Public address to hand to reserving peers (repeatable); default: where we listen.",
    ),
    max_reservations: int = typer.Option(
        DEFAULTS.max_reservations, "--max-reservations", min=1, help="Peers holding a slot at once."
    ),
    max_reservations_per_ip: int = typer.Option(
        DEFAULTS.max_reservations_per_ip,
        "--max-reservations-per-ip",
        min=1,
        help="Slots held from one IP address.",
    ),
    max_circuits: int = typer.Option(
        DEFAULTS.max_circuits, "--max-circuits", min=1, help="Circuits open at once."
    ),
    max_circuits_per_peer: int = typer.Option(
        DEFAULTS.max_circuits_per_peer,
        "--max-circuits-per-peer",
        min=1,
        help="Circuits open at once from or to one peer.",
    ),
    circuit_bytes: int = typer.Option(
        DEFAULTS.circuit_bytes, "--circuit-bytes", min=1, help="Bytes per circuit per direction."
    ),
    circuit_seconds: int = typer.Option(
        DEFAULTS.circuit_seconds, "--circuit-seconds", min=1, help="Seconds a circuit may last."
    ),
    reservation_seconds: float = typer.Option(
        DEFAULTS.reservation_ttl,
        "--reservation-seconds",
        min=1,
        help="How long a reservation lasts unless renewed.",
    ),
    shim: bool = typer.Option(
        False,
        "--shim",
        help="Also serve an OpenAI-compatible API here. Convenience only: this relay then "
        "sees those requests' prompts and outputs in plaintext.",
    ),
    shim_host: str = typer.Option("127.0.0.1", "--shim-host", help="Where the --shim listens."),
    shim_port: int = typer.Option(8000, "--shim-port", min=0, max=65535, help="--shim's port."),
    allow_dev: bool = typer.Option(
        False, "--allow-dev", help="Let the --shim route to nodes with dev attestation."
    ),
    home: Path | None = typer.Option(None, "--home", help="Home folder (identity key)."),
) -> None:
    """Relay encrypted connections to peers behind NAT, within limits; announce as a relay."""
    try:
        for addr in [*listen, *bootstrap, *announce]:
            Multiaddr.parse(addr)
    except MultiaddrError as e:
        fail(str(e))
    limits = RelayLimits(
        reservation_ttl=reservation_seconds,
        max_reservations=max_reservations,
        max_reservations_per_ip=max_reservations_per_ip,
        max_circuits=max_circuits,
        max_circuits_per_peer=max_circuits_per_peer,
        circuit_seconds=circuit_seconds,
        circuit_bytes=circuit_bytes,
    )
    home_path = home_dir(home)
    keys = None if is_loopback(shim_host) else ApiKeys.in_home(home_path)

    async def main() -> None:
        identity = load_or_create_identity(home_path / KEY_FILE_NAME)
        addrs = [Multiaddr.parse(a) for a in listen]
        async with open_host(identity, listen=addrs) as host, trio.open_nursery() as nursery:
            advertised = [Multiaddr.parse(a) for a in expand_addrs(map(str, host.listen_addrs))]
            public = [Multiaddr.parse(a).with_peer_id(host.peer_id) for a in announce]
            service = RelayService(host, limits, public_addrs=lambda: public or advertised)
            await nursery.start(service.run)
            AutoNatService(host)
            config = KadConfig(
                mode="server",
                bootstrap=tuple(Multiaddr.parse(b) for b in bootstrap),
                table_path=home_path / ROUTING_TABLE_FILE,
            )
            dht = KademliaDHT(host, config)
            await nursery.start(dht.run)
            nursery.start_soon(_announce, dht)
            shim_node = None
            if shim:
                settings = ShimSettings(
                    host=shim_host,
                    port=shim_port,
                    bootstrap=[str(a) for a in host.listen_addrs[:1]],
                    allow_dev=allow_dev,
                    keys=keys,
                    notice=SHIM_NOTICE,
                )
                shim_node = ShimNode(settings)
                try:
                    await nursery.start(shim_node.run)
                except InsecureBind as e:
                    fail(str(e))
            # Ctrl-C is caught before the lines that say we are up, so it always stops cleanly
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                for addr in advertised:
                    console.print(f"listening on {addr}")
                if shim_node is not None:
                    console.print(
                        f"OpenAI-compatible API on {shim_node.base_url} [yellow](relay shim: "
                        "this relay sees its prompts and outputs in plaintext; for privacy run "
                        "`dbloom shim` on your own machine)[/yellow]"
                    )
                console.print(
                    f"relaying for up to {limits.max_reservations} peers, "
                    f"{limits.max_circuits} circuits of at most {limits.circuit_seconds} s and "
                    f"{limits.circuit_bytes} bytes each way; Ctrl-C stops"
                )
                async for _ in signals:
                    break
            console.print("stopping")
            nursery.cancel_scope.cancel()

    run(main)


async def _announce(dht: KademliaDHT) -> None:
    """Provide `dbloom:relay`; the DHT republishes it from then on."""
    with trio.move_on_after(ANNOUNCE_TIMEOUT):
        stored = await dht.provide(provider_key(RELAY_KEY))
        log.info("announced as a relay at %d peers", stored)
