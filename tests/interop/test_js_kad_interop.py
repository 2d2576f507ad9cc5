"""A stock js-libp2p Kademlia client finds what our DHT peers published, and the reverse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from jsnode import js_kad, js_kad_server, node_available

from dbloom.p2p import Host, KeyPair, Multiaddr, PeerId, open_host
from dbloom.p2p.kad import (
    KadConfig,
    KademliaDHT,
    node_record_key,
    open_node_record,
    provider_key,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not node_available(), reason="node/npm not installed"),
]

PROTOCOLS = ["/dbloom/kad/1.0.0", "/ipfs/kad/1.0.0"]


@asynccontextmanager
async def python_dht(n: int, protocol: str) -> AsyncIterator[tuple[list[Host], list[KademliaDHT]]]:
    """`n` of our DHT servers on loopback TCP, each bootstrapped from the first."""
    async with AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(
                open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"])
            )
            for _ in range(n)
        ]
        async with trio.open_nursery() as nursery:
            dhts = []
            for i, host in enumerate(hosts):
                boot = (hosts[0].listen_addrs[0],) if i else ()
                dht = KademliaDHT(host, KadConfig(protocol=protocol, bootstrap=boot))
                await nursery.start(dht.run)
                dhts.append(dht)
            for dht in dhts:
                await dht.refresh()
            yield hosts, dhts
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_js_client_finds_our_providers_and_records(protocol: str) -> None:
    async with python_dht(5, protocol) as (hosts, dhts):
        assert await dhts[2].provide(provider_key("dbloom:model:tiny")) >= 3
        assert await dhts[3].publish_node_record(b"first") >= 3
        assert await dhts[3].publish_node_record(b"second") >= 3
        key = node_record_key(hosts[3].peer_id).decode()
        events = await js_kad(
            [str(hosts[0].listen_addrs[0])],
            protocol=protocol,
            find_providers=["dbloom:model:tiny"],
            get=[key],
        )
        providers = next(e for e in events if e["event"] == "providers")
        assert [p["peer_id"] for p in providers["peers"]] == [str(hosts[2].peer_id)]
        assert any(a.startswith("/ip4/127.0.0.1/tcp/") for a in providers["peers"][0]["addrs"])
        value = next(e for e in events if e["event"] == "value")
        assert "value_hex" in value, value
        record = open_node_record(bytes.fromhex(value["value_hex"]))
        assert record.peer_id == hosts[3].peer_id and record.data == b"second"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_we_find_what_js_servers_provide(protocol: str) -> None:
    async with (
        js_kad_server(protocol=protocol) as first,
        js_kad_server([first.addr], protocol=protocol, provide=["dbloom:model:js"]) as second,
        open_host(KeyPair.generate()) as host,
        trio.open_nursery() as nursery,
    ):
        boot = (Multiaddr.parse(first.addr), Multiaddr.parse(second.addr))
        dht = KademliaDHT(host, KadConfig(protocol=protocol, mode="client", bootstrap=boot))
        await nursery.start(dht.run)
        with trio.fail_after(30):
            found = await dht.find_providers_list(provider_key("dbloom:model:js"))
        assert [p.peer_id for p in found] == [PeerId.from_string(second.peer_id)]
        nursery.cancel_scope.cancel()
