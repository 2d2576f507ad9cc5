"""The sans-IO yamux session: two cores wired back to back, and hostile bytes."""

from __future__ import annotations

import struct
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbloom.p2p import ErrorCode, LimitExceeded, LocalProtocolError, RemoteProtocolError
from dbloom.p2p.yamux import (
    INITIAL_WINDOW,
    DataReceived,
    Event,
    FlowControlError,
    GoAwayReceived,
    Pong,
    Role,
    SendWindowOpened,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    YamuxConfig,
    YamuxSession,
)

DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8
HEADER = struct.Struct(">BBHII")


def frame(ftype: int, flags: int, stream_id: int, length: int, body: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + body


def parse_frames(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(type, flags, stream id, length, body) for each frame in `data`."""
    frames = []
    pos = 0
    while pos < len(data):
        _, ftype, flags, sid, length = HEADER.unpack_from(data, pos)
        pos += 12
        body = b""
        if ftype == DATA:
            body = data[pos : pos + length]
            pos += length
        frames.append((ftype, flags, sid, length, body))
    return frames


class Pair:
    """Two sessions joined by a perfect link; `shuttle` runs it until both go quiet."""

    def __init__(
        self, client: YamuxConfig | None = None, server: YamuxConfig | None = None
    ) -> None:
        self.client = YamuxSession(Role.CLIENT, client or YamuxConfig())
        self.server = YamuxSession(Role.SERVER, server or YamuxConfig())

    def shuttle(self) -> tuple[list[Event], list[Event]]:
        client_events: list[Event] = []
        server_events: list[Event] = []
        while self.client.has_data_to_send or self.server.has_data_to_send:
            if self.client.has_data_to_send:
                server_events += self.server.receive_data(self.client.data_to_send())
            if self.server.has_data_to_send:
                client_events += self.client.receive_data(self.server.data_to_send())
        return client_events, server_events


def pair(client: YamuxConfig | None = None, server: YamuxConfig | None = None) -> Pair:
    return Pair(client, server)


def received(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def non_data(events: list[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, DataReceived | SendWindowOpened)]


# ---------------------------------------------------------------- opening & data


def test_open_stream_sends_syn_with_window_and_gets_ack() -> None:
    p = pair()
    sid = p.client.open_stream()
    assert sid == 1
    syn = parse_frames(p.client.data_to_send())
    assert syn == [(WINDOW_UPDATE, SYN, 1, (1 << 20) - INITIAL_WINDOW, b"")]
    assert p.client.ack_backlog == 1
    events = p.server.receive_data(frame(*syn[0][:4]))
    assert events[0] == StreamOpened(stream_id=1)
    ack = parse_frames(p.server.data_to_send())
    assert ack == [(WINDOW_UPDATE, ACK, 1, (1 << 20) - INITIAL_WINDOW, b"")]
    assert p.client.send_window(1) == INITIAL_WINDOW
    p.client.receive_data(frame(*ack[0][:4]))
    assert p.client.ack_backlog == 0
    assert p.client.send_window(1) == 1 << 20
    assert p.server.open_stream() == 2
    assert p.client.open_stream() == 3


def test_data_round_trip_and_half_close_states() -> None:
    p = pair()
    sid = p.client.open_stream()
    p.client.send_data(sid, b"ping?")
    _, server_events = p.shuttle()
    assert StreamOpened(stream_id=sid) in server_events
    assert received(server_events, sid) == b"ping?"
    p.server.send_data(sid, b"pong!", fin=True)
    client_events, _ = p.shuttle()
    assert received(client_events, sid) == b"pong!"
    assert StreamEnded(stream_id=sid) in client_events
    assert p.client.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    assert p.server.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    with pytest.raises(LocalProtocolError):
        p.server.send_data(sid, b"more")
    p.client.send_data(sid, b"bye")
    p.client.end_stream(sid)
    _, server_events = p.shuttle()
    assert received(server_events, sid) == b"bye"
    assert StreamEnded(stream_id=sid) in server_events
    assert p.client.num_streams == p.server.num_streams == 0
    assert p.client.stream_state(sid) is StreamState.CLOSED


def test_large_send_is_split_with_fin_on_the_last_frame() -> None:
    p = pair(client=YamuxConfig(max_send_frame=1000))
    sid = p.client.open_stream()
    payload = bytes(range(256)) * 20
    p.client.send_data(sid, payload, fin=True)
    frames = parse_frames(p.client.data_to_send())
    data_frames = [f for f in frames if f[0] == DATA]
    assert [f[3] for f in data_frames] == [1000] * 5 + [120]
    assert [f[1] for f in data_frames] == [0] * 5 + [FIN]
    assert b"".join(f[4] for f in data_frames) == payload


def test_empty_send_queues_nothing_and_empty_fin_is_one_frame() -> None:
    p = pair()
    sid = p.client.open_stream()
    p.client.data_to_send()
    p.client.send_data(sid, b"")
    assert not p.client.has_data_to_send
    p.client.send_data(sid, b"", fin=True)
    assert parse_frames(p.client.data_to_send()) == [(DATA, FIN, sid, 0, b"")]


def test_send_data_copies_mutable_buffers() -> None:
    p = pair()
    sid = p.client.open_stream()
    buf = bytearray(b"abc")
    p.client.send_data(sid, buf)
    p.client.send_data(sid, memoryview(b"xyz")[1:])
    buf[:] = b"XXX"
    _, server_events = p.shuttle()
    assert received(server_events, sid) == b"abcyz"


def test_incremental_parsing_byte_by_byte() -> None:
    p = pair()
    sid = p.client.open_stream()
    p.client.send_data(sid, b"0123456789" * 50, fin=True)
    wire = p.client.data_to_send()
    events: list[Event] = []
    for i in range(len(wire)):
        events += p.server.receive_data(wire[i : i + 1])
    assert received(events, sid) == b"0123456789" * 50
    assert non_data(events) == [StreamOpened(stream_id=sid), StreamEnded(stream_id=sid)]


# ---------------------------------------------------------------- flow control


def test_sender_blocks_at_window_and_acknowledge_reopens_it() -> None:
    window = INITIAL_WINDOW
    p = pair(server=YamuxConfig(window_size=window))
    sid = p.client.open_stream()
    p.shuttle()
    assert p.client.send_window(sid) == window
    p.client.send_data(sid, b"x" * window)
    assert p.client.send_window(sid) == 0
    with pytest.raises(FlowControlError):
        p.client.send_data(sid, b"y")
    _, server_events = p.shuttle()
    assert len(received(server_events, sid)) == window
    # Less than half consumed: no update yet.
    p.server.acknowledge_received_data(sid, window // 2 - 1)
    assert not p.server.has_data_to_send
    p.server.acknowledge_received_data(sid, 1)
    client_events, _ = p.shuttle()
    assert client_events == [SendWindowOpened(stream_id=sid)]
    assert p.client.send_window(sid) == window // 2


def test_acknowledging_more_than_received_is_a_local_error() -> None:
    p = pair()
    sid = p.client.open_stream()
    p.client.send_data(sid, b"abc")
    p.shuttle()
    with pytest.raises(LocalProtocolError):
        p.server.acknowledge_received_data(sid, 4)


def test_data_beyond_the_window_is_a_protocol_error() -> None:
    server = YamuxSession(Role.SERVER, YamuxConfig(window_size=INITIAL_WINDOW))
    server.receive_data(frame(WINDOW_UPDATE, SYN, 1, 0))
    server.data_to_send()
    server.receive_data(frame(DATA, 0, 1, INITIAL_WINDOW, b"x" * INITIAL_WINDOW))
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(frame(DATA, 0, 1, 1, b"x"))
    assert info.value.code is ErrorCode.PROTOCOL
    assert parse_frames(server.data_to_send()) == [(GO_AWAY, 0, 0, 1, b"")]


def test_oversized_frame_fails_on_the_header_alone() -> None:
    server = YamuxSession(Role.SERVER, YamuxConfig(max_frame_data=1024))
    server.receive_data(frame(WINDOW_UPDATE, SYN, 1, 0))
    with pytest.raises(LimitExceeded) as info:
        server.receive_data(frame(DATA, 0, 1, 1025))
    assert info.value.code is ErrorCode.LIMIT
    assert parse_frames(server.data_to_send())[-1] == (GO_AWAY, 0, 0, 1, b"")


# ---------------------------------------------------------------- reset & close


def test_reset_forgets_the_stream_and_late_frames_are_ignored() -> None:
    p = pair()
    sid = p.client.open_stream()
    p.client.send_data(sid, b"hello")
    p.shuttle()
    p.server.send_data(sid, b"in flight")
    in_flight = p.server.data_to_send()
    p.client.reset(sid)
    assert p.client.num_streams == 0
    assert p.client.receive_data(in_flight) == []
    _, server_events = p.shuttle()
    assert server_events == [StreamReset(stream_id=sid)]
    assert p.server.num_streams == 0
    p.client.reset(sid)  # already gone: no-op
    assert not p.client.has_data_to_send


def test_close_stream_fins_and_resets_a_peer_that_keeps_writing() -> None:
    p = pair()
    sid = p.client.open_stream()
    p.shuttle()
    p.server.close_stream(sid)
    assert p.server.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    client_events, _ = p.shuttle()
    assert StreamEnded(stream_id=sid) in client_events
    p.client.send_data(sid, b"anyone there?")
    client_events, server_events = p.shuttle()
    assert server_events == []
    assert client_events == [StreamReset(stream_id=sid)]
    assert p.client.num_streams == p.server.num_streams == 0


def test_close_stream_after_remote_fin_closes_cleanly() -> None:
    p = pair()
    sid = p.client.open_stream()
    p.client.end_stream(sid)
    p.shuttle()
    p.server.close_stream(sid)
    client_events, _ = p.shuttle()
    assert client_events == [StreamEnded(stream_id=sid)]
    assert p.client.num_streams == p.server.num_streams == 0


def test_peer_rejecting_our_stream_frees_the_ack_backlog() -> None:
    client = YamuxSession(Role.CLIENT)
    sid = client.open_stream()
    assert client.ack_backlog == 1
    assert client.receive_data(frame(WINDOW_UPDATE, RST, sid, 0)) == [StreamReset(stream_id=sid)]
    assert client.ack_backlog == 0
    assert client.num_streams == 0


# ---------------------------------------------------------------- limits


def test_inbound_streams_past_max_streams_are_reset_and_counted() -> None:
    p = pair(server=YamuxConfig(max_streams=2))
    sids = [p.client.open_stream() for _ in range(3)]
    client_events, server_events = p.shuttle()
    assert [e for e in server_events if isinstance(e, StreamOpened)] == [
        StreamOpened(stream_id=sids[0]),
        StreamOpened(stream_id=sids[1]),
    ]
    assert non_data(client_events) == [StreamReset(stream_id=sids[2])]
    assert p.server.rejected_streams == 1
    assert p.server.num_streams == 2
    with pytest.raises(LocalProtocolError) as info:
        p.server.open_stream()
    assert info.value.code is ErrorCode.LIMIT


def test_ack_backlog_limits_open_stream_until_acks_arrive() -> None:
    p = pair(client=YamuxConfig(max_ack_backlog=2))
    p.client.open_stream()
    p.client.open_stream()
    with pytest.raises(LocalProtocolError) as info:
        p.client.open_stream()
    assert info.value.code is ErrorCode.LIMIT
    p.shuttle()
    assert p.client.ack_backlog == 0
    p.client.open_stream()


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        YamuxConfig(window_size=INITIAL_WINDOW - 1)
    with pytest.raises(ValueError):
        YamuxConfig(max_streams=0)
    with pytest.raises(ValueError):
        YamuxConfig(max_frame_data=0)


# ---------------------------------------------------------------- ping & go away


def test_ping_is_answered_automatically() -> None:
    p = pair()
    p.client.ping(0xDEADBEEF)
    client_events, server_events = p.shuttle()
    assert server_events == []
    assert client_events == [Pong(opaque=0xDEADBEEF)]


def test_go_away_stops_new_streams_both_ways() -> None:
    p = pair()
    old = p.client.open_stream()
    p.shuttle()
    racing = p.server.open_stream()  # SYN crosses the client's GoAway
    p.client.go_away()
    p.client.go_away()  # once only
    client_events, server_events = p.shuttle()
    assert non_data(server_events) == [GoAwayReceived(code=0), StreamReset(stream_id=racing)]
    assert client_events == []
    assert p.client.rejected_streams == 1
    with pytest.raises(LocalProtocolError):
        p.server.open_stream()
    with pytest.raises(LocalProtocolError):
        p.client.open_stream()
    p.client.send_data(old, b"existing streams still work")
    _, server_events = p.shuttle()
    assert received(server_events, old) == b"existing streams still work"


def test_eof_ends_the_session() -> None:
    p = pair()
    p.client.open_stream()
    p.shuttle()
    assert p.server.receive_data(b"") == []
    assert p.server.receive_data(b"") == []
    with pytest.raises(LocalProtocolError):
        p.server.open_stream()
    with pytest.raises(LocalProtocolError):
        p.server.receive_data(b"late")


# ---------------------------------------------------------------- protocol errors

SYN_1 = frame(WINDOW_UPDATE, SYN, 1, 0)

PROTOCOL_ERRORS = {
    "bad version": b"\x01" + frame(PING, SYN, 0, 1)[1:],
    "unknown type": frame(9, 0, 0, 0),
    "SYN with our parity": frame(WINDOW_UPDATE, SYN, 2, 0),
    "SYN reusing an id": SYN_1 + frame(WINDOW_UPDATE, RST, 1, 0) + SYN_1,
    "SYN below the last id": frame(WINDOW_UPDATE, SYN, 5, 0) + frame(WINDOW_UPDATE, SYN, 3, 0),
    "data on stream 0": frame(DATA, 0, 0, 1, b"x"),
    "frame for a stream never opened": frame(DATA, 0, 7, 1, b"x"),
    "ACK for a stream we never opened": frame(WINDOW_UPDATE, ACK, 2, 0),
    "duplicate FIN": SYN_1 + frame(WINDOW_UPDATE, FIN, 1, 0) + frame(DATA, FIN, 1, 0),
    "data after FIN": SYN_1 + frame(WINDOW_UPDATE, FIN, 1, 0) + frame(DATA, 0, 1, 1, b"x"),
    "window overflow": SYN_1 + frame(WINDOW_UPDATE, 0, 1, 0xFFFF_FFFF),
}


@pytest.mark.parametrize("wire", PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_protocol_errors_raise_and_queue_go_away(wire: bytes) -> None:
    server = YamuxSession(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(wire)
    assert parse_frames(server.data_to_send())[-1] == (GO_AWAY, 0, 0, 1, b"")
    with pytest.raises(RemoteProtocolError):
        server.receive_data(frame(PING, SYN, 0, 1))
    with pytest.raises(LocalProtocolError):
        server.open_stream()


def test_ping_and_go_away_on_a_nonzero_stream_are_tolerated() -> None:
    server = YamuxSession(Role.SERVER)
    assert server.receive_data(frame(PING, ACK, 3, 9) + frame(GO_AWAY, 0, 5, 2)) == [
        Pong(opaque=9),
        GoAwayReceived(code=2),
    ]


# ---------------------------------------------------------------- hypothesis


def feed_hostile(session: YamuxSession, chunks: list[bytes]) -> None:
    """Feed chunks; only RemoteProtocolError may escape, and then it sticks."""
    for chunk in chunks:
        try:
            session.receive_data(chunk)
        except RemoteProtocolError:
            session.data_to_send()
            with pytest.raises(RemoteProtocolError):
                session.receive_data(b"\x00" * 12)
            return
        session.data_to_send()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=20), st.sampled_from(Role))
def test_random_bytes_raise_only_remote_protocol_errors(chunks: list[bytes], role: Role) -> None:
    feed_hostile(YamuxSession(role, YamuxConfig(max_streams=4)), chunks)


frames_strategy = st.lists(
    st.tuples(
        st.integers(0, 3),  # type
        st.integers(0, 15),  # flags
        st.integers(0, 8),  # stream id
        st.binary(max_size=40),  # data body
        st.integers(0, 1 << 20),  # length of a non-data frame
    ),
    max_size=30,
)


def encode(frames: list[tuple[int, int, int, bytes, int]]) -> bytes:
    out = b""
    for ftype, flags, sid, body, length in frames:
        if ftype == DATA:
            out += frame(ftype, flags, sid, len(body), body)
        else:
            out += frame(ftype, flags, sid, length)
    return out


@settings(max_examples=300, deadline=None)
@given(
    frames_strategy,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.lists(st.integers(1, 50), min_size=1, max_size=10),
    st.sampled_from(Role),
)
def test_mutated_frame_sequences_raise_only_remote_protocol_errors(
    frames: list[tuple[int, int, int, bytes, int]],
    mutations: list[tuple[int, int]],
    sizes: list[int],
    role: Role,
) -> None:
    wire = bytearray(encode(frames))
    for pos, value in mutations:
        if wire:
            wire[pos % len(wire)] = value
    chunks = []
    pos = 0
    i = 0
    while pos < len(wire):
        size = sizes[i % len(sizes)]
        chunks.append(bytes(wire[pos : pos + size]))
        pos += size
        i += 1
    session = YamuxSession(role, YamuxConfig(max_streams=3, max_frame_data=32))
    feed_hostile(session, chunks)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=3000), st.booleans()), max_size=12),
    st.lists(st.integers(1, 5000), min_size=1, max_size=8),
)
def test_any_split_of_valid_traffic_gives_the_same_streams(
    writes: list[tuple[int, bytes, bool]], sizes: list[int]
) -> None:
    client = YamuxSession(Role.CLIENT, YamuxConfig(max_send_frame=700))
    sids = [client.open_stream() for _ in range(3)]
    expected: dict[int, bytes] = defaultdict(bytes)
    ended: set[int] = set()
    for index, data, fin in writes:
        sid = sids[index]
        if sid in ended:
            continue
        client.send_data(sid, data, fin=fin)
        expected[sid] += data
        if fin:
            ended.add(sid)
    wire = client.data_to_send()

    server = YamuxSession(Role.SERVER)
    events: list[Event] = []
    pos = 0
    i = 0
    while pos < len(wire):
        size = sizes[i % len(sizes)]
        events += server.receive_data(wire[pos : pos + size])
        pos += size
        i += 1
    for sid in sids:
        assert received(events, sid) == expected[sid]
    assert {e.stream_id for e in events if isinstance(e, StreamEnded)} == ended
    assert [e for e in events if isinstance(e, StreamOpened)] == [
        StreamOpened(stream_id=sid) for sid in sids
    ]
