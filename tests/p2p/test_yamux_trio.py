"""The trio yamux shell over in-memory transports."""

from __future__ import annotations

import os
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from dbloom.p2p import LocalProtocolError, RemoteProtocolError
from dbloom.p2p.yamux import (
    INITIAL_WINDOW,
    Role,
    YamuxConfig,
    YamuxConnection,
    YamuxStream,
)
from dbloom.p2p.yamux._trio import GO_AWAY_TIMEOUT

HEADER = struct.Struct(">BBHII")
SMALL_WINDOW = YamuxConfig(window_size=INITIAL_WINDOW)


async def connected(
    nursery: trio.Nursery,
    config: YamuxConfig = SMALL_WINDOW,
    *,
    accept_backlog: int = 256,
) -> tuple[YamuxConnection, YamuxConnection]:
    """A client and a server connection over a memory stream pair, both running."""
    a, b = trio.testing.memory_stream_pair()
    client = YamuxConnection(a, Role.CLIENT, config)
    server = YamuxConnection(b, Role.SERVER, config, accept_backlog=accept_backlog)
    await nursery.start(client.run)
    await nursery.start(server.run)
    return client, server


async def stream_pair(
    nursery: trio.Nursery, config: YamuxConfig = SMALL_WINDOW
) -> tuple[YamuxStream, YamuxStream]:
    client, server = await connected(nursery, config)
    outbound = await client.open_stream()
    inbound = await server.accept_stream()
    return outbound, inbound


async def test_half_closeable_stream_contract(nursery: trio.Nursery) -> None:
    async def maker() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        return await stream_pair(nursery)

    async def clogged_maker() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        # Fill both send windows (the checker flips the pair), so the next send
        # blocks until the peer reads.
        outbound, inbound = await stream_pair(nursery)
        await outbound.send_all(b"x" * INITIAL_WINDOW)
        await inbound.send_all(b"x" * INITIAL_WINDOW)
        return outbound, inbound

    await trio.testing.check_half_closeable_stream(maker, clogged_maker)


async def test_many_concurrent_streams_echo(nursery: trio.Nursery) -> None:
    client, server = await connected(nursery)

    async def echo_server() -> None:
        async with trio.open_nursery() as inner:
            for _ in range(100):
                stream = await server.accept_stream()
                inner.start_soon(echo, stream)

    async def echo(stream: YamuxStream) -> None:
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.aclose()

    async def one_client(i: int) -> None:
        stream = await client.open_stream()
        payload = os.urandom(1000 + i * 97)
        await stream.send_all(payload)
        await stream.send_eof()
        got = bytearray()
        while data := await stream.receive_some():
            got += data
        assert got == payload
        await stream.aclose()

    async with trio.open_nursery() as inner:
        inner.start_soon(echo_server)
        for i in range(100):
            inner.start_soon(one_client, i)
    await trio.testing.wait_all_tasks_blocked()
    assert client.num_streams == 0
    assert server.num_streams == 0


async def test_slow_reader_blocks_only_its_own_writer(nursery: trio.Nursery) -> None:
    client, server = await connected(nursery)
    stuck = await client.open_stream()
    stuck_peer = await server.accept_stream()
    fast = await client.open_stream()
    fast_peer = await server.accept_stream()
    stuck_done = trio.Event()

    async def fill_stuck() -> None:
        # One byte past the window: blocks until stuck_peer reads.
        await stuck.send_all(b"s" * (INITIAL_WINDOW + 1))
        stuck_done.set()

    nursery.start_soon(fill_stuck)
    await trio.testing.wait_all_tasks_blocked()
    assert not stuck_done.is_set()

    # Meanwhile the other stream moves several windows in both directions.
    payload = os.urandom(4 * INITIAL_WINDOW)

    async def echo_back() -> None:
        while data := await fast_peer.receive_some():
            await fast_peer.send_all(data)
        await fast_peer.send_eof()

    async def send_fast() -> None:
        await fast.send_all(payload)
        await fast.send_eof()

    got = bytearray()
    async with trio.open_nursery() as transfer:
        transfer.start_soon(echo_back)
        transfer.start_soon(send_fast)
        while data := await fast.receive_some():
            got += data
    assert got == payload
    assert not stuck_done.is_set()

    # Reading half a window on the stuck stream releases its writer.
    drained = 0
    while drained < INITIAL_WINDOW // 2:
        drained += len(await stuck_peer.receive_some())
    await stuck_done.wait()


