"""The peers of the namespace tests, each run as its own process inside its own netns.

`python netns_roles.py node RELAY_ADDR` reserves on the relay and serves echo, printing
`reachable at <circuit addr>` and then `received <sha256>` per echoed stream;
`python netns_roles.py client TARGET MARKER` sends `payload(MARKER)` through the
circuit and prints `echoed <sha256>` if every byte came back.
`python netns_roles.py autorelay LISTEN BOOTSTRAP` finds out whether it can be dialed
and, if not, reserves on two relays from the DHT; it prints `reachability <verdict>`,
then `reachable at <circuit addr>` per reservation, then serves echo.
`punch-node RELAY` and `punch-client TARGET MARKER` are `node` and `client` with hole
punching (DCUtR) on: the client prints `direct <addr>` once the relayed connection has
been replaced by a direct one, then echoes over it. `fallback-client TARGET MARKER` gives
punching a few seconds, then echoes over whichever connection it has and says which.
"""

from __future__ import annotations

import hashlib
import sys

import trio

from dbloom.cli.p2p import wait_for_interrupt
from dbloom.p2p import Connection, Host, KeyPair, Multiaddr, NetStream, TcpTransport, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT
from dbloom.p2p.relay import (
    AutoRelay,
    AutoRelayConfig,
    HolePunchService,
    Reachability,
    RelayClient,
)

ECHO = "/test/echo/1.0.0"
DIAL_TIMEOUT = 10.0
SETTLE_TIMEOUT = 15.0
PUNCH_WINDOW = 8.0


def payload(marker: str) -> bytes:
    """A prompt-like body with the marker throughout, larger than one Noise frame."""
    line = f"user: please summarise the secret {marker} and keep it private\n".encode()
    return line * 2000


async def _echo(stream: NetStream) -> None:
    digest = hashlib.sha256()
    while data := await stream.receive_some():
        digest.update(data)
        await stream.send_all(data)
    await stream.send_eof()
    print(f"received {digest.hexdigest()}", flush=True)


async def node(relay_addr: str, punch: bool = False) -> None:
    tcp = TcpTransport(reuseport=punch)
    async with open_host(listen=["/ip4/0.0.0.0/tcp/4001"], transports=[tcp]) as host:
        host.set_stream_handler(ECHO, _echo)
        client = RelayClient(host)
        async with trio.open_nursery() as nursery:
            if punch:
                await nursery.start(HolePunchService(host, tcp).run)
            held = await nursery.start(client.keep_reservation, relay_addr)
            for addr in held.circuit_addrs:
                print(f"reachable at {addr.with_peer_id(host.peer_id)}", flush=True)
            await wait_for_interrupt()
            nursery.cancel_scope.cancel()


async def autorelay(listen: str, bootstrap: str) -> None:
    async with open_host(KeyPair.generate(), listen=[listen]) as host:
        host.set_stream_handler(ECHO, _echo)
        config = KadConfig(mode="client", bootstrap=(Multiaddr.parse(bootstrap),))
        dht = KademliaDHT(host, config)
        auto = AutoRelay(host, dht, config=AutoRelayConfig(retry_interval=0.5))
        async with trio.open_nursery() as nursery:
            await nursery.start(dht.run)
            await nursery.start(auto.run)
            with trio.fail_after(SETTLE_TIMEOUT):
                while not (
                    auto.reachability is Reachability.PUBLIC
                    or len(auto.client.reservations) >= auto.config.relays
                ):
                    await auto.changed.wait()
            print(f"reachability {auto.reachability.value}", flush=True)
            for addr in host.advertised_addrs:
                if "p2p-circuit" in addr.protocols():
                    print(f"reachable at {addr}", flush=True)
            await wait_for_interrupt()
            nursery.cancel_scope.cancel()


async def client(target: str, marker: str, punch: bool = False) -> None:
    tcp = TcpTransport(reuseport=punch)
    listen = ["/ip4/0.0.0.0/tcp/4001"] if punch else []
    async with (
        open_host(listen=listen, transports=[tcp]) as host,
        trio.open_nursery() as nursery,
    ):
        if punch:
            await nursery.start(HolePunchService(host, tcp).run)
        with trio.fail_after(DIAL_TIMEOUT):
            conn = await host.connect(target)
            assert conn.relayed, conn
            if punch:
                conn = await direct_connection(host, conn)
                print(f"direct {conn.remote_addr}", flush=True)
            await echo(conn, payload(marker))
        nursery.cancel_scope.cancel()


async def fallback_client(target: str, marker: str) -> None:
    """Like the punching client, but echoes over whatever it has after `PUNCH_WINDOW`:
    where the NATs defeat hole punching, the relayed connection must still work."""
    tcp = TcpTransport(reuseport=True)
    async with (
        open_host(listen=["/ip4/0.0.0.0/tcp/4001"], transports=[tcp]) as host,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(HolePunchService(host, tcp).run)
        with trio.fail_after(DIAL_TIMEOUT):
            conn = await host.connect(target)
        assert conn.relayed, conn
        with trio.move_on_after(PUNCH_WINDOW):
            conn = await direct_connection(host, conn)
        print(f"{'relayed' if conn.relayed else 'direct'} {conn.remote_addr}", flush=True)
        with trio.fail_after(DIAL_TIMEOUT):
            await echo(conn, payload(marker))
        nursery.cancel_scope.cancel()


async def direct_connection(host: Host, relayed: Connection) -> Connection:
    """The connection to the relayed peer once a hole punch has replaced the circuit."""
    while (conn := host.connection(relayed.peer_id)) is None or conn.relayed:
        await trio.sleep(0.05)
    return conn


async def echo(conn: Connection, body: bytes) -> None:
    stream = await conn.new_stream([ECHO])
    got = bytearray()
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(body)
            await stream.send_eof()

        nursery.start_soon(send)
        while data := await stream.receive_some():
            got += data
    if bytes(got) != body:
        sys.exit(f"echo differs: {len(got)} of {len(body)} bytes")
    print(f"echoed {hashlib.sha256(got).hexdigest()}", flush=True)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role.startswith("punch-"):
        trio.run({"punch-node": node, "punch-client": client}[role], *args, True)
    else:
        roles = {"node": node, "client": client, "autorelay": autorelay}
        trio.run({**roles, "fallback-client": fallback_client}[role], *args)
