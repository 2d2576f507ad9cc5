"""The relay: grants reservations on `hop` and splices circuits to their targets over `stop`.

The relay never decrypts: the two ends of a circuit run Noise through it, so what it
copies is ciphertext. It copies at most the circuit's byte budget in each direction
and for at most its duration, then resets both streams. A malformed or unexpected
message gets a status answer and costs only its stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from .._errors import DecodeError, RemoteProtocolError
from .._multiaddr import Multiaddr
from ..multistream import NegotiationFailed
from ._framing import read_message, write_message
from ._messages import (
    HOP,
    STOP,
    HopMessage,
    HopType,
    Limit,
    Peer,
    Reservation,
    Status,
    StopMessage,
    StopType,
)
from ._reservations import CircuitBudget, RelayLimits, RelayState
from ._voucher import seal_voucher

if TYPE_CHECKING:
    from .._host import Connection, Host, NetStream
    from .._identity import PeerId

log = logging.getLogger("dbloom.p2p.relay")

RELAY_TIMEOUT: Final = 10.0
PRUNE_INTERVAL: Final = 60.0
SPLICE_CHUNK: Final = 64 * 1024
RESERVATION_TAG: Final = "relay-reservation"
_STREAM_ERRORS: Final = (
    RemoteProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


class _OverBudget(Exception):
    """A circuit tried to carry more bytes than its limit."""


class RelayService:
    """Serve `/libp2p/circuit/relay/0.2.0/hop` on `host` while `run` runs."""

    def __init__(
        self,
        host: Host,
        limits: RelayLimits | None = None,
        *,
        public_addrs: Callable[[], Sequence[Multiaddr]] | None = None,
    ) -> None:
        self.host = host
        self.state = RelayState(limits)
        self._public_addrs = public_addrs or (lambda: host.listen_addrs)
        self.circuits_total = 0
        self.bytes_relayed = 0

    @property
    def limits(self) -> RelayLimits:
        """The caps in force."""
        return self.state.limits

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer hop streams and expire reservations until cancelled."""
        host = self.host
        host.set_stream_handler(HOP, self._handle_hop)
        host.add_connection_listener(self._on_connection)
        try:
            task_status.started()
            while True:
                await trio.sleep(PRUNE_INTERVAL)
                for peer in self.state.prune(trio.current_time()):
                    self.host.unprotect(peer, RESERVATION_TAG)
        finally:
            host.remove_stream_handler(HOP)

    def _on_connection(self, conn: Connection, opened: bool) -> None:
        if not opened:  # the spec: a reservation lives only as long as its connection
            self.state.cancel(conn.peer_id)
            self.host.unprotect(conn.peer_id, RESERVATION_TAG)

    async def _handle_hop(self, stream: NetStream) -> None:
        try:
            await self._serve_hop(stream)
        except trio.TooSlowError:
            log.info("hop stream from %s timed out", stream.peer_id)
            await stream.reset()

    async def _serve_hop(self, stream: NetStream) -> None:
        if stream.connection.relayed:  # the spec: no reservations or circuits over circuits
            await self._answer(stream, Status.PERMISSION_DENIED)
            return
        try:
            message, rest = await read_message(stream, HopMessage.from_bytes, timeout=RELAY_TIMEOUT)
        except DecodeError as exc:
            log.info("malformed hop message from %s: %s", stream.peer_id, exc)
            await self._answer(stream, Status.MALFORMED_MESSAGE)
            return
        if message.type is HopType.RESERVE:
            await self._reserve(stream)
        elif message.type is HopType.CONNECT and message.peer is not None:
            await self._connect(stream, message.peer.id, rest)
        else:
            await self._answer(stream, Status.UNEXPECTED_MESSAGE)

    async def _answer(self, stream: NetStream, status: Status) -> None:
        message = HopMessage(type=HopType.STATUS, status=status)
        await write_message(stream, message, timeout=RELAY_TIMEOUT)

    async def _reserve(self, stream: NetStream) -> None:
        peer = stream.peer_id
        remote = stream.connection.remote_addr
        ip = remote.value_for("ip4") or remote.value_for("ip6")
        slot = self.state.reserve(peer, ip, trio.current_time())
        if isinstance(slot, Status):
            log.info("refused a reservation for %s: %s", peer, slot.name)
            await self._answer(stream, slot)
            return
        self.host.protect(peer, RESERVATION_TAG)
        expire = int(time.time() + self.limits.reservation_ttl)
        relay_id = self.host.peer_id
        addrs = tuple(
            a.with_peer_id(relay_id) for a in self._public_addrs() if not a.is_loopback()
        ) or tuple(a.with_peer_id(relay_id) for a in self._public_addrs())
        reservation = Reservation(
            expire=expire,
            addrs=addrs[:16],
            voucher=seal_voucher(self.host.identity, peer, expire),
        )
        reply = HopMessage(
            type=HopType.STATUS,
            status=Status.OK,
            reservation=reservation,
            limit=self.limits.circuit_limit,
        )
        await write_message(stream, reply, timeout=RELAY_TIMEOUT)

    async def _connect(self, stream: NetStream, target: PeerId, rest: bytes) -> None:
        source = stream.peer_id
        if target in (source, self.host.peer_id):
            await self._answer(stream, Status.PERMISSION_DENIED)
            return
        status = self.state.open_circuit(source, target, trio.current_time())
        if status is not Status.OK:
            await self._answer(stream, status)
            return
        try:
            stop = await self._open_stop(source, target)
            if stop is None:
                await self._answer(stream, Status.CONNECTION_FAILED)
                return
            try:
                limit = self.limits.circuit_limit
                reply = HopMessage(type=HopType.STATUS, status=Status.OK, limit=limit)
                await write_message(stream, reply, timeout=RELAY_TIMEOUT)
                self.circuits_total += 1
                await self._splice(stream, rest, stop[0], stop[1], limit)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(RELAY_TIMEOUT):
                    await stop[0].aclose()
        finally:
            self.state.close_circuit(source, target)

    async def _open_stop(self, source: PeerId, target: PeerId) -> tuple[NetStream, bytes] | None:
        """Ask the target to take the circuit; None if it cannot be reached or says no."""
        conn = self.host.connection(target)
        if conn is None:
            return None
        stop: NetStream | None = None
        try:
            stop = await conn.new_stream([STOP], timeout=RELAY_TIMEOUT)
            request = StopMessage(
                type=StopType.CONNECT, peer=Peer(source), limit=self.limits.circuit_limit
            )
            await write_message(stop, request, timeout=RELAY_TIMEOUT)
            reply, rest = await read_message(stop, StopMessage.from_bytes, timeout=RELAY_TIMEOUT)
        except (*_STREAM_ERRORS, NegotiationFailed) as exc:
            log.info("could not open a circuit stop stream to %s: %s", target, exc)
        else:
            if reply.type is StopType.STATUS and reply.status is Status.OK:
                return stop, rest
            log.info("%s declined a circuit from %s: %s", target, source, reply.status)
        if stop is not None:
            await stop.reset()
        return None

    async def _splice(
        self, src: NetStream, src_rest: bytes, dst: NetStream, dst_rest: bytes, limit: Limit
    ) -> None:
        """Copy bytes both ways until both ends finish, or a limit or error resets both."""
        budget = CircuitBudget(limit)
        broken = False

        async def pump(
            inbound: NetStream, outbound: NetStream, first: bytes, direction: int
        ) -> None:
            nonlocal broken
            try:
                data = first
                while True:
                    if data:
                        allowed = budget.take(direction, len(data))
                        if allowed:
                            await outbound.send_all(data[:allowed])
                            self.bytes_relayed += allowed
                        if allowed < len(data):
                            raise _OverBudget
                    data = await inbound.receive_some(SPLICE_CHUNK)
                    if not data:
                        await outbound.send_eof()
                        return
            except (*_STREAM_ERRORS, _OverBudget) as exc:
                log.debug("circuit %s -> %s ends: %r", inbound.peer_id, outbound.peer_id, exc)
                broken = True
                nursery.cancel_scope.cancel()

        with trio.move_on_after(limit.duration) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, src, dst, src_rest, 0)
                nursery.start_soon(pump, dst, src, dst_rest, 1)
        if broken or deadline.cancelled_caught:
            with trio.CancelScope(shield=True):
                await src.reset()
                await dst.reset()
