"""Identify (`/ipfs/id/1.0.0` and `/push`): tell peers who we are, learn who they are."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ._errors import ErrorCode, RemoteProtocolError
from ._identify_core import (
    IDENTIFY,
    IDENTIFY_PUSH,
    MAX_IDENTIFY_BYTES,
    PROTOCOL_VERSION,
    IdentifyInfo,
)
from ._wire import FrameReader, encode_frame

if TYPE_CHECKING:
    from ._host import Connection, Host, NetStream
    from ._identity import PeerId
    from ._multiaddr import Multiaddr

log = logging.getLogger("dbloom.p2p")
IDENTIFY_TIMEOUT = 10.0


def own_info(host: Host, observed: Multiaddr | None) -> IdentifyInfo:
    """What we say about ourselves to a peer that sees us at `observed`."""
    return IdentifyInfo(
        protocol_version=PROTOCOL_VERSION,
        agent_version=host.config.agent_version,
        public_key=host.identity.public_key,
        listen_addrs=tuple(addr.without_peer_id() for addr in host.advertised_addrs),
        observed_addr=observed,
        protocols=tuple(host.protocols),
    )


async def _read_info(stream: NetStream) -> IdentifyInfo:
    reader = FrameReader(max_size=MAX_IDENTIFY_BYTES)
    while True:
        frame = reader.next_frame()
        if frame is not None:
            return IdentifyInfo.from_bytes(frame)
        data = await stream.receive_some()
        if not data:
            raise RemoteProtocolError("identify stream ended before a whole message")
        reader.receive_data(data)


def _record(host: Host, peer: PeerId, info: IdentifyInfo) -> None:
    if info.public_key is not None and not peer.matches(info.public_key):
        raise RemoteProtocolError(
            "identify carries a public key that is not the peer's", ErrorCode.AUTH
        )
    store = host.peerstore
    if info.listen_addrs:
        store.add_addrs(peer, list(info.listen_addrs), host.config.addr_ttl, trio.current_time())
    if info.protocols or info.agent_version:
        store.set_identify(peer, protocols=list(info.protocols), agent=info.agent_version)
    host.notify_identified(peer, info)


async def _serve_identify(stream: NetStream) -> None:
    info = own_info(stream.connection.host, stream.connection.remote_addr)
    await stream.send_all(encode_frame(info.to_bytes()))
    await stream.send_eof()


async def _serve_push(stream: NetStream) -> None:
    with trio.fail_after(IDENTIFY_TIMEOUT):
        info = await _read_info(stream)
    _record(stream.connection.host, stream.peer_id, info)


def register_identify(host: Host) -> None:
    """Answer identify and accept identify pushes on `host`."""
    host.set_stream_handler(IDENTIFY, _serve_identify)
    host.set_stream_handler(IDENTIFY_PUSH, _serve_push)


async def identify(
    host: Host, peer: PeerId | Multiaddr | str, *, timeout: float = IDENTIFY_TIMEOUT
) -> IdentifyInfo:
    """Ask a peer who it is; the answer is checked against its peer id and stored."""
    stream = await host.new_stream(peer, [IDENTIFY], timeout=timeout, lazy=True)
    try:
        with trio.fail_after(timeout):
            info = await _read_info(stream)
    finally:
        await stream.aclose()
    _record(host, stream.peer_id, info)
    return info


async def identify_connection(host: Host, conn: Connection) -> None:
    """Identify a freshly connected peer in the background; failures are logged, not fatal."""
    try:
        stream = await conn.new_stream([IDENTIFY], timeout=IDENTIFY_TIMEOUT, lazy=True)
        try:
            with trio.fail_after(IDENTIFY_TIMEOUT):
                info = await _read_info(stream)
        finally:
            await stream.aclose()
        _record(host, conn.peer_id, info)
        conn.identified = info
    except (
        RemoteProtocolError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    ) as exc:
        log.debug("identify of %s failed: %s", conn.peer_id, exc)
