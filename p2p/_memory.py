"""An in-memory network with latency, bandwidth and loss, for tests and simulations.

Each direction of a connection is a pipe of segments stamped with the time they
arrive. Time is trio's clock, so under `trio.testing.MockClock(autojump_threshold=0)`
a simulated hour passes as fast as the CPU can run the protocol code. Loss is
modelled the way TCP experiences it: a lost segment arrives one retransmission
timeout late, and every segment behind it waits too (the stream stays reliable).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ._multiaddr import Multiaddr
from ._transport import RawConnection, RawHandler

SEGMENT = 64 * 1024
DEFAULT_MAX_IN_FLIGHT = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """One direction of a link: one-way latency (s), bandwidth (bytes/s), loss (0-1)."""

    latency: float = 0.0
    bandwidth: float | None = None
    loss: float = 0.0
    retransmit_timeout: float = 0.2

    def __post_init__(self) -> None:
        if self.latency < 0 or not 0 <= self.loss < 1:
            raise ValueError("latency must be >= 0 and loss in [0, 1)")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError("bandwidth must be positive")


class _Pipe:
    """One direction: segments in flight, bounded so a slow reader stops its writer."""

    def __init__(self, profile: LinkProfile, rng: random.Random, max_in_flight: int) -> None:
        self.profile = profile
        self.rng = rng
        self.max_in_flight = max_in_flight
        self.segments: deque[tuple[float, bytes]] = deque()
        self.in_flight = 0
        self.link_free_at = 0.0
        self.last_arrival = 0.0
        self.closed = False  # writer sent EOF or closed
        self.reader_closed = False
        self.changed = trio.Event()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def push(self, data: bytes, now: float) -> None:
        profile = self.profile
        for start in range(0, len(data), SEGMENT):
            segment = data[start : start + SEGMENT]
            sent = max(now, self.link_free_at)
            if profile.bandwidth is not None:
                sent += len(segment) / profile.bandwidth
            self.link_free_at = sent
            arrival = sent + profile.latency
            if profile.loss and self.rng.random() < profile.loss:
                arrival += profile.retransmit_timeout
            arrival = max(arrival, self.last_arrival)
            self.last_arrival = arrival
            self.segments.append((arrival, segment))
            self.in_flight += len(segment)
        self._notify()


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        self._send_lock = trio.StrictFIFOLock()
        self._unsent = bytearray()
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue data; waits while the pipe holds more than its in-flight limit."""
        if self._unsent:
            data = bytes(self._unsent) + bytes(data)
            self._unsent.clear()
        async with self._send_lock:
            pipe = self._out
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if pipe.closed:
                    raise trio.ClosedResourceError("send side already closed")
                if pipe.reader_closed:
                    raise trio.BrokenResourceError("connection reset by peer")
                if pipe.in_flight < pipe.max_in_flight:
                    break
                await pipe.changed.wait()
            if data:
                pipe.push(bytes(data), trio.current_time())
            await trio.lowlevel.checkpoint()

    def send_all_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue `data` now if the pipe has room (and nothing is waiting before it)."""
        pipe = self._out
        if self._closed or pipe.closed:
            raise trio.ClosedResourceError("stream closed")
        if pipe.reader_closed:
            raise trio.BrokenResourceError("connection reset by peer")
        if self._unsent or self._send_lock.locked() or pipe.in_flight >= pipe.max_in_flight:
            self._unsent += data
            return False
        if data:
            pipe.push(bytes(data), trio.current_time())
        return True

    async def flush(self) -> None:
        """Send what `send_all_nowait` kept back."""
        if self._unsent:
            pending = bytes(self._unsent)
            self._unsent.clear()
            await self.send_all(pending)

    async def wait_send_all_might_not_block(self) -> None:
        """Waits until the pipe has room."""
        pipe = self._out
        while pipe.in_flight >= pipe.max_in_flight and not pipe.reader_closed:
            await pipe.changed.wait()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next arrived bytes, waiting for their arrival time."""
        pipe = self._in
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            if pipe.segments:
                arrival, segment = pipe.segments[0]
                if arrival <= trio.current_time():
                    break
                await trio.sleep_until(arrival)
                waited = True
                continue
            if pipe.closed:
                await trio.lowlevel.checkpoint()
                return b""
            await pipe.changed.wait()
            waited = True
        if max_bytes is not None and len(segment) > max_bytes:
            pipe.segments[0] = (arrival, segment[max_bytes:])
            segment = segment[:max_bytes]
        else:
            pipe.segments.popleft()
        pipe.in_flight -= len(segment)
        pipe._notify()
        if not waited:  # a checkpoint like any trio receive, without losing what was taken
            await trio.lowlevel.cancel_shielded_checkpoint()
        return segment

    async def send_eof(self) -> None:
        """Half-close: the peer reads EOF after the data already sent."""
        async with self._send_lock:
            self._out.closed = True
            self._out._notify()
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close both directions."""
        if not self._closed:
            self._closed = True
            self._out.closed = True
            self._out._notify()
            self._in.reader_closed = True
            self._in.segments.clear()
            self._in.in_flight = 0
            self._in._notify()
        await trio.lowlevel.checkpoint()


ProfileFor = Callable[[int, int], LinkProfile]


class MemoryNetwork:
    """A switchboard of `/memory/<n>` listeners; `profile_for(a, b)` shapes each direction."""

    def __init__(
        self,
        *,
        default: LinkProfile | None = None,
        profile_for: ProfileFor | None = None,
        rng: random.Random | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.default = default or LinkProfile()
        self._profile_for = profile_for
        self.rng = rng or random.Random(0)
        self.max_in_flight = max_in_flight
        self._listeners: dict[int, tuple[trio.Nursery, RawHandler]] = {}
        self._next_address = 1
        self.dials = 0
        self.failed_dials = 0

    def profile(self, source: int, destination: int) -> LinkProfile:
        """The link profile from `source` to `destination`."""
        if self._profile_for is not None:
            return self._profile_for(source, destination)
        return self.default

    def allocate(self) -> int:
        """A fresh memory address number."""
        address = self._next_address
        self._next_address += 1
        return address

    def transport(self) -> MemoryTransport:
        """A transport for one host on this network."""
        return MemoryTransport(self)

    def _pipe(self, source: int, destination: int) -> _Pipe:
        return _Pipe(self.profile(source, destination), self.rng, self.max_in_flight)

    async def connect(self, source: int, destination: int) -> RawConnection:
        self.dials += 1
        listener = self._listeners.get(destination)
        if listener is None:
            self.failed_dials += 1
            raise ConnectionRefusedError(f"nothing listens on /memory/{destination}")
        forward = self._pipe(source, destination)
        backward = self._pipe(destination, source)
        await trio.sleep(forward.profile.latency + backward.profile.latency)
        if self._listeners.get(destination) is not listener:
            self.failed_dials += 1
            raise ConnectionRefusedError(f"/memory/{destination} stopped listening")
        ours = MemoryStream(forward, backward)
        theirs = MemoryStream(backward, forward)
        source_addr = Multiaddr((("memory", str(source)),))
        destination_addr = Multiaddr((("memory", str(destination)),))
        nursery, handler = listener
        nursery.start_soon(handler, RawConnection(theirs, destination_addr, source_addr))
        return RawConnection(ours, source_addr, destination_addr)


class MemoryTransport:
    """Dials and serves `/memory/<n>` addresses on one MemoryNetwork."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.address: int | None = None

    def handles(self, addr: Multiaddr) -> bool:
        """Only /memory/<n>."""
        return addr.without_peer_id().protocols() == ("memory",)

    async def dial(self, addr: Multiaddr) -> RawConnection:
        """Connect to the listener at `addr` after one round trip of latency."""
        value = addr.value_for("memory")
        assert value is not None
        source = self.address if self.address is not None else self.network.allocate()
        return await self.network.connect(source, int(value))

    async def serve(
        self,
        addr: Multiaddr,
        handler: RawHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register `/memory/<n>` (0 picks a free number) until cancelled."""
        value = addr.value_for("memory")
        number = int(value) if value else 0
        if number == 0:
            number = self.network.allocate()
        if number in self.network._listeners:
            raise OSError(f"/memory/{number} is already in use")
        self.address = number
        try:
            async with trio.open_nursery() as nursery:
                self.network._listeners[number] = (nursery, handler)
                task_status.started([Multiaddr((("memory", str(number)),))])
                await trio.sleep_forever()
        finally:
            self.network._listeners.pop(number, None)
