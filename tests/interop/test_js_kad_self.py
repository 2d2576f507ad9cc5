"""js DHT ↔ js DHT: checks the kad part of the interop harness (peer.mjs kad + jsnode.py).

Three js DHT servers (two bootstrap off the first); one js client provides and puts
through them, another finds the provider and gets the value.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
from jsnode import (
    Event,
    JsListener,
    JsPeerError,
    js_kad,
    js_kad_server,
    node_available,
    provider_cid,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not node_available(), reason="node/npm not installed"),
]

PROTOCOLS = ["/dbloom/kad/1.0.0", "/ipfs/kad/1.0.0"]
MODEL = "dbloom:model:tiny"
NODE_KEY = "/dbloom/node/12D3KooWTestPeerRecord"
NODE_VALUE = bytes.fromhex("0a0b0c") + b"dbloom node record"


def one(events: list[Event], kind: str, **match: object) -> Event:
    """The single event of ``kind`` whose fields equal ``match``."""
    found = [
        e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())
    ]
    assert len(found) == 1, (kind, match, events)
    return found[0]


async def start_servers(stack: AsyncExitStack, protocol: str, count: int = 3) -> list[JsListener]:
    first = await stack.enter_async_context(js_kad_server(protocol=protocol))
    servers = [first]
    for _ in range(count - 1):
        servers.append(
            await stack.enter_async_context(js_kad_server([first.addr], protocol=protocol))
        )
    return servers


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_js_client_finds_what_another_js_client_published(protocol: str) -> None:
    async with AsyncExitStack() as stack:
        servers = await start_servers(stack, protocol)
        for server in servers[1:]:
            booted = await server.next_event("bootstrapped")
            assert booted["routing_table_size"] >= 1
            # servers advertise the DHT protocol in identify; that is what lets them in
            seen = await server.next_event("identify")
            assert seen["peer_id"] == servers[0].peer_id
            assert protocol in seen["protocols"]

        publisher = await js_kad(
            [s.addr for s in servers],
            protocol=protocol,
            provide=[MODEL],
            put={NODE_KEY: NODE_VALUE},
        )
        assert [e["event"] for e in publisher] == [
            "listening",
            *["routing_table_add"] * len(servers),
            "bootstrapped",
            "provided",
            "put",
            "done",
        ], publisher
        me = one(publisher, "listening")
        assert one(publisher, "bootstrapped")["routing_table_size"] == len(servers)
        provided = one(publisher, "provided", name=MODEL)
        assert provided["cid"] == provider_cid(MODEL)
        assert provided["peers"] == len(servers)
        assert one(publisher, "put", key=NODE_KEY)["peers"] == len(servers)

        # the finder knows only the last server and must get the rest from the DHT
        finder = await js_kad(
            [servers[-1].addr],
            protocol=protocol,
            find_providers=[MODEL, "dbloom:model:nobody"],
            get=[NODE_KEY, "/dbloom/node/missing"],
        )
        assert finder[-1] == {"event": "done", "ok": True}, finder
        providers = one(finder, "providers", name=MODEL)
        assert providers["cid"] == provider_cid(MODEL)
        assert providers["timed_out"] is False
        assert [p["peer_id"] for p in providers["peers"]] == [me["peer_id"]], providers
        # provider addresses come without the /p2p suffix
        assert {a.split("/p2p/")[0] for a in me["addrs"]} <= set(providers["peers"][0]["addrs"])
        assert one(finder, "providers", name="dbloom:model:nobody")["peers"] == []

        value = one(finder, "value", key=NODE_KEY)
        assert value["value_hex"] == NODE_VALUE.hex(), value
        assert "error" in one(finder, "value", key="/dbloom/node/missing")


async def test_js_server_can_publish_at_startup() -> None:
    # the js_kad_server form the lead can point at Python peers: bootstrap, provide, put
    async with AsyncExitStack() as stack:
        (first,) = await start_servers(stack, PROTOCOLS[0], count=1)
        second = await stack.enter_async_context(
            js_kad_server([first.addr], provide=[MODEL], put=[(NODE_KEY, NODE_VALUE)])
        )
        assert (await second.next_event("provided"))["peers"] >= 1
        assert (await second.next_event("put"))["peers"] >= 1
        events = await js_kad([first.addr], find_providers=[MODEL], get=[NODE_KEY])
        assert [p["peer_id"] for p in one(events, "providers")["peers"]] == [second.peer_id]
        assert one(events, "value")["value_hex"] == NODE_VALUE.hex()


@pytest.mark.slow
async def test_protocol_mismatch_is_reported() -> None:
    # js only adds peers that list its DHT protocol in identify: the routing table stays empty
    async with js_kad_server(protocol="/dbloom/kad/1.0.0") as server:
        with pytest.raises(JsPeerError, match="routing table still empty"):
            await js_kad([server.addr], protocol="/ipfs/kad/1.0.0", get=[NODE_KEY], timeout=40)


async def test_bad_arguments_are_errors() -> None:
    with pytest.raises(JsPeerError, match="bootstrap"):
        await js_kad([], get=[NODE_KEY], timeout=20)
    with pytest.raises(JsPeerError, match="KEY=HEXVALUE"):
        await js_kad(["/ip4/127.0.0.1/tcp/1"], extra_args=["--put", "/dbloom/x=xyz"], timeout=20)
