"""`dbloom dht`: provide, find, get and put through the Kademlia DHT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import typer

from dbloom.p2p import KEY_FILE_NAME, KeyPair, Multiaddr, load_or_create_identity, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, node_record_key, open_node_record, provider_key

from ._common import console, fail, home_dir, run
from .p2p import wait_for_interrupt

app = typer.Typer(help="Use the Kademlia DHT.", no_args_is_help=True)

BOOTSTRAP_HELP = "Multiaddr of a DHT peer to start from (repeatable)."
MAX_VALUE_FILE = 64 * 1024


def _config(bootstrap: list[str], mode: str = "client") -> KadConfig:
    if not bootstrap:
        fail("give at least one --bootstrap MULTIADDR (a running `dbloom p2p serve --dht server`)")
    return KadConfig(
        mode="server" if mode == "server" else "client",
        bootstrap=tuple(Multiaddr.parse(b) for b in bootstrap),
    )


@asynccontextmanager
async def running_dht(
    config: KadConfig, identity: KeyPair | None = None, listen: tuple[str, ...] = ()
) -> AsyncIterator[KademliaDHT]:
    """A host with a bootstrapped DHT for the length of one command."""
    async with (
        open_host(identity or KeyPair.generate(), listen=listen) as host,
        trio.open_nursery() as nursery,
    ):
        dht = KademliaDHT(host, config)
        await nursery.start(dht.run)
        yield dht
        nursery.cancel_scope.cancel()


@app.command("provide")
def provide(
    key: str = typer.Argument(..., help="Name to provide, e.g. dbloom:model:tiny."),
    bootstrap: list[str] = typer.Option([], "--bootstrap", "-b", help=BOOTSTRAP_HELP),
    listen: str = typer.Option("/ip4/127.0.0.1/tcp/0", help="Where askers can reach us."),
    once: bool = typer.Option(False, help="Announce once and exit instead of staying up."),
    home: Path | None = typer.Option(None, help="Home folder holding the identity key."),
) -> None:
    """Announce that this peer provides KEY, and keep it announced until Ctrl-C."""

    async def main() -> None:
        config = _config(bootstrap, mode="server")
        identity = load_or_create_identity(home_dir(home) / KEY_FILE_NAME)
        async with running_dht(config, identity, (listen,)) as dht:
            stored = await dht.provide(provider_key(key))
            console.print(f"{dht.host.peer_id} provides {key!r}: stored at {stored} peers")
            if not once:
                console.print("keeping the record fresh; Ctrl-C to stop")
                await wait_for_interrupt()

    run(main)


@app.command("find-providers")
def find_providers(
    key: str = typer.Argument(..., help="Name to look up, e.g. dbloom:model:tiny."),
    bootstrap: list[str] = typer.Option([], "--bootstrap", "-b", help=BOOTSTRAP_HELP),
    count: int = typer.Option(20, min=1, max=200, help="Stop after this many providers."),
) -> None:
    """Print the providers of KEY as they are found."""

    async def main() -> None:
        config = _config(bootstrap)
        found = 0
        async with (
            running_dht(config) as dht,
            dht.find_providers(provider_key(key), count) as results,
        ):
            async for info in results:
                found += 1
                addrs = " ".join(str(a) for a in info.addrs) or "(no address)"
                console.print(f"{info.peer_id} {addrs}")
        console.print(f"{found} provider(s) of {key!r}")
        if not found:
            raise typer.Exit(1)

    run(main)


@app.command("get")
def get(
    key: str = typer.Argument(..., help="Value key, e.g. /dbloom/node/12D3KooW…"),
    bootstrap: list[str] = typer.Option([], "--bootstrap", "-b", help=BOOTSTRAP_HELP),
    quorum: int = typer.Option(3, min=1, max=20, help="Answers to collect before choosing."),
) -> None:
    """Print the best value stored under KEY."""

    async def main() -> bytes | None:
        config = _config(bootstrap)
        async with running_dht(config) as dht:
            return await dht.get(key.encode(), quorum=quorum)

    value = run(main)
    if value is None:
        fail(f"no value found for {key!r}")
    if key.startswith("/dbloom/node/"):
        record = open_node_record(value)
        console.print(
            f"node record of {record.peer_id}, seq {record.seq}, {len(record.data)} bytes"
        )
        console.print(record.data.hex())
    else:
        console.print(value.hex())


@app.command("put")
def put(
    key: str = typer.Argument(..., help="Value key; with --sign, this peer's /dbloom/node/<id>."),
    value_file: Path = typer.Argument(..., help="File holding the value (at most 64 KiB)."),
    bootstrap: list[str] = typer.Option([], "--bootstrap", "-b", help=BOOTSTRAP_HELP),
    sign: bool = typer.Option(False, help="Seal the file as this peer's signed node record."),
    home: Path | None = typer.Option(None, help="Home folder holding the identity key."),
) -> None:
    """Store VALUE-FILE under KEY at the closest peers."""
    if value_file.exists() and not value_file.is_file():
        fail(f"{value_file} is not a regular file")
    try:
        with value_file.open("rb") as f:
            data = f.read(MAX_VALUE_FILE + 1)  # a growing file cannot slip past the size check
    except OSError as exc:
        fail(f"cannot read {value_file}: {exc.strerror}")
    if len(data) > MAX_VALUE_FILE:
        fail(f"{value_file} is too big: DHT records hold at most {MAX_VALUE_FILE} bytes")

    async def main() -> None:
        config = _config(bootstrap)
        identity = load_or_create_identity(home_dir(home) / KEY_FILE_NAME)
        async with running_dht(config, identity) as dht:
            if sign:
                own_key = node_record_key(dht.host.peer_id)
                if key.encode() != own_key:
                    fail(f"--sign stores this peer's record: use {own_key.decode()}")
                stored = await dht.publish_node_record(data)
            else:
                stored = await dht.put(key.encode(), data)
            console.print(f"stored {key!r} at {stored} peers")

    run(main)
