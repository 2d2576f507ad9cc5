"""Sans-IO yamux: many byte streams multiplexed over one reliable connection.

Same split as h2: commands (`open_stream`, `send_data`, `reset`, ...) queue
frames, `data_to_send()` drains them, and `receive_data(b)` parses what the peer
sent and returns events. There is no I/O and no clock here, so every rule below
is testable by wiring two sessions together; `_trio.py` owns the sockets.

Parsing is incremental and copy-light: a data frame's body is handed out as it
arrives (one `DataReceived` per received chunk), so the session never buffers
more than a 12-byte partial header, whatever the frame size.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

from .._errors import (
    DecodeError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    RemoteProtocolError,
)

PROTOCOL_ID: Final = "/yamux/1.0.0"
"""What multistream-select negotiates for this muxer."""

HEADER_SIZE: Final = 12
INITIAL_WINDOW: Final = 256 * 1024
"""Every stream starts with this window in both directions (spec, "Flow Control")."""
MAX_WINDOW: Final = 0xFFFF_FFFF
MAX_STREAM_ID: Final = 0xFFFF_FFFF

DEFAULT_WINDOW_SIZE: Final = 1 << 20
DEFAULT_MAX_STREAMS: Final = 256
DEFAULT_MAX_ACK_BACKLOG: Final = 256
DEFAULT_MAX_FRAME_DATA: Final = 1 << 20
DEFAULT_MAX_SEND_FRAME: Final = 64 * 1024

# Frame types and flags. Plain ints, not enums: they sit on the per-frame path.
TYPE_DATA: Final = 0
TYPE_WINDOW_UPDATE: Final = 1
TYPE_PING: Final = 2
TYPE_GO_AWAY: Final = 3
FLAG_SYN: Final = 0x1
FLAG_ACK: Final = 0x2
FLAG_FIN: Final = 0x4
FLAG_RST: Final = 0x8

# GoAway codes on the wire (spec, "Session termination").
GO_AWAY_NORMAL: Final = 0
GO_AWAY_PROTOCOL_ERROR: Final = 1
GO_AWAY_INTERNAL_ERROR: Final = 2

_HEADER = struct.Struct(">BBHII")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from


class Role(enum.Enum):
    """Which side of the connection we are; it fixes the parity of our stream ids."""

    CLIENT = 1  # opens odd ids
    SERVER = 2  # opens even ids


@dataclass(frozen=True, slots=True, kw_only=True)
class YamuxConfig:
    """Limits of one session; each bounds memory or work a remote can cause."""

    window_size: int = DEFAULT_WINDOW_SIZE
    """Our receive window per stream, so at most this much is buffered per stream."""
    max_streams: int = DEFAULT_MAX_STREAMS
    """Streams open at once (both directions); inbound SYNs past it are reset."""
    max_ack_backlog: int = DEFAULT_MAX_ACK_BACKLOG
    """Our streams the peer has not ACKed yet; `open_stream` refuses past it."""
    max_frame_data: int = DEFAULT_MAX_FRAME_DATA
    """Largest data frame we accept; a bigger one is a protocol error."""
    max_send_frame: int = DEFAULT_MAX_SEND_FRAME
    """Largest data frame we send; 64 KiB suits every libp2p implementation."""

    def __post_init__(self) -> None:
        if not INITIAL_WINDOW <= self.window_size <= MAX_WINDOW:
            raise ValueError(f"window_size must be in [{INITIAL_WINDOW}, {MAX_WINDOW}]")
        if self.max_streams < 1 or self.max_ack_backlog < 1:
            raise ValueError("max_streams and max_ack_backlog must be >= 1")
        if not 1 <= self.max_frame_data <= MAX_WINDOW:
            raise ValueError(f"max_frame_data must be in [1, {MAX_WINDOW}]")
        if not 1 <= self.max_send_frame <= MAX_WINDOW:
            raise ValueError(f"max_send_frame must be in [1, {MAX_WINDOW}]")


DEFAULT_CONFIG: Final = YamuxConfig()


# Events are produced only by the session, never by callers, so they skip the
# validation h11 does in its event constructors.
@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpened:
    """The peer opened a stream and we accepted it (the ACK is already queued)."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived:
    """Bytes for a stream; call `acknowledge_received_data` once they are consumed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will come."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset:
    """The peer aborted the stream (RST); the session has forgotten it."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendWindowOpened:
    """The peer granted more send window, so a blocked writer may continue."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    """The peer answered our `ping(opaque)`."""

    opaque: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAwayReceived:
    """The peer will accept no new streams; `code` says why (0 normal)."""

    code: int


Event: TypeAlias = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | SendWindowOpened
    | Pong
    | GoAwayReceived
)


class FlowControlError(LocalProtocolError):
    """`send_data` was given more bytes than the stream's send window allows."""


