"""js-libp2p ↔ js-libp2p: checks the interop harness itself (peer.mjs + jsnode.py)."""

from __future__ import annotations

import pytest
from jsnode import JsPeerError, js_dial, js_listener, node_available

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not node_available(), reason="node/npm not installed"),
]


@pytest.mark.parametrize("payload_size", [1000, 1 << 20])
async def test_js_dials_js(payload_size: int) -> None:
    async with js_listener() as listener:
        assert listener.peer_id.startswith("12D3KooW")
        assert listener.addr.startswith("/ip4/127.0.0.1/tcp/")
        assert listener.addr.endswith(f"/p2p/{listener.peer_id}")

        events = await js_dial(listener.addr, payload_size=payload_size)
        kinds = [e["event"] for e in events]
        assert kinds == ["ping", "ping", "ping", "identify", "echo", "done"], events

        remote = next(e for e in events if e["event"] == "identify")
        assert remote["peer_id"] == listener.peer_id
        assert remote["agent"].startswith("js-libp2p/")
        assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/dbloom/echo/1.0.0"} <= set(
            remote["protocols"]
        )
        assert any(a.startswith("/ip4/127.0.0.1/tcp/") for a in remote["listen_addrs"])
        assert remote["observed_addr"].startswith("/ip4/127.0.0.1/tcp/")
        assert remote["public_key"].startswith("08011220")  # protobuf Ed25519 public key
        assert remote["elapsed_ms"] < 4000  # remote half-closed after its identify message
        assert next(e for e in events if e["event"] == "echo") == {
            "event": "echo",
            "ok": True,
            "bytes": payload_size,
        }

        conn = await listener.next_event("connection")
        seen = await listener.next_event("identify")
        assert conn["peer_id"] == seen["peer_id"] != listener.peer_id
        assert conn["direction"] == "inbound"
        assert "/ipfs/ping/1.0.0" in seen["protocols"]


async def test_dial_failure_is_reported() -> None:
    async with js_listener() as listener:
        addr = listener.addr
    # the listener is gone: the dial must fail fast with a readable error
    with pytest.raises(JsPeerError, match="dial"):
        await js_dial(addr, timeout=30)


async def test_unknown_protocol_is_an_error() -> None:
    async with js_listener(echo_protocol="/dbloom/echo/1.0.0") as listener:
        with pytest.raises(JsPeerError, match="echo"):
            await js_dial(listener.addr, echo_protocol="/dbloom/nope/1.0.0", timeout=30)
