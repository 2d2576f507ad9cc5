"""The reserving side: hold slots on relays, keep them fresh, and take circuits they bring.

A peer behind NAT reserves on a relay and advertises `<relay addr>/p2p-circuit`. When
someone dials that, the relay opens a `stop` stream to us; we answer OK and hand the
stream to the host as an inbound raw connection, which it upgrades (Noise as responder,
then yamux) and serves for as long as the stream lives. Stop streams are accepted only
from relays we hold a reservation with, so nobody else can push connections at us.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from .._errors import DecodeError
from .._host import DIAL_ERRORS, DialError
from .._multiaddr import Multiaddr
from .._streams import PrefixedStream
from .._transport import RawConnection
from ._framing import read_message, write_message
from ._messages import HOP, STOP, HopMessage, HopType, Limit, Status, StopMessage, StopType
from ._transport import RelayRefused, circuit_addr
from ._voucher import open_voucher

if TYPE_CHECKING:
    from .._host import Host, NetStream
    from .._identity import PeerId

log = logging.getLogger("dbloom.p2p.relay")

RESERVE_TIMEOUT: Final = 10.0
MIN_REFRESH: Final = 1.0
MAX_REFRESH: Final = 900.0  # a relay's word on expiry is not trusted beyond this
RETRY_DELAYS: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
RELAY_TAG: Final = "relay-client"


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldReservation:
    """A slot a relay granted us: until when (UTC seconds), where, and under which limits."""

    relay: PeerId
    expire: int
    addrs: tuple[Multiaddr, ...]
    limit: Limit | None

    @property
    def circuit_addrs(self) -> tuple[Multiaddr, ...]:
        """Our addresses through this relay: `<relay addr>/p2p/<relay>/p2p-circuit`."""
        return tuple(circuit_addr(a.with_peer_id(self.relay)) for a in self.addrs)


class RelayClient:
    """Reservations on relays for `host`, and the `stop` handler that takes their circuits."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.reservations: dict[PeerId, HeldReservation] = {}
        self.circuits_accepted = 0
        host.set_stream_handler(STOP, self._handle_stop)
        host.add_addr_source(self.circuit_addrs)

    def circuit_addrs(self) -> list[Multiaddr]:
        """Every address others can reach us at through our relays."""
        return [a for r in self.reservations.values() for a in r.circuit_addrs]

    async def reserve(
        self, relay: PeerId | Multiaddr | str, *, timeout: float = RESERVE_TIMEOUT
    ) -> HeldReservation:
        """Ask `relay` for a slot (or renew ours); raises RelayRefused if it says no."""
        host = self.host
        with trio.fail_after(timeout):
            conn = await host.connect(relay)
            if conn.relayed:
                raise RelayRefused(Status.PERMISSION_DENIED, "a reservation over a circuit")
            stream = await conn.new_stream([HOP], timeout=timeout)
            try:
                await write_message(stream, HopMessage(type=HopType.RESERVE), timeout=timeout)
                reply, _ = await read_message(stream, HopMessage.from_bytes, timeout=timeout)
            finally:
                await stream.aclose()
        if reply.type is not HopType.STATUS or reply.status is not Status.OK:
            raise RelayRefused(reply.status or Status.UNUSED, "a reservation")
        if reply.reservation is None:
            raise DecodeError("relay granted a reservation without describing it")
        relay_id = conn.peer_id
        granted = reply.reservation
        if granted.voucher is not None:
            voucher = open_voucher(granted.voucher)
            if voucher.relay != relay_id or voucher.peer != host.peer_id:
                raise DecodeError("relay's voucher names other peers")
        addrs = tuple(
            a.without_peer_id() for a in granted.addrs if a.peer_id in (None, relay_id)
        ) or (conn.remote_addr,)
        held = HeldReservation(
            relay=relay_id, expire=granted.expire, addrs=addrs, limit=reply.limit
        )
        self.reservations[relay_id] = held
        host.protect(relay_id, RELAY_TAG)
        return held

    def release(self, relay: PeerId) -> None:
        """Forget our slot on `relay` (it lapses there at expiry or when we disconnect)."""
        self.reservations.pop(relay, None)
        self.host.unprotect(relay, RELAY_TAG)

    async def keep_reservation(
        self,
        relay: PeerId | Multiaddr | str,
        *,
        task_status: trio.TaskStatus[HeldReservation] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Reserve, report the grant, then keep it renewed until cancelled.

        The first attempt's failure is raised, so a caller learns at once that a relay
        will not have us; later ones are retried (see `renew`).
        """
        held = await self.reserve(relay)
        task_status.started(held)
        await self.renew(relay, held)

    async def renew(
        self, relay: PeerId | Multiaddr | str, held: HeldReservation, *, give_up_after: int = 0
    ) -> None:
        """Renew `held` at half its remaining time; release it when this returns or ends.

        A refusal or lost connection is retried with growing delays, forever or, with
        `give_up_after`, until that many failures in a row (then it returns, so the
        caller can pick another relay).
        """
        relay_id = held.relay
        failures = 0
        try:
            while not give_up_after or failures < give_up_after:
                if failures:
                    delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS)) - 1]
                else:
                    delay = min(MAX_REFRESH, max(MIN_REFRESH, (held.expire - time.time()) / 2))
                await self._sleep_or_disconnect(relay_id, delay)
                try:
                    held = await self.reserve(relay)
                    failures = 0
                except (DialError, *DIAL_ERRORS) as exc:
                    failures += 1
                    self.reservations.pop(relay_id, None)
                    log.warning("could not renew our reservation on %s: %s", relay_id, exc)
        finally:
            self.release(relay_id)

    async def _sleep_or_disconnect(self, relay: PeerId, delay: float) -> None:
        """Sleep `delay`, waking early (to reserve again) if the relay connection drops."""
        deadline = trio.current_time() + delay
        while trio.current_time() < deadline:
            conn = self.host.connection(relay)
            if conn is None and relay in self.reservations:
                self.reservations.pop(relay, None)
                return
            await trio.sleep(min(MIN_REFRESH, deadline - trio.current_time()))

    async def _handle_stop(self, stream: NetStream) -> None:
        try:
            await self._serve_stop(stream)
        except trio.TooSlowError:
            log.info("stop stream from %s timed out", stream.peer_id)
            await stream.reset()

    async def _serve_stop(self, stream: NetStream) -> None:
        relay = stream.peer_id
        if relay not in self.reservations or stream.connection.relayed:
            await self._answer(stream, Status.PERMISSION_DENIED)
            return
        try:
            message, rest = await read_message(
                stream, StopMessage.from_bytes, timeout=RESERVE_TIMEOUT
            )
        except DecodeError as exc:
            log.info("malformed stop message from %s: %s", relay, exc)
            await self._answer(stream, Status.MALFORMED_MESSAGE)
            return
        if message.type is not StopType.CONNECT or message.peer is None:
            await self._answer(stream, Status.UNEXPECTED_MESSAGE)
            return
        await self._answer(stream, Status.OK)
        self.circuits_accepted += 1
        addr = circuit_addr(stream.connection.remote_addr.with_peer_id(relay))
        raw = RawConnection(
            stream=PrefixedStream(stream, rest) if rest else stream,
            local_addr=addr,
            remote_addr=addr,
        )
        await self.host.serve_inbound(raw, expected_peer=message.peer.id)

    async def _answer(self, stream: NetStream, status: Status) -> None:
        reply = StopMessage(type=StopType.STATUS, status=status)
        await write_message(stream, reply, timeout=RESERVE_TIMEOUT)
