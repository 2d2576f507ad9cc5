"""Hostile peers cost only their own connection; a well-behaved peer is served throughout."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from dbloom.p2p import Host, HostConfig, KeyPair, NetStream, multistream, noise, open_host, ping
from dbloom.p2p._transport import tcp_host_port

HOLD = "/test/hold/1.0.0"
FIREHOSE = "/test/firehose/1.0.0"


async def hold(stream: NetStream) -> None:
    await trio.sleep_forever()


async def firehose(stream: NetStream) -> None:
    chunk = b"\xaa" * 65536
    while True:
        await stream.send_all(chunk)


@asynccontextmanager
async def server(config: HostConfig | None = None) -> AsyncIterator[Host]:
    async with open_host(
        KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"], config=config
    ) as host:
        host.set_stream_handler(HOLD, hold)
        host.set_stream_handler(FIREHOSE, firehose)
        yield host


async def raw_tcp(host: Host) -> trio.SocketStream:
    address, port = tcp_host_port(host.listen_addrs[0])
    return await trio.open_tcp_stream(address, port)


async def wait_closed(stream: trio.abc.Stream, timeout: float = 10) -> None:
    """Read until the server closes us (EOF or reset)."""
    with trio.fail_after(timeout):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass


async def good_peer_is_served(target: Host) -> None:
    async with open_host(KeyPair.generate()) as good:
        with trio.fail_after(5):
            await ping(good, target.listen_addrs[0], count=2)


async def test_garbage_before_handshake() -> None:
    async with server() as host:
        sockets = []
        for _ in range(5):
            sock = await raw_tcp(host)
            await sock.send_all(os.urandom(2000))
            sockets.append(sock)
        await good_peer_is_served(host)
        for sock in sockets:
            await wait_closed(sock)
        await good_peer_is_served(host)


async def test_garbage_inside_noise_handshake() -> None:
    async with server() as host:
        sock = await raw_tcp(host)
        await sock.send_all(
            multistream.encode_message("/multistream/1.0.0") + multistream.encode_message("/noise")
        )
        await sock.send_all(b"\x00\x20" + os.urandom(32) + b"\x01\x00" + os.urandom(256))
        await wait_closed(sock)
        await good_peer_is_served(host)


async def test_oversized_multistream_message() -> None:
    async with server() as host:
        sock = await raw_tcp(host)
        await sock.send_all(b"\xa0\x8d\x06" + b"x" * 1000)  # claims a 100,000-byte line
        await wait_closed(sock)
        await good_peer_is_served(host)


async def _secured(host: Host, identity: KeyPair | None = None) -> noise.NoiseStream:
    """Handshake by hand, so we can then write any bytes we like inside the channel."""
    sock = await raw_tcp(host)
    _, rest = await multistream.negotiate(sock, multistream.Role.INITIATOR, ["/noise"])
    done, stream = await noise.secure(
        sock,
        noise.Role.INITIATOR,
        identity or KeyPair.generate(),
        muxers=["/yamux/1.0.0"],
        pending=rest,
    )
    assert done.muxer == "/yamux/1.0.0"
    return stream


async def test_oversized_yamux_frame() -> None:
    async with server() as host:
        stream = await _secured(host)
        header = struct.pack(">BBHII", 0, 0, 1, 1, 0x7FFF_FFFF)  # data, SYN, stream 1, 2 GiB
        await stream.send_all(header + b"x" * 1000)
        await wait_closed(stream)
        await good_peer_is_served(host)


async def test_garbage_yamux_frames() -> None:
    async with server() as host:
        stream = await _secured(host)
        await stream.send_all(os.urandom(4096))
        await wait_closed(stream)
        await good_peer_is_served(host)


async def test_streams_past_the_limit() -> None:
    async with server() as host, open_host(KeyPair.generate()) as evil:
        conn = await evil.connect(host.listen_addrs[0])
        opened = refused = 0

        async def open_one() -> None:
            nonlocal opened, refused
            try:
                await conn.new_stream([HOLD], timeout=5)
                opened += 1
            except Exception:
                refused += 1

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(400):
                    nursery.start_soon(open_one)
        limit = host.config.yamux.max_streams
        assert opened <= limit and refused >= 400 - limit
        await good_peer_is_served(host)


async def test_handshake_slowloris_is_timed_out() -> None:
    async with server(HostConfig(upgrade_timeout=0.5)) as host:
        idle = [await raw_tcp(host) for _ in range(10)]
        await good_peer_is_served(host)
        for sock in idle:
            await wait_closed(sock, timeout=5)


async def test_reader_that_stops_reading_stalls_only_its_stream() -> None:
    async with server() as host, open_host(KeyPair.generate()) as lazy:
        stalled = await lazy.new_stream(host.listen_addrs[0], [FIREHOSE])
        await trio.sleep(0.2)  # the firehose fills the stream window and blocks
        # the same connection still carries other streams
        with trio.fail_after(5):
            await ping(lazy, host.peer_id)
        await good_peer_is_served(host)
        assert (await stalled.receive_some(10)) == b"\xaa" * 10
        await stalled.reset()


async def test_peer_that_stops_reading_tcp_is_dropped() -> None:
    evil = KeyPair.generate()
    async with server(HostConfig(write_timeout=1.0)) as host:
        stream = await _secured(host, evil)
        # Open a firehose stream granting a 2 GiB window, then never read the socket again.
        hello = multistream.encode_message("/multistream/1.0.0") + multistream.encode_message(
            FIREHOSE
        )
        await stream.send_all(
            struct.pack(">BBHII", 0, 1, 1, 1, 0x7FFF0000)
            + struct.pack(">BBHII", 0, 0, 0, 1, len(hello))
            + hello
        )
        with trio.fail_after(5):
            while host.connection(evil.peer_id) is None:
                await trio.sleep(0.01)
        await good_peer_is_served(host)
        with trio.fail_after(20):
            while host.connection(evil.peer_id) is not None:
                await trio.sleep(0.1)
        await good_peer_is_served(host)


@pytest.mark.parametrize("size", [0, 1, 31])
async def test_short_ping_payloads_do_not_crash(size: int) -> None:
    async with server() as host, open_host(KeyPair.generate()) as client:
        stream = await client.new_stream(host.listen_addrs[0], ["/ipfs/ping/1.0.0"])
        await stream.send_all(b"p" * size)
        await stream.send_eof()
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
        await good_peer_is_served(host)


async def silent_sockets_from(host: Host, source_ip: str, count: int) -> list[trio.SocketStream]:
    """`count` TCP connections from `source_ip` that never send a byte."""
    address, port = tcp_host_port(host.listen_addrs[0])
    sockets = []
    for _ in range(count):
        sock = trio.socket.socket()
        try:
            await sock.bind((source_ip, 0))
        except OSError:
            sock.close()
            pytest.skip(f"cannot bind {source_ip} here (only 127.0.0.1 is a loopback address)")
        await sock.connect((address, port))
        sockets.append(trio.SocketStream(sock))
    return sockets


async def test_silent_sockets_from_one_address_cannot_lock_others_out() -> None:
    # Every handshake slot held by sockets from 127.0.0.2 that never speak: a peer from
    # another address still gets in (it displaces one of them), and the silent address
    # cannot take the slot back while it holds the most.
    config = HostConfig(max_pending_inbound=8, upgrade_timeout=60)
    async with server(config) as host:
        sockets = await silent_sockets_from(host, "127.0.0.2", 8)
        await handshakes_pending(host, 8)
        await good_peer_is_served(host)
        assert host.evicted_inbound >= 1
        evicted = [s for s in sockets if await closed_within(s, 0.5)]
        assert len(evicted) == host.evicted_inbound
        # The good handshake finished, so one slot is free again: the silent address
        # takes it, and its next socket finds the table full and itself the heaviest.
        refill, late = await silent_sockets_from(host, "127.0.0.2", 2)
        await wait_closed(late, timeout=5)
        assert host.refused_inbound == 1
        assert not await closed_within(refill, 0.2)
        await good_peer_is_served(host)
        for sock in [*sockets, refill]:
            await sock.aclose()


async def test_a_full_handshake_table_refuses_the_source_that_filled_it() -> None:
    config = HostConfig(max_pending_inbound=4, upgrade_timeout=60)
    async with server(config) as host:
        sockets = await silent_sockets_from(host, "127.0.0.1", 4)
        await handshakes_pending(host, 4)
        (late,) = await silent_sockets_from(host, "127.0.0.1", 1)
        await wait_closed(late, timeout=5)
        assert host.refused_inbound == 1 and host.evicted_inbound == 0
        for sock in sockets:
            assert not await closed_within(sock, 0.2)
            await sock.aclose()


async def handshakes_pending(host: Host, count: int) -> None:
    """Wait until `count` inbound handshakes are under way on `host`."""
    with trio.fail_after(5):
        while len(host._pending) < count:
            await trio.sleep(0.01)


async def closed_within(stream: trio.abc.Stream, seconds: float) -> bool:
    """True if the server closed `stream` within `seconds` (EOF or reset)."""
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False