async def test_write_timeout_when_peer_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # lockstep: every send_all waits for the other side's receive_some.
    a, _b = trio.testing.lockstep_stream_pair()
    conn = YamuxConnection(a, Role.CLIENT, write_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        stream = await conn.open_stream()
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.send_all(b"hello")
        assert isinstance(info.value.__cause__, trio.TooSlowError)
        assert trio.current_time() - start == pytest.approx(5.0)
        assert conn.is_closed
        with pytest.raises(trio.ClosedResourceError):
            await conn.accept_stream()
        with pytest.raises(trio.ClosedResourceError):
            await conn.open_stream()


async def test_garbage_ends_session_and_wakes_every_waiter(nursery: trio.Nursery) -> None:
    a, raw = trio.testing.memory_stream_pair()
    conn = YamuxConnection(a, Role.CLIENT, SMALL_WINDOW)
    failures: list[RemoteProtocolError] = []
    ended = trio.Event()

    async def run_conn(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await conn.run(task_status=task_status)
        except RemoteProtocolError as exc:
            failures.append(exc)
        finally:
            ended.set()

    await nursery.start(run_conn)
    reader = await conn.open_stream()
    writer = await conn.open_stream()
    # The raw peer accepts both streams with a window update of 0 extra bytes.
    for sid in (reader.stream_id, writer.stream_id):
        await raw.send_all(HEADER.pack(0, 1, 2, sid, 0))
    errors: dict[str, type[BaseException]] = {}

    async def expect(name: str, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            errors[name] = type(exc)

    async with trio.open_nursery() as waiters:
        waiters.start_soon(expect, "receive", reader.receive_some)
        waiters.start_soon(expect, "send", lambda: writer.send_all(b"w" * (INITIAL_WINDOW + 1)))
        waiters.start_soon(expect, "accept", conn.accept_stream)
        waiters.start_soon(expect, "ping", lambda: conn.ping(60))
        await trio.testing.wait_all_tasks_blocked()
        await raw.send_all(b"\x07" + bytes(11))  # version 7: not yamux
    await ended.wait()
    assert len(failures) == 1
    assert "version" in str(failures[0])
    assert errors == {
        "receive": trio.BrokenResourceError,
        "send": trio.BrokenResourceError,
        "accept": trio.ClosedResourceError,
        "ping": trio.ClosedResourceError,
    }
    assert conn.is_closed
    # The peer was told why before the connection dropped.
    wire = bytearray()
    while data := await raw.receive_some():
        wire += data
    assert wire[-12:] == HEADER.pack(0, 3, 0, 0, 1)


async def test_ten_mebibytes_intact(nursery: trio.Nursery) -> None:
    client, server = await connected(nursery, YamuxConfig())
    payload = os.urandom(10 << 20)
    sender = await client.open_stream()
    receiver = await server.accept_stream()

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, len(payload), 65536):
            await sender.send_all(view[start : start + 65536])
        await sender.send_eof()

    got = bytearray()
    async with trio.open_nursery() as inner:
        inner.start_soon(send)
        while data := await receiver.receive_some():
            got += data
    assert got == payload


async def test_ping_measures_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        client, server = await connected(nursery)
        rtt = await client.ping(timeout=1)
        assert rtt >= 0
        assert await server.ping(timeout=1) >= 0
        nursery.cancel_scope.cancel()


async def test_unaccepted_streams_past_the_backlog_are_reset(nursery: trio.Nursery) -> None:
    client, server = await connected(nursery, accept_backlog=2)
    streams = [await client.open_stream() for _ in range(3)]
    for stream in streams[:2]:
        await stream.send_all(b"hi")
    with pytest.raises(trio.BrokenResourceError):
        await streams[2].receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await streams[2].send_all(b"hi")
    assert server.rejected_streams == 1
    first = await server.accept_stream()
    assert await first.receive_some() == b"hi"


async def test_aclose_sends_go_away_and_ends_both_sides(nursery: trio.Nursery) -> None:
    client, server = await connected(nursery)
    stream = await client.open_stream()
    peer = await server.accept_stream()
    await client.aclose()
    await client.aclose()
    assert client.is_closed
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError):
        await peer.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await server.accept_stream()
    assert server.is_closed


async def test_go_away_from_peer_stops_open_stream(nursery: trio.Nursery) -> None:
    a, raw = trio.testing.memory_stream_pair()
    conn = YamuxConnection(a, Role.CLIENT)
    await nursery.start(conn.run)
    stream = await conn.open_stream()
    await raw.send_all(HEADER.pack(0, 1, 2, 1, 0) + HEADER.pack(0, 3, 0, 0, 0))  # ACK, GoAway
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.ClosedResourceError):
        await conn.open_stream()
    await stream.send_all(b"still fine")
    wire = await raw.receive_some()
    assert wire.endswith(HEADER.pack(0, 0, 0, 1, 10) + b"still fine")


