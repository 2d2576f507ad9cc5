"""dbloom's host against a stock js-libp2p node, both directions, over TCP + Noise + yamux."""

from __future__ import annotations

import os

import pytest
import trio
from jsnode import js_dial, js_listener, node_available

from dbloom.p2p import HostConfig, KeyPair, Multiaddr, NetStream, PeerId, identify, open_host, ping

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not node_available(), reason="node/npm not installed"),
]

ECHO = "/dbloom/echo/1.0.0"


async def echo(stream: NetStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@pytest.mark.parametrize("payload_size", [1000, 1 << 20])
async def test_js_dials_dbloom(payload_size: int) -> None:
    async with open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as host:
        host.set_stream_handler(ECHO, echo)
        addr = str(host.listen_addrs[0])
        events = await js_dial(addr, echo_protocol=ECHO, payload_size=payload_size)
        kinds = [e["event"] for e in events]
        assert kinds == ["ping", "ping", "ping", "identify", "echo", "done"], events
        seen = next(e for e in events if e["event"] == "identify")
        assert seen["peer_id"] == str(host.peer_id)
        assert seen["agent"].startswith("dbloom/")
        assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", ECHO} <= set(seen["protocols"])
        assert seen["listen_addrs"] == [addr.split("/p2p/")[0]]
        assert seen["observed_addr"].startswith("/ip4/127.0.0.1/tcp/")
        assert seen["elapsed_ms"] < 4000  # we half-close after identify, as js expects
        assert next(e for e in events if e["event"] == "echo")["bytes"] == payload_size


@pytest.mark.parametrize("early_muxer", [True, False], ids=["early-muxer", "multistream-muxer"])
async def test_dbloom_dials_js(early_muxer: bool) -> None:
    # Without our muxer list, both sides must fall back to multistream for yamux.
    config = HostConfig(early_muxer_negotiation=early_muxer)
    async with (
        js_listener(echo_protocol=ECHO) as js,
        open_host(KeyPair.generate(), config=config) as host,
    ):
        target = Multiaddr.parse(js.addr)
        conn = await host.connect(target)
        assert conn.peer_id == PeerId.from_string(js.peer_id)
        rtts = await ping(host, conn.peer_id, count=3)
        assert len(rtts) == 3
        info = await identify(host, conn.peer_id)
        assert info.agent_version and info.agent_version.startswith("js-libp2p/")
        assert ECHO in info.protocols and info.public_key is not None
        assert info.observed_addr is not None and info.observed_addr.value_for("ip4") == "127.0.0.1"

        payload = os.urandom(1 << 20)
        stream = await host.new_stream(conn.peer_id, [ECHO])
        received = bytearray()

        async def reader() -> None:
            while data := await stream.receive_some():
                received.extend(data)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await stream.send_all(payload)
                await stream.send_eof()
        assert bytes(received) == payload

        their_view = await js.next_event("identify")
        assert their_view["peer_id"] == str(host.peer_id)
        assert their_view["agent"].startswith("dbloom/")