class StreamState(enum.Enum):
    """A stream's state, tracking both directions as h2 does."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we sent FIN
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent FIN
    CLOSED = "closed"  # both sent FIN; the session forgets the stream


_OPEN = StreamState.OPEN
_HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
_HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
_CLOSED = StreamState.CLOSED

# The only transitions; a FIN with no entry here is a protocol error. A reset
# from any state forgets the stream.
_AFTER_LOCAL_FIN: Final = {_OPEN: _HALF_CLOSED_LOCAL, _HALF_CLOSED_REMOTE: _CLOSED}
_AFTER_REMOTE_FIN: Final = {_OPEN: _HALF_CLOSED_REMOTE, _HALF_CLOSED_LOCAL: _CLOSED}
_CAN_SEND: Final = frozenset({_OPEN, _HALF_CLOSED_REMOTE})
_CAN_RECEIVE: Final = frozenset({_OPEN, _HALF_CLOSED_LOCAL})


class _SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"  # the transport reached EOF
    FAILED = "failed"  # the peer broke the protocol; a GoAway is queued


class _Stream:
    """Per-stream bookkeeping; only the session touches it."""

    __slots__ = (
        "acked",
        "buffered",
        "credit",
        "outbound",
        "receiving",
        "recv_window",
        "send_window",
        "state",
    )

    def __init__(self, *, outbound: bool, recv_window: int) -> None:
        self.state = _OPEN
        self.outbound = outbound
        self.acked = not outbound
        self.send_window = INITIAL_WINDOW
        self.recv_window = recv_window  # bytes the peer may still send
        self.buffered = 0  # received, not yet acknowledged by the app
        self.credit = 0  # acknowledged, not yet returned in a window update
        self.receiving = True  # False once the app will read no more


def _go_away_code(code: ErrorCode) -> int:
    """Yamux only knows three codes; every other failure is a protocol error."""
    if code is ErrorCode.NORMAL:
        return GO_AWAY_NORMAL
    if code is ErrorCode.INTERNAL:
        return GO_AWAY_INTERNAL_ERROR
    return GO_AWAY_PROTOCOL_ERROR


def _immutable(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """Return `data` if nobody can change it before it is sent, else a copy.

    Queued frames keep a reference until `data_to_send()`, so a bytearray the
    caller reuses must be copied; bytes, and byte views of bytes, need not be.
    """
    if type(data) is bytes:
        return data
    if (
        isinstance(data, memoryview)
        and type(data.obj) is bytes
        and data.format == "B"
        and data.c_contiguous
    ):
        return data
    return bytes(data)


class YamuxSession:
    """One yamux session (both directions, all streams), without any I/O."""

    def __init__(self, role: Role, config: YamuxConfig = DEFAULT_CONFIG) -> None:
        self.role = role
        self.config = config
        self._window_size = config.window_size
        self._max_frame_data = config.max_frame_data
        self._max_send_frame = config.max_send_frame
        self._streams: dict[int, _Stream] = {}
        self._local_parity = 1 if role is Role.CLIENT else 0
        self._next_local_id = 1 if role is Role.CLIENT else 2
        self._last_remote_id = 0
        self._ack_backlog = 0
        self._state = _SessionState.OPEN
        self._error: RemoteProtocolError | None = None
        self._go_away_sent = False
        self._go_away_received = False
        self._rejected_streams = 0
        self._out: list[bytes | memoryview] = []
        # Parser state between `receive_data` calls.
        self._partial_header = bytearray()
        self._body_left = 0  # bytes of the current data frame still to come
        self._body_stream = 0  # its stream id, 0 if the body is discarded
        self._body_flags = 0  # applied once the body is complete

    # ------------------------------------------------------------ queries

    @property
    def num_streams(self) -> int:
        """Streams the session still tracks (in either direction)."""
        return len(self._streams)

    @property
    def ack_backlog(self) -> int:
        """Our streams the peer has not acknowledged yet."""
        return self._ack_backlog

    @property
    def rejected_streams(self) -> int:
        """Inbound streams reset because of `max_streams` or our GoAway."""
        return self._rejected_streams

    @property
    def go_away_sent(self) -> bool:
        """True once we said we accept no new streams."""
        return self._go_away_sent

    @property
    def go_away_received(self) -> bool:
        """True once the peer said it accepts no new streams."""
        return self._go_away_received

    @property
    def has_data_to_send(self) -> bool:
        """True when `data_to_send()` would return bytes; lets a shell skip a write."""
        return bool(self._out)

    def stream_state(self, stream_id: int) -> StreamState:
        """The stream's state; CLOSED once the session forgot it (or never knew it)."""
        stream = self._streams.get(stream_id)
        return _CLOSED if stream is None else stream.state

    def send_window(self, stream_id: int) -> int:
        """How many bytes `send_data` accepts right now; 0 if the stream cannot send."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _CAN_SEND:
            return 0
        return stream.send_window

    # ------------------------------------------------------------ commands

    def open_stream(self) -> int:
        """Open a stream and queue its SYN; data may follow before the ACK arrives."""
        self._check_usable()
        if self._go_away_sent or self._go_away_received:
            raise LocalProtocolError("session is going away: no new streams", ErrorCode.NORMAL)
        if len(self._streams) >= self.config.max_streams:
            raise LocalProtocolError("too many open streams", ErrorCode.LIMIT)
        if self._ack_backlog >= self.config.max_ack_backlog:
            raise LocalProtocolError("too many unacknowledged streams", ErrorCode.LIMIT)
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted", ErrorCode.LIMIT)
        self._next_local_id += 2
        self._streams[stream_id] = _Stream(outbound=True, recv_window=self._window_size)
        self._ack_backlog += 1
        self._queue(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, self._window_size - INITIAL_WINDOW)
        return stream_id

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, fin: bool = False
    ) -> None:
        """Queue `data` (split into frames) and, with `fin`, half-close after it.

        Raises FlowControlError past the send window instead of buffering, so the
        caller decides how to wait (h2's split).
        """
        stream = self._sendable(stream_id)
        payload = _immutable(data)
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size > stream.send_window:
            raise FlowControlError(
                f"stream {stream_id}: {size} bytes exceed the send window of {stream.send_window}"
            )
        stream.send_window -= size
        out = self._out
        limit = self._max_send_frame
        if size <= limit:
            if size or fin:
                out.append(_pack_header(0, TYPE_DATA, FLAG_FIN if fin else 0, stream_id, size))
                if size:
                    out.append(payload)
        else:
            view = memoryview(payload)
            for start in range(0, size, limit):
                chunk = view[start : start + limit]
                flags = FLAG_FIN if fin and start + limit >= size else 0
                out.append(_pack_header(0, TYPE_DATA, flags, stream_id, len(chunk)))
                out.append(chunk)
        if fin:
            self._local_fin(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: queue a FIN; the peer may keep sending to us."""
        stream = self._sendable(stream_id)
        self._queue(TYPE_WINDOW_UPDATE, FLAG_FIN, stream_id, 0)
        self._local_fin(stream_id, stream)

    def close_stream(self, stream_id: int) -> None:
        """The app is done in both directions: FIN unless sent, and reset on more data.

        Like closing a TCP socket, data that arrives afterwards gets a RST, so a
        peer still writing learns that nobody reads. No-op for a forgotten stream.
        """
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.receiving = False
        if stream.state in _CAN_SEND:
            self._queue(TYPE_WINDOW_UPDATE, FLAG_FIN, stream_id, 0)
            self._local_fin(stream_id, stream)

    def reset(self, stream_id: int) -> None:
        """Abort the stream (RST) and forget it; no-op if it is already gone.

        Lenient because a reset races with the peer's own FIN or RST.
        """
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._reset_stream(stream_id, stream)

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """The app consumed `n` received bytes; grant them back once half a window is due.

        Batching updates to half the window (h2's WindowManager) keeps them rare
        while the peer never stalls. No-op for a stream that is gone or finished.
        """
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _CAN_RECEIVE or not stream.receiving:
            return
        if not 0 <= n <= stream.buffered:
            raise LocalProtocolError(
                f"stream {stream_id}: acknowledged {n} bytes, {stream.buffered} unacknowledged"
            )
        stream.buffered -= n
        stream.credit += n
        if stream.credit >= self._window_size // 2:
            self._queue(TYPE_WINDOW_UPDATE, 0, stream_id, stream.credit)
            stream.recv_window += stream.credit
            stream.credit = 0

    def ping(self, opaque: int) -> None:
        """Queue a ping; the peer echoes `opaque` back as a `Pong` event."""
        self._check_usable()
        if not 0 <= opaque <= 0xFFFF_FFFF:
            raise ValueError("ping opaque must fit in 32 bits")
        self._queue(TYPE_PING, FLAG_SYN, 0, opaque)

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Tell the peer we accept no new streams; existing streams continue.

        Sent once; later calls, or calls after the session ended, do nothing.
        """
        if not 0 <= code <= 0xFFFF_FFFF:
            raise ValueError("go-away code must fit in 32 bits")
        if self._go_away_sent or self._state is not _SessionState.OPEN:
            return
        self._go_away_sent = True
        self._queue(TYPE_GO_AWAY, 0, 0, code)

    def data_to_send(self) -> bytes:
        """Drain every queued frame as one bytes object (b"" if none)."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse bytes from the peer; b"" means the transport reached EOF.

        Raises RemoteProtocolError (a GoAway is then queued) when the peer breaks
        the protocol; the session is then failed and refuses further input.
        """
        if self._state is not _SessionState.OPEN:
            if self._error is not None:
                raise RemoteProtocolError(
                    f"session already failed: {self._error}", self._error.code
                )
            if data:
                raise LocalProtocolError("data after EOF")
            return []
        if not data:
            self._state = _SessionState.CLOSED
            return []
        events: list[Event] = []
        try:
            self._parse(data, events)
        except RemoteProtocolError as exc:
            self._state = _SessionState.FAILED
            self._error = exc
            if not self._go_away_sent:
                self._go_away_sent = True
                self._queue(TYPE_GO_AWAY, 0, 0, _go_away_code(exc.code))
            raise
        return events

    def _parse(self, data: bytes | bytearray | memoryview, events: list[Event]) -> None:
        view = memoryview(data)
        if view.format != "B":
            view = view.cast("B")
        end = len(view)
        pos = 0
        while pos < end:
            if self._body_left:
                take = min(self._body_left, end - pos)
                self._body_left -= take
                stream_id = self._body_stream
                if stream_id and self._still_receiving(stream_id):
                    if pos == 0 and take == end and type(data) is bytes:
                        chunk = data
                    else:
                        chunk = bytes(view[pos : pos + take])
                    events.append(DataReceived(stream_id=stream_id, data=chunk))
                pos += take
                if not self._body_left:
                    self._end_of_data_frame(events)
                continue
            partial = self._partial_header
            if partial:
                need = HEADER_SIZE - len(partial)
                partial += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(partial) < HEADER_SIZE:
                    return
                header = _unpack_header(partial)
                partial.clear()
            elif end - pos >= HEADER_SIZE:
                header = _unpack_header(view, pos)
                pos += HEADER_SIZE
            else:
                partial += view[pos:]
                return
            version, ftype, flags, stream_id, length = header
            self._on_header(version, ftype, flags, stream_id, length, events)

    def _on_header(
        self, version: int, ftype: int, flags: int, stream_id: int, length: int, events: list[Event]
    ) -> None:
        if version != 0:
            raise DecodeError(f"unsupported yamux version {version}")
        if ftype in (TYPE_DATA, TYPE_WINDOW_UPDATE):
            self._on_stream_frame(ftype, flags, stream_id, length, events)
        elif ftype == TYPE_PING:
            if flags & FLAG_SYN:
                self._queue(TYPE_PING, FLAG_ACK, 0, length)
            elif flags & FLAG_ACK:
                events.append(Pong(opaque=length))
        elif ftype == TYPE_GO_AWAY:
            if not self._go_away_received:
                self._go_away_received = True
                events.append(GoAwayReceived(code=length))
        else:
            raise DecodeError(f"unknown yamux frame type {ftype}")

    def _still_receiving(self, stream_id: int) -> bool:
        """Whether the rest of a frame body is still wanted (the app may have let go)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            self._body_stream = 0
            return False
        if not stream.receiving:
            self._reset_stream(stream_id, stream)
            self._body_stream = 0
            return False
        return True

    def _is_remote_id(self, stream_id: int) -> bool:
        return stream_id & 1 != self._local_parity

    def _on_stream_frame(
        self, ftype: int, flags: int, stream_id: int, length: int, events: list[Event]
    ) -> None:
        is_data = ftype == TYPE_DATA
        if is_data and length > self._max_frame_data:
            raise LimitExceeded(f"data frame of {length} bytes exceeds {self._max_frame_data}")
        if stream_id == 0:
            raise RemoteProtocolError("data or window update on stream 0")
        stream = self._streams.get(stream_id)
        if flags & FLAG_SYN:
            stream = self._accept_syn(stream_id, events)
        elif stream is None:
            # Ids only grow, so an id at or below the high-water mark belongs to a
            # stream that existed: ignore late frames for it. Above it, the peer
            # talks on a stream nobody opened.
            if self._is_remote_id(stream_id):
                opened = stream_id <= self._last_remote_id
            else:
                opened = stream_id < self._next_local_id
            if not opened:
                raise RemoteProtocolError(f"frame for stream {stream_id}, which was never opened")
        if stream is None:
            if is_data:
                self._skip_body(length, flags)
            return
        if flags & FLAG_ACK and not stream.acked:
            stream.acked = True
            self._ack_backlog -= 1
        if not is_data:
            if length:
                stream.send_window += length
                if stream.send_window > MAX_WINDOW:
                    raise RemoteProtocolError(f"stream {stream_id}: send window overflow")
                if stream.state in _CAN_SEND:
                    events.append(SendWindowOpened(stream_id=stream_id))
            self._apply_flags(stream_id, stream, flags, events)
            return
        if length:
            if stream.state not in _CAN_RECEIVE:
                raise RemoteProtocolError(f"stream {stream_id}: data after FIN")
            if length > stream.recv_window:
                raise RemoteProtocolError(
                    f"stream {stream_id}: {length} bytes exceed the window of {stream.recv_window}"
                )
            stream.recv_window -= length
            if not stream.receiving:
                self._reset_stream(stream_id, stream)
                self._skip_body(length, 0)
                return
            stream.buffered += length
            self._body_left = length
            self._body_stream = stream_id
            self._body_flags = flags
        else:
            self._apply_flags(stream_id, stream, flags, events)

    def _accept_syn(self, stream_id: int, events: list[Event]) -> _Stream | None:
        if not self._is_remote_id(stream_id):
            raise RemoteProtocolError(
                f"SYN for stream {stream_id}, which is not the peer's to open"
            )
        # Ids only grow (every implementation allocates them in order), which
        # catches reuse without remembering closed streams.
        if stream_id <= self._last_remote_id:
            raise RemoteProtocolError(f"SYN reuses stream id {stream_id}")
        self._last_remote_id = stream_id
        if self._go_away_sent or len(self._streams) >= self.config.max_streams:
            self._rejected_streams += 1
            self._queue(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            return None
        stream = _Stream(outbound=False, recv_window=self._window_size)
        self._streams[stream_id] = stream
        self._queue(TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, self._window_size - INITIAL_WINDOW)
        events.append(StreamOpened(stream_id=stream_id))
        return stream

    def _skip_body(self, length: int, flags: int) -> None:
        self._body_left = length
        self._body_stream = 0
        self._body_flags = flags

    def _end_of_data_frame(self, events: list[Event]) -> None:
        stream_id = self._body_stream
        if not stream_id:
            return
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._apply_flags(stream_id, stream, self._body_flags, events)

    def _apply_flags(
        self, stream_id: int, stream: _Stream, flags: int, events: list[Event]
    ) -> None:
        if flags & FLAG_RST:
            self._forget(stream_id, stream)
            events.append(StreamReset(stream_id=stream_id))
        elif flags & FLAG_FIN:
            state = _AFTER_REMOTE_FIN.get(stream.state)
            if state is None:
                raise RemoteProtocolError(f"stream {stream_id}: FIN in state {stream.state.value}")
            stream.state = state
            events.append(StreamEnded(stream_id=stream_id))
            if state is _CLOSED:
                self._forget(stream_id, stream)

    # ------------------------------------------------------------ helpers

    def _queue(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        self._out.append(_pack_header(0, ftype, flags, stream_id, length))

    def _check_usable(self) -> None:
        if self._state is not _SessionState.OPEN:
            raise LocalProtocolError(f"session is {self._state.value}")

    def _sendable(self, stream_id: int) -> _Stream:
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _CAN_SEND:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        return stream

    def _local_fin(self, stream_id: int, stream: _Stream) -> None:
        stream.state = _AFTER_LOCAL_FIN[stream.state]
        if stream.state is _CLOSED:
            self._forget(stream_id, stream)

    def _reset_stream(self, stream_id: int, stream: _Stream) -> None:
        self._queue(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
        self._forget(stream_id, stream)

    def _forget(self, stream_id: int, stream: _Stream) -> None:
        del self._streams[stream_id]
        stream.state = _CLOSED
        if not stream.acked:
            self._ack_backlog -= 1