async def test_reset_reaches_the_peer(nursery: trio.Nursery) -> None:
    client, server = await connected(nursery)
    stream = await client.open_stream()
    await stream.send_all(b"x")
    peer = await server.accept_stream()
    await stream.reset()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    assert await peer.receive_some() == b"x"
    with pytest.raises(trio.BrokenResourceError):
        await peer.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await peer.send_all(b"y")


async def test_open_stream_waits_while_the_ack_backlog_is_full(nursery: trio.Nursery) -> None:
    a, b = trio.testing.memory_stream_pair()
    client = YamuxConnection(a, Role.CLIENT, YamuxConfig(max_ack_backlog=1))
    server = YamuxConnection(b, Role.SERVER)
    await nursery.start(client.run)
    await client.open_stream()
    opened: list[YamuxStream] = []

    async def open_second() -> None:
        opened.append(await client.open_stream())

    nursery.start_soon(open_second)
    await trio.testing.wait_all_tasks_blocked()
    assert opened == []
    await nursery.start(server.run)  # the server's ACK makes room
    await trio.testing.wait_all_tasks_blocked()
    assert [s.stream_id for s in opened] == [3]


async def test_open_stream_past_max_streams_raises(nursery: trio.Nursery) -> None:
    client, _server = await connected(nursery, YamuxConfig(max_streams=1))
    await client.open_stream()
    with pytest.raises(LocalProtocolError):
        await client.open_stream()


async def test_peer_eof_ends_run_cleanly_and_keeps_finished_data(nursery: trio.Nursery) -> None:
    a, raw = trio.testing.memory_stream_pair()
    conn = YamuxConnection(a, Role.CLIENT)
    done = trio.Event()

    async def run_conn(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await conn.run(task_status=task_status)  # returns: EOF is no error
        done.set()

    await nursery.start(run_conn)
    finished = await conn.open_stream()
    cut = await conn.open_stream()
    await raw.send_all(
        HEADER.pack(0, 1, 2, 1, 0)  # ACK stream 1
        + HEADER.pack(0, 0, 4, 1, 2)  # data + FIN
        + b"hi"
        + HEADER.pack(0, 1, 2, 3, 0)  # ACK stream 3
    )
    await trio.testing.wait_all_tasks_blocked()
    await raw.aclose()
    await done.wait()
    assert await finished.receive_some() == b"hi"
    assert await finished.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await cut.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await cut.send_all(b"x")


async def test_cancelled_send_leaves_the_connection_usable(nursery: trio.Nursery) -> None:
    client, server = await connected(nursery)
    stream = await client.open_stream()
    await stream.send_all(b"x" * INITIAL_WINDOW)
    async with trio.open_nursery() as inner:
        inner.start_soon(stream.send_all, b"blocked on window")
        await trio.testing.wait_all_tasks_blocked()
        inner.cancel_scope.cancel()
    other = await client.open_stream()
    await other.send_all(b"ok")
    await server.accept_stream()
    other_peer = await server.accept_stream()
    assert await other_peer.receive_some() == b"ok"


async def test_aclose_does_not_hang_on_a_peer_that_stopped_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, _b = trio.testing.lockstep_stream_pair()
    conn = YamuxConnection(a, Role.CLIENT, write_timeout=1000.0)
    errors: list[BaseException] = []

    async def write_forever(stream: YamuxStream) -> None:
        try:
            await stream.send_all(b"stuck")
        except trio.BrokenResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        stream = await conn.open_stream()
        nursery.start_soon(write_forever, stream)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await conn.aclose()
        assert trio.current_time() - start <= GO_AWAY_TIMEOUT
    assert len(errors) == 1
