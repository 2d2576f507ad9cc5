"""Who reads a yamux connection: the streams themselves, else the background task.

Over real loopback TCP (`TcpStream`), where a stream closed from another task
stops its own read through `interrupt_receive` instead of a cancel scope.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
import trio
import trio.testing

from dbloom.p2p._memory import LinkProfile, MemoryStream, _Pipe
from dbloom.p2p._streams import ReceiveInterrupted
from dbloom.p2p._tcp import TcpStream
from dbloom.p2p.yamux import Role, YamuxConnection, YamuxStream
from dbloom.p2p.yamux._trio import READ_LEASE

HEADER = struct.Struct(">BBHII")  # yamux: version, type, flags, stream id, length


def tcp_pair() -> tuple[TcpStream, TcpStream]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return TcpStream(a), TcpStream(b)


async def tcp_connections(nursery: trio.Nursery) -> tuple[YamuxConnection, YamuxConnection]:
    a, b = tcp_pair()
    client = YamuxConnection(a, Role.CLIENT)
    server = YamuxConnection(b, Role.SERVER)
    await nursery.start(client.run)
    await nursery.start(server.run)
    return client, server


async def tcp_stream_pair(nursery: trio.Nursery) -> tuple[YamuxStream, YamuxStream]:
    client, server = await tcp_connections(nursery)
    outbound = await client.open_stream()
    await outbound.send_all(b"!")  # the SYN travels with the first data
    inbound = await server.accept_stream()
    assert await inbound.receive_some() == b"!"
    return outbound, inbound


async def leased_stream(
    client: YamuxConnection, server: YamuxConnection
) -> tuple[YamuxStream, YamuxStream]:
    """A stream and its peer after one exchange each way: the stream has just read,
    so it holds the lease and its next wait reads the transport itself."""
    stream = await client.open_stream()
    await stream.send_all(b"q")
    peer = await server.accept_stream()
    assert await peer.receive_some() == b"q"
    await peer.send_all(b"a")
    assert await stream.receive_some() == b"a"
    return stream, peer


async def test_half_closeable_stream_contract_over_tcp(nursery: trio.Nursery) -> None:
    async def maker() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        return await tcp_stream_pair(nursery)

    await trio.testing.check_half_closeable_stream(maker, None)


async def test_closing_a_stream_from_another_task_stops_its_read(nursery: trio.Nursery) -> None:
    client, server = await tcp_connections(nursery)
    stream, _ = await leased_stream(client, server)
    outcome: list[type[BaseException]] = []

    async def read() -> None:
        try:
            await stream.receive_some()
        except trio.ClosedResourceError as exc:
            outcome.append(type(exc))

    async with trio.open_nursery() as inner:
        inner.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert client._reader is stream._recv_lot  # the stream reads the socket itself
        with trio.fail_after(5):
            await stream.aclose()
    assert outcome == [trio.ClosedResourceError]
    # The connection lives on: another stream still works both ways.
    other = await client.open_stream()
    await other.send_all(b"ping")
    other_peer = await server.accept_stream()
    assert await other_peer.receive_some() == b"ping"
    await other_peer.send_all(b"pong")
    with trio.fail_after(5):
        assert await other.receive_some() == b"pong"


async def test_a_stream_reading_for_itself_delivers_to_the_others(
    nursery: trio.Nursery,
) -> None:
    client, server = await tcp_connections(nursery)
    streams = [await client.open_stream() for _ in range(20)]
    for i, stream in enumerate(streams):
        await stream.send_all(bytes([i]))
    peers = {}
    for _ in streams:
        peer = await server.accept_stream()
        peers[(await peer.receive_some())[0]] = peer
    got: dict[int, bytes] = {}

    async def read(i: int) -> None:
        got[i] = await streams[i].receive_some()

    async with trio.open_nursery() as inner:
        for i in range(20):
            inner.start_soon(read, i)
        await trio.testing.wait_all_tasks_blocked()
        for i in reversed(range(20)):
            await peers[i].send_all(b"answer %d" % i)
    assert got == {i: b"answer %d" % i for i in range(20)}


async def test_frames_nobody_waits_for_are_read_after_the_lease(nursery: trio.Nursery) -> None:
    client, server = await tcp_connections(nursery)
    await leased_stream(client, server)
    # Nobody on the client waits to read now; the peer opens a stream and pings.
    fresh = await server.open_stream()
    await fresh.send_all(b"new")
    with trio.fail_after(5):
        rtt = await server.ping(5)
        accepted = await client.accept_stream()
    assert await accepted.receive_some() == b"new"
    assert rtt < 5


async def test_the_background_task_takes_over_when_the_lease_ends() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await tcp_connections(nursery)
        await leased_stream(client, server)
        assert client._reader is None  # leased to the stream that just read
        await trio.sleep(READ_LEASE * 5)
        await trio.testing.wait_all_tasks_blocked()
        assert client._reader is not None  # the background task reads again
        nursery.cancel_scope.cancel()


async def test_interrupted_tcp_receive_loses_nothing_and_spares_a_waiting_writer() -> None:
    a, b = tcp_pair()
    a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    b.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    results: list[object] = []
    blob = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold

    async def read() -> None:
        try:
            await a.receive_some()
        except ReceiveInterrupted as exc:
            results.append(exc)

    async def write() -> None:
        await a.send_all(blob)
        results.append("written")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []  # reader waits for data, writer for room
        a.interrupt_receive()
        await trio.testing.wait_all_tasks_blocked()
        assert len(results) == 1 and isinstance(results[0], ReceiveInterrupted)
        received = bytearray()
        while len(received) < len(blob):
            received += await b.receive_some()
        await b.send_all(b"after")
    assert results[1] == "written"
    assert bytes(received) == blob
    assert await a.receive_some() == b"after"
    a.interrupt_receive()  # nobody reads: nothing happens
    await b.send_all(b"more")
    assert await a.receive_some() == b"more"
    await a.aclose()
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await a.receive_some()


class _InterruptAfterFirstRecv(trio.abc.Instrument):
    """Interrupts `stream` while its task sits in the yield after a recv that
    needed no wait: the moment a layer above may read on for the rest of a frame."""

    def __init__(self, stream: TcpStream) -> None:
        self.stream = stream
        self.fired = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        s = self.stream
        if not self.fired and s._recv_busy and not s._receive_waiting:
            self.fired = True
            s.interrupt_receive()


async def test_an_interrupt_between_a_partial_read_and_the_next_wait_is_kept() -> None:
    a, b = tcp_pair()
    await b.send_all(b"half a frame")
    await trio.sleep(0.05)  # in a's socket buffer: the next recv needs no wait
    outcome: list[object] = []

    async def read_a_frame() -> None:  # as NoiseStream does: read on until it is whole
        outcome.append(await a.receive_some())
        try:
            await a.receive_some()
        except ReceiveInterrupted:
            outcome.append("interrupted")

    instrument = _InterruptAfterFirstRecv(a)
    trio.lowlevel.add_instrument(instrument)
    try:
        with trio.fail_after(5):
            await read_a_frame()
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert instrument.fired
    assert outcome == [b"half a frame", "interrupted"]
    await b.send_all(b"rest")
    assert await a.receive_some() == b"rest"
    await a.aclose()
    await b.aclose()


async def test_closing_the_connection_wakes_a_stream_reading_for_itself_at_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        raw, _ = listener.accept()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    conn = YamuxConnection(TcpStream(a), Role.CLIENT)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        stream = await conn.open_stream()
        await stream.send_all(b"x")
        sid = stream.stream_id
        raw.sendall(HEADER.pack(0, 1, 0x2, sid, 0) + HEADER.pack(0, 0, 0, sid, 1) + b"y")
        assert await stream.receive_some() == b"y"  # the stream holds the lease
        woken: list[float] = []

        async def read() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            woken.append(trio.current_time())

        async def write_to_a_peer_that_never_reads() -> None:
            other = await conn.open_stream()
            with pytest.raises(trio.BrokenResourceError):
                await other.send_all(b"w" * 200_000)

        nursery.start_soon(read)
        nursery.start_soon(write_to_a_peer_that_never_reads)
        await trio.sleep(0.2)
        assert conn._reader is stream._recv_lot
        start = trio.current_time()
        await conn.aclose()  # waits up to GO_AWAY_TIMEOUT for the stuck transport
        assert woken and woken[0] - start < 0.5
    raw.close()


async def test_a_stream_reading_for_itself_is_still_a_checkpoint() -> None:
    first, second = (
        _Pipe(LinkProfile(), random.Random(0), 1 << 20),
        _Pipe(LinkProfile(), random.Random(1), 1 << 20),
    )
    client = YamuxConnection(MemoryStream(first, second), Role.CLIENT)
    server = YamuxConnection(MemoryStream(second, first), Role.SERVER)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        stream, peer = await leased_stream(client, server)
        await peer.send_all(b"2")  # already in the pipe: reading it needs no wait
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.receive_some()
        assert scope.cancelled_caught
        assert await stream.receive_some() == b"2"  # nothing lost
        nursery.cancel_scope.cancel()


async def test_a_stream_opened_after_the_session_ended_is_ignored() -> None:
    ours, raw = trio.testing.memory_stream_pair()
    conn = YamuxConnection(ours, Role.CLIENT)
    ended: list[BaseException | None] = []

    async def run_conn(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await conn.run(task_status=task_status)
            ended.append(None)
        except BaseException as exc:  # what run() lets out is the point of this test
            ended.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_conn)
        # Ended without a GoAway, as a failed write ends it, while its transport
        # still delivers: the peer's SYN is read after the accept channel closed.
        conn._terminate("write failed", None)
        await raw.send_all(HEADER.pack(0, 1, 0x1, 2, 0))
        await trio.testing.wait_all_tasks_blocked()
        await raw.aclose()
    assert ended == [None]
