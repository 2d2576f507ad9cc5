"""Trio shell for the yamux core: a `YamuxConnection` and its `YamuxStream`s.

Concurrency, chosen for latency and so that no peer can wedge us:

- Whoever waits for frames reads the transport, one task at a time (the read
  baton, `_reader`): a stream waiting for data or for send window reads the
  transport itself, feeds the core and wakes the streams the other events are
  for, so an echo costs no hand-over between tasks (on this kind of VM a
  hand-over costs about 23 µs per side of a round trip). The background task
  inside `run` reads when no stream does; after it delivered data it waits
  `READ_LEASE` before reading again, so the stream it woke can come back and
  read for itself. Readers never write, because a reader that waits on a full
  transport while the peer's reader does the same deadlocks both.
- `send_all` writes its frames itself, under a `trio.StrictFIFOLock`, so an echo
  costs one write and no task switch. Each transport write is shielded from the
  caller's cancellation (a half-written frame would corrupt every stream) and
  bounded by `write_timeout` (a peer that stops reading ends the connection).
- Frames the core queues on its own (ACKs, window updates, pongs, FIN, RST) are
  written by a small flusher task, woken on demand; a writer that gets the
  lock first sends them along with its data.

Errors: stream I/O raises ClosedResourceError after a local close and
BrokenResourceError once the stream was reset or the connection ended.
Connection methods (`open_stream`, `accept_stream`, `ping`) raise
ClosedResourceError once the session is over. `run` raises the
RemoteProtocolError that ended it, so the host can log it once.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast, final

import trio

from .._errors import ProtocolError, RemoteProtocolError
from .._streams import InterruptibleReceiveStream, NowaitSendStream, ReceiveInterrupted
from ..multistream import LazyProposal
from ._core import (
    DEFAULT_CONFIG,
    DataReceived,
    Event,
    GoAwayReceived,
    Pong,
    Role,
    SendWindowOpened,
    StreamEnded,
    StreamOpened,
    StreamReset,
    YamuxConfig,
    YamuxSession,
)

DEFAULT_WRITE_TIMEOUT: Final = 30.0
DEFAULT_ACCEPT_BACKLOG: Final = 256
"""Inbound streams waiting for `accept_stream`; past it they are reset. Matches
`max_streams`, which bounds them anyway."""
GO_AWAY_TIMEOUT: Final = 1.0
"""How long closing waits to get the final GoAway out before dropping the transport."""
READ_SIZE: Final = 256 * 1024
READ_LEASE: Final = 0.001
"""After a read delivered data, how long the background task leaves the transport
to the stream it woke before reading again itself. Bounds the extra delay of a
frame that arrives while nobody waits (a SYN, a ping) to this."""

_BACKGROUND: Final = object()

_TRANSPORT_ERRORS: Final = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ProtocolError,
    OSError,
)


@final
class YamuxStream(trio.abc.HalfCloseableStream):
    """One yamux stream as a trio stream, so the protocols above never see frames.

    Built by `YamuxConnection` only. Received data waits here until read; the
    peer can only send what our window allows, so the buffer stays bounded.
    """

    __slots__ = (
        "_broken",
        "_broken_cause",
        "_buffered",
        "_chunks",
        "_closed",
        "_conn",
        "_eof_received",
        "_eof_sent",
        "_offset",
        "_recv_busy",
        "_recv_lot",
        "_send_busy",
        "_send_lot",
        "stream_id",
    )

    def __init__(self, conn: YamuxConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes already read from _chunks[0]
        self._buffered = 0
        self._eof_received = False
        self._eof_sent = False
        self._closed = False  # aclose() or reset() was called here
        self._broken: str | None = None  # why the stream died, if it did
        self._broken_cause: BaseException | None = None
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._recv_busy = False
        self._send_busy = False

    def __repr__(self) -> str:
        return f"<YamuxStream {self.stream_id}>"

    # ------------------------------------------------------------ sending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send everything, waiting for window as needed.

        A stream whose reader is slow blocks only here; other streams and the
        connection keep going.
        """
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_can_send()
            payload = data if type(data) is bytes else bytes(data)
            size = len(payload)
            if not size:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            conn = self._conn
            session = conn._session
            sid = self.stream_id
            pos = 0
            while pos < size:
                window = session.send_window(sid)
                if not window:
                    await conn._wait_for_frames(self._send_lot, self._send_ready)
                    self._check_can_send()
                    continue
                n = min(window, size - pos)
                chunk = payload if n == size else memoryview(payload)[pos : pos + n]
                lock = conn._write_lock
                # An uncontended lock is taken without a yield, and a transport
                # with room takes the frame at once: an echo costs no task switch.
                try:
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    await lock.acquire()
                try:
                    self._check_can_send()
                    session.send_data(sid, chunk)
                    await conn._flush_locked()
                finally:
                    lock.release()
                pos += n
            # A write the transport took at once did not yield: this is the schedule point.
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        """Return once the peer has granted window (or the stream can no longer send)."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            if self._send_ready():
                await trio.lowlevel.checkpoint()
            else:
                await self._conn._wait_for_frames(self._send_lot, self._send_ready)
            if self._closed or self._eof_sent:
                raise trio.ClosedResourceError("stream is closed for sending")
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        """Half-close (FIN): we send no more, the peer may go on sending."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
            if self._eof_sent:
                return
            self._raise_if_broken()
            self._eof_sent = True
            self._conn._end_stream(self)
        finally:
            self._send_busy = False

    def _send_ready(self) -> bool:
        return bool(
            self._closed
            or self._eof_sent
            or self._broken
            or self._conn._session.send_window(self.stream_id)
        )

    def _check_can_send(self) -> None:
        if self._closed or self._eof_sent:
            raise trio.ClosedResourceError("stream is closed for sending")
        self._raise_if_broken()

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise trio.BrokenResourceError(
                f"yamux stream {self.stream_id}: {self._broken}"
            ) from self._broken_cause

    # ------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` bytes (default: one received chunk); b"" once the peer sent FIN.

        Data that arrived before a reset or a lost connection is still returned;
        the error comes after it.
        """
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._recv_busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._recv_busy = True
        try:
            if self._recv_ready():
                await trio.lowlevel.checkpoint()
            else:
                await self._conn._wait_for_frames(self._recv_lot, self._recv_ready)
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
            if self._buffered:
                return self._take(max_bytes)
            if self._eof_received:
                return b""
            self._raise_if_broken()
            raise AssertionError("unreachable: woke without data, EOF or error")
        finally:
            self._recv_busy = False

    def _recv_ready(self) -> bool:
        return bool(self._buffered or self._eof_received or self._broken or self._closed)

    def _take(self, max_bytes: int | None) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        offset = self._offset
        available = len(first) - offset
        # Without a limit, hand back one received chunk as is: no copy.
        limit = available if max_bytes is None else max_bytes
        if available > limit:
            out = first[offset : offset + limit]
            self._offset = offset + limit
        elif available == limit or len(chunks) == 1:
            out = first[offset:] if offset else first
            chunks.popleft()
            self._offset = 0
        else:
            parts: list[bytes | memoryview] = [memoryview(first)[offset:]]
            chunks.popleft()
            self._offset = 0
            got = available
            while chunks and got < limit:
                chunk = chunks[0]
                need = limit - got
                if len(chunk) > need:
                    parts.append(memoryview(chunk)[:need])
                    self._offset = need
                    got = limit
                else:
                    parts.append(chunk)
                    chunks.popleft()
                    got += len(chunk)
            out = b"".join(parts)
        self._buffered -= len(out)
        self._conn._consumed(self, len(out))
        return out

    # ------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Close both directions: FIN if not sent yet, or RST if unread data remains.

        Data the peer sends afterwards gets a RST, so a peer still writing learns
        nobody reads. Never blocks on the network, so it also works when cancelled.
        """
        if not self._closed:
            self._closed = True
            self._conn._close_stream(self, reset=bool(self._buffered))
            self._discard()
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        """Abort the stream (RST): the peer's reads and writes fail, ours raise Closed."""
        if not self._closed:
            self._closed = True
            self._conn._close_stream(self, reset=True)
            self._discard()
        await trio.lowlevel.checkpoint()

    def _discard(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()
        self._conn._stop_reading_for(self)

    # ------------------------------------------------------------ from the reader

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._recv_lot:
            self._recv_lot.unpark_all()

    def _on_eof(self) -> None:
        self._eof_received = True
        self._recv_lot.unpark_all()

    def _break(self, reason: str, cause: BaseException | None) -> None:
        if self._broken is None:
            self._broken = reason
            self._broken_cause = cause
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()


class _PendingPing:
    __slots__ = ("done", "rtt", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.rtt: float | None = None
        self.done = trio.Event()


@final
class YamuxConnection:
    """A yamux session over a trio stream: open, accept and serve many streams.

    Start it with `await nursery.start(conn.run)`; it ends when the transport
    does, on `aclose()`, or on a protocol error (which `run` raises).
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        role: Role,
        config: YamuxConfig = DEFAULT_CONFIG,
        *,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        accept_backlog: int = DEFAULT_ACCEPT_BACKLOG,
        preamble: LazyProposal | None = None,
    ) -> None:
        self._transport = transport
        self._preamble = preamble  # a lazy `/yamux` proposal already sent; its answer comes first
        self._nowait: Callable[[bytes], bool] | None = None
        self._transport_flush: Callable[[], Awaitable[None]] | None = None
        if isinstance(transport, NowaitSendStream):
            self._nowait = transport.send_all_nowait
            self._transport_flush = transport.flush
        # A stream closed from another task stops a read it does for itself: through
        # the transport when it can (cheap), else by a cancel scope around each read.
        self._interruptible = (
            isinstance(transport, InterruptibleReceiveStream) and transport.can_interrupt_receive
        )
        self._session = YamuxSession(role, config)
        self._write_timeout = write_timeout
        self._write_lock = trio.StrictFIFOLock()
        self._streams: dict[int, YamuxStream] = {}
        self._accept_send, self._accept_recv = trio.open_memory_channel[YamuxStream](accept_backlog)
        self._flush_wanted = trio.Event()
        self._room_lot = trio.lowlevel.ParkingLot()  # open_stream waiting on the ACK backlog
        self._pings: dict[int, _PendingPing] = {}
        self._next_ping = 0
        self._backlog_rejected = 0
        # The read baton: None (free), the ParkingLot of the waiter it is handed
        # to or held by, or _BACKGROUND. Only its holder reads the transport.
        self._reader: object = None
        self._read_waiters: dict[trio.lowlevel.ParkingLot, None] = {}
        self._background_lot = trio.lowlevel.ParkingLot()
        self._background_scope: trio.CancelScope | None = None
        self._lease_end = -math.inf
        self._read_over = False
        self._reading_scope: trio.CancelScope | None = None
        self._failure: RemoteProtocolError | None = None
        self._failure_from_core = False  # a core error gets a GoAway before the end
        self._started = False
        self._closed = False
        self._close_reason = ""
        self._close_cause: BaseException | None = None

    @property
    def is_closed(self) -> bool:
        """True once the session is over (closed, lost, or failed)."""
        return self._closed

    @property
    def num_streams(self) -> int:
        """Streams the session still tracks; an idle connection has none."""
        return self._session.num_streams

    @property
    def rejected_streams(self) -> int:
        """Inbound streams reset because of limits, GoAway, or a full accept backlog."""
        return self._session.rejected_streams + self._backlog_rejected

    # ------------------------------------------------------------ public API

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and dispatch until the session ends; call once, via `nursery.start`.

        Returns when the transport ends or the connection is closed. Raises the
        RemoteProtocolError that ended it, after a best-effort GoAway.
        """
        if self._started:
            raise RuntimeError("YamuxConnection.run() may only be called once")
        self._started = True
        failure: RemoteProtocolError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_when_asked)
                task_status.started()
                failure = await self._read_when_nobody_does()
                nursery.cancel_scope.cancel()
        finally:
            self._terminate("connection ended", None)
            await trio.aclose_forcefully(self._transport)
        if failure is not None:
            raise failure

    async def open_stream(self) -> YamuxStream:
        """Open a stream; waits while too many of ours are unacknowledged.

        The SYN goes out with the first write, or soon after if none comes.
        Raises ClosedResourceError once the session (or the peer, by GoAway)
        takes no new streams, and LocalProtocolError at `max_streams`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        session = self._session
        while True:
            if self._closed:
                raise self._closed_error()
            if session.go_away_received or session.go_away_sent:
                raise trio.ClosedResourceError("yamux session is going away: no new streams")
            if session.ack_backlog < session.config.max_ack_backlog:
                break
            self._wake_background_reader()
            await self._room_lot.park()
        sid = session.open_stream()
        stream = YamuxStream(self, sid)
        self._streams[sid] = stream
        self._flush_wanted.set()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def accept_stream(self) -> YamuxStream:
        """The next stream the peer opened; ClosedResourceError once the session is over."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise self._closed_error()
        try:
            return await self._accept_recv.receive()
        except trio.EndOfChannel:
            raise self._closed_error() from None

    async def ping(self, timeout: float) -> float:
        """Round-trip time in seconds; TooSlowError after `timeout`."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise self._closed_error()
        opaque = self._next_ping
        self._next_ping = (opaque + 1) & 0xFFFF_FFFF
        pending = _PendingPing(trio.current_time())
        self._pings[opaque] = pending
        self._session.ping(opaque)
        self._flush_wanted.set()
        self._wake_background_reader()
        try:
            with trio.fail_after(timeout):
                await pending.done.wait()
        finally:
            del self._pings[opaque]
        if pending.rtt is None:
            raise self._closed_error()
        return pending.rtt

    async def aclose(self) -> None:
        """Send GoAway (best effort, briefly), close the transport, wake every waiter."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._session.go_away()
        self._terminate("connection closed locally", None)
        try:
            await self._send_final_frames()
        finally:
            await trio.aclose_forcefully(self._transport)

    # ------------------------------------------------------------ reading

    async def _read_when_nobody_does(self) -> RemoteProtocolError | None:
        """The background reader: reads while no stream waits, until the session ends."""
        while not self._read_over:
            if self._reader is None and trio.current_time() >= self._lease_end:
                self._reader = _BACKGROUND
                delivered = False
                try:
                    while not (self._read_over or self._read_waiters or delivered):
                        delivered = await self._read_once()
                finally:
                    self._release_reading(lease=delivered)
                continue
            deadline = self._lease_end if self._reader is None else math.inf
            with trio.CancelScope(deadline=deadline) as scope:
                self._background_scope = scope
                await self._background_lot.park()
            self._background_scope = None
        if self._failure is not None and self._failure_from_core:
            await self._send_final_frames()
        return self._failure

    async def _wait_for_frames(
        self, lot: trio.lowlevel.ParkingLot, ready: Callable[[], bool]
    ) -> None:
        """Wait until `ready()`: read the transport ourselves while nobody else does."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not ready():
            if self._reader is None and self._started and not self._read_over:
                await self._read_until(lot, ready)
                continue
            self._read_waiters[lot] = None
            try:
                await lot.park()
            except BaseException:
                self._read_waiters.pop(lot, None)
                if self._reader is lot:
                    self._release_reading(lease=False)
                raise
            self._read_waiters.pop(lot, None)
            if self._reader is lot:  # handed the baton
                if ready() or self._read_over:
                    self._release_reading(lease=True)
                else:
                    await self._read_until(lot, ready)

    async def _read_until(self, lot: trio.lowlevel.ParkingLot, ready: Callable[[], bool]) -> None:
        """Hold the baton and read until `ready()` (or the session ends), then pass it on."""
        self._reader = lot
        done = False
        try:
            if self._interruptible:
                done = await self._read_while_not(ready)
            else:
                # Closing the stream from another task cancels this (reads are cancel-safe).
                with trio.CancelScope() as self._reading_scope:
                    done = await self._read_while_not(ready)
        finally:
            self._reading_scope = None
            self._release_reading(lease=done)

    async def _read_while_not(self, ready: Callable[[], bool]) -> bool:
        while not self._read_over:
            if ready():
                return True
            await self._read_once()
        return False

    def _stop_reading_for(self, stream: YamuxStream) -> None:
        """`stream` was closed here: a read it is doing for itself has no reason left."""
        if self._reader in (stream._recv_lot, stream._send_lot):
            self._stop_stream_read()

    def _stop_stream_read(self) -> None:
        """Wake a stream's task blocked in a transport read (reads are cancel-safe)."""
        if self._interruptible:
            cast(InterruptibleReceiveStream, self._transport).interrupt_receive()
        elif self._reading_scope is not None:
            self._reading_scope.cancel()

    def _release_reading(self, *, lease: bool) -> None:
        """Pass the baton: to a waiting stream, else back to the background reader,
        which after a `lease` first gives the stream that just got data time to return."""
        waiters = self._read_waiters
        if waiters and not self._read_over:
            lot = next(iter(waiters))
            del waiters[lot]
            self._reader = lot
            lot.unpark_all()
            return
        self._reader = None
        if lease and not (self._read_over or self._closed):
            # The background reader wakes when a lease it knows of ends, and then
            # looks at the newest one: so a lease costs one float store, not a timer.
            self._lease_end = trio.current_time() + READ_LEASE
            scope = self._background_scope
            if scope is not None and scope.deadline == math.inf:
                scope.deadline = self._lease_end
        else:
            self._wake_background_reader()

    def _wake_background_reader(self) -> None:
        """Someone needs frames read that no stream is waiting for (pong, ACK): now."""
        self._lease_end = -math.inf
        self._background_lot.unpark_all()

    async def _read_once(self) -> bool:
        """One transport read, fed to the core and dispatched; the caller holds the baton.

        True if it delivered data or a new stream (someone may now want to read).
        Ends the session on end of stream or a transport or protocol error.
        """
        session = self._session
        try:
            data = await self._transport.receive_some(READ_SIZE)
        except ReceiveInterrupted:  # the stream we read for was closed here
            return False
        except RemoteProtocolError as exc:  # e.g. the secure channel failed
            self._end_reading("transport protocol error", exc)
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end_reading("connection lost", exc)
            return False
        if not data:
            session.receive_data(b"")
            self._end_reading("connection closed by peer", None)
            return False
        preamble = self._preamble
        if preamble is not None:
            try:
                rest = preamble.confirm(data)
            except ProtocolError as exc:
                error = RemoteProtocolError(f"yamux refused: {exc}", exc.code)
                self._end_reading("muxer negotiation failed", error)
                return False
            if rest is None:
                return False
            self._preamble = None
            if not rest:  # b"" would read as end of stream to the core
                return False
            data = rest
        try:
            events = session.receive_data(data)
        except RemoteProtocolError as exc:
            self._failure_from_core = True
            self._end_reading("protocol error from peer", exc)
            return False
        if self._closed:  # ended while we read: every stream is gone, no new one is wanted
            return False
        delivered = False
        streams = self._streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data)
                    delivered = True
            else:
                if isinstance(event, StreamOpened):
                    delivered = True
                self._dispatch(event)
        if session.has_data_to_send:
            self._flush_wanted.set()
        if self._room_lot:
            self._room_lot.unpark_all()
        return delivered

    def _end_reading(self, reason: str, failure: BaseException | None) -> None:
        """Nothing more will be read: end the session; `run` reports a protocol failure."""
        self._read_over = True
        if isinstance(failure, RemoteProtocolError):
            self._failure = failure
        self._terminate(reason, failure)
        self._background_lot.unpark_all()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, SendWindowOpened):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._send_lot.unpark_all()
        elif isinstance(event, StreamOpened):
            stream = YamuxStream(self, event.stream_id)
            try:
                self._accept_send.send_nowait(stream)
            except trio.WouldBlock:
                self._backlog_rejected += 1
                self._session.reset(event.stream_id)
            else:
                self._streams[event.stream_id] = stream
        elif isinstance(event, StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_eof()
                if stream._eof_sent:
                    del self._streams[event.stream_id]
        elif isinstance(event, StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._break("stream reset by peer", None)
        elif isinstance(event, Pong):
            pending = self._pings.get(event.opaque)
            if pending is not None and pending.rtt is None:
                pending.rtt = trio.current_time() - pending.start
                pending.done.set()
        elif isinstance(event, GoAwayReceived):
            self._room_lot.unpark_all()

    # ------------------------------------------------------------ writing

    async def _flush_locked(self) -> None:
        """Write everything the core has queued; the caller holds the write lock."""
        session = self._session
        while session.has_data_to_send:
            if self._closed:
                raise trio.BrokenResourceError(f"yamux connection: {self._close_reason}")
            await self._write(session.data_to_send())

    async def _write(self, data: bytes) -> None:
        """One transport write: done at once when the transport has room (no yield),
        else awaited immune to the caller's cancellation and bounded in time."""
        error: BaseException | None = None
        nowait = self._nowait
        if nowait is not None:
            try:
                if nowait(data):
                    return
            except _TRANSPORT_ERRORS as exc:
                error = exc
        # One scope is both the shield and the deadline (half the cost of two).
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + self._write_timeout
        ) as scope:
            if error is None:
                try:
                    if self._transport_flush is not None:
                        await self._transport_flush()
                    else:
                        await self._transport.send_all(data)
                except _TRANSPORT_ERRORS as exc:
                    error = exc
        if scope.cancelled_caught:
            error = trio.TooSlowError(f"write blocked for {self._write_timeout}s")
        if error is not None:
            reason = "write timed out" if isinstance(error, trio.TooSlowError) else "write failed"
            self._terminate(reason, error)
            await trio.aclose_forcefully(self._transport)
            raise trio.BrokenResourceError(f"yamux connection: {reason}") from error

    async def _flush_when_asked(self) -> None:
        """The flusher: writes frames the core queued without a writer to carry them."""
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            async with self._write_lock:
                if self._closed:
                    return
                try:
                    await self._flush_locked()
                except trio.BrokenResourceError:
                    return

    async def _send_final_frames(self) -> None:
        """Best effort: get queued frames (the GoAway last) out within GO_AWAY_TIMEOUT."""
        with trio.move_on_after(GO_AWAY_TIMEOUT):
            async with self._write_lock:
                data = self._session.data_to_send()
                if data:
                    try:
                        await self._transport.send_all(data)
                    except _TRANSPORT_ERRORS:
                        return

    # ------------------------------------------------------------ from streams

    def _consumed(self, stream: YamuxStream, n: int) -> None:
        if self._closed or stream._closed:
            return
        session = self._session
        session.acknowledge_received_data(stream.stream_id, n)
        if session.has_data_to_send:
            self._flush_wanted.set()

    def _end_stream(self, stream: YamuxStream) -> None:
        if self._closed:
            return
        self._session.end_stream(stream.stream_id)
        if stream._eof_received:
            self._streams.pop(stream.stream_id, None)
        self._flush_wanted.set()

    def _close_stream(self, stream: YamuxStream, *, reset: bool) -> None:
        self._streams.pop(stream.stream_id, None)
        if self._closed or stream._broken is not None:
            return
        if reset:
            self._session.reset(stream.stream_id)
        else:
            self._session.close_stream(stream.stream_id)
        if self._session.has_data_to_send:
            self._flush_wanted.set()
        if self._room_lot:
            self._room_lot.unpark_all()

    # ------------------------------------------------------------ ending

    def _terminate(self, reason: str, cause: BaseException | None) -> None:
        """Mark the session over and wake every waiter; the caller closes the transport."""
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        self._close_cause = cause
        for stream in self._streams.values():
            stream._break(reason, cause)
        self._streams.clear()
        self._accept_send.close()
        self._room_lot.unpark_all()
        if self._reader is not None and self._reader is not _BACKGROUND:
            self._stop_stream_read()  # its stream is broken: its task must not wait on
        self._wake_background_reader()  # it reads on until the transport is closed
        for pending in self._pings.values():
            pending.done.set()
        self._flush_wanted.set()

    def _closed_error(self) -> trio.ClosedResourceError:
        error = trio.ClosedResourceError(f"yamux connection is closed: {self._close_reason}")
        error.__cause__ = self._close_cause
        return error
