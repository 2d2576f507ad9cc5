"""DCUtR: turn a relayed connection into a direct one by punching through both NATs.

When a peer reaches us through a relay, we (the inbound side, B) first dial it directly
if it advertises a dialable address. If not, we run `/libp2p/dcutr` over the relayed
connection: each side sends the addresses peers observe it at (identify) with its
listening port, B measures the round trip, says SYNC and waits half of it, and both
dial each other from their listening port at once, a TCP simultaneous open that each
NAT lets through as the reply to its own outgoing connection. The dialer of the relayed
connection (A) is the initiator of the direct one, as the spec says. The host then
prefers the direct connection and lets the relayed one go idle and close.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import trio

from .._errors import DecodeError
from .._host import DIAL_ERRORS
from .._multiaddr import Multiaddr
from .._transport import RawConnection, TcpTransport
from ..multistream import NegotiationFailed
from ._dcutr import DCUTR, HolePunch, PunchType
from ._framing import read_message, write_message

if TYPE_CHECKING:
    from .._host import Connection, Host, NetStream
    from .._identify_core import IdentifyInfo
    from .._identity import PeerId

log = logging.getLogger("dbloom.p2p.relay")

ATTEMPTS: Final = 3  # the spec: the inbound peer tries three times before giving up
STREAM_TIMEOUT: Final = 10.0
DIAL_TIMEOUT: Final = 5.0  # covers two SYN retransmissions
IDENTIFY_WAIT: Final = 5.0
MAX_OBSERVED: Final = 8
MAX_TARGETS: Final = 8


def direct_tcp(addr: Multiaddr) -> bool:
    """A TCP address one could dial directly: a literal, specific, non-loopback IP."""
    protocols = addr.without_peer_id().protocols()
    if protocols not in (("ip4", "tcp"), ("ip6", "tcp")):
        return False
    ip = ipaddress.ip_address(addr.parts[0][1] or "")
    return not (ip.is_unspecified or ip.is_loopback or ip.is_multicast)


class HolePunchService:
    """Runs DCUtR for `host`, dialing with `tcp` (which must have `reuseport` on)."""

    def __init__(self, host: Host, tcp: TcpTransport) -> None:
        if not tcp.reuseport:
            raise ValueError("hole punching needs a TcpTransport(reuseport=True)")
        self.host = host
        self.tcp = tcp
        self.punched = 0
        self.direct = 0
        self.failed = 0
        self._observed: dict[Multiaddr, None] = {}
        self._identified: dict[PeerId, trio.Event] = {}
        self._answering: set[PeerId] = set()
        self._nursery: trio.Nursery | None = None

    def punch_addrs(self) -> list[Multiaddr]:
        """Where a peer should dial us: observed IPs at our listening ports, then our own."""
        out = []
        for observed in self._observed:
            family, ip = observed.parts[0]
            port = self.tcp.ports.get(family)
            if port:
                out.append(Multiaddr(((family, ip), ("tcp", str(port)))))
        out += [a.without_peer_id() for a in self.host.listen_addrs if direct_tcp(a)]
        return list(dict.fromkeys(out))[:MAX_TARGETS]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer `/libp2p/dcutr` and upgrade inbound relayed connections until cancelled."""
        host = self.host
        host.set_stream_handler(DCUTR, self._handle)
        host.add_identify_listener(self._on_identified)
        host.add_connection_listener(self._on_connection)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            host.remove_stream_handler(DCUTR)

    def _on_identified(self, peer: PeerId, info: IdentifyInfo) -> None:
        waiting = self._identified.get(peer)
        if waiting is not None:
            waiting.set()
        observed = info.observed_addr
        if observed is not None and direct_tcp(observed):
            self._observed[Multiaddr(observed.parts[:1])] = None
            while len(self._observed) > MAX_OBSERVED:
                del self._observed[next(iter(self._observed))]

    def _on_connection(self, conn: Connection, opened: bool) -> None:
        if opened and conn.relayed and conn.direction == "inbound" and self._nursery:
            self._nursery.start_soon(self._upgrade, conn)

    async def _upgrade(self, conn: Connection) -> None:
        """B's side: a direct dial if A looks dialable, else up to three hole punches."""
        peer = conn.peer_id
        if conn.identified is None:
            identified = self._identified.setdefault(peer, trio.Event())
            try:
                with trio.move_on_after(IDENTIFY_WAIT):
                    await identified.wait()
            finally:
                self._identified.pop(peer, None)
        listed = conn.identified.listen_addrs if conn.identified else ()
        direct = [a for a in listed if direct_tcp(a)][:MAX_TARGETS]
        if direct and await self._dial_all(peer, direct, initiator=True, punch=False):
            self.direct += 1
            return
        for attempt in range(ATTEMPTS):
            if conn.is_closed:
                return
            try:
                if await self._punch(conn):
                    self.punched += 1
                    return
            except (*DIAL_ERRORS, NegotiationFailed) as exc:
                log.info("hole punch to %s failed: %s", peer, exc)
            log.debug("hole punch attempt %d to %s did not connect", attempt + 1, peer)
        self.failed += 1

    async def _punch(self, conn: Connection) -> bool:
        stream = await conn.new_stream([DCUTR], timeout=STREAM_TIMEOUT)
        try:
            start = trio.current_time()
            offer = HolePunch(PunchType.CONNECT, tuple(self.punch_addrs()))
            await write_message(stream, offer, timeout=STREAM_TIMEOUT)
            reply, _ = await read_message(stream, HolePunch.from_bytes, timeout=STREAM_TIMEOUT)
            if reply.type is not PunchType.CONNECT:
                raise DecodeError("expected CONNECT")
            rtt = trio.current_time() - start
            await write_message(stream, HolePunch(PunchType.SYNC), timeout=STREAM_TIMEOUT)
        finally:
            await stream.aclose()
        await trio.sleep(rtt / 2)
        return await self._dial_all(conn.peer_id, reply.addrs, initiator=False, punch=True)

    async def _handle(self, stream: NetStream) -> None:
        """A's side: answer CONNECT with our addresses, and dial at once on SYNC.

        Only over a relayed connection we dialed, one punch per peer at a time: the
        addresses come from the peer, and we should not dial strangers' lists at will.
        """
        peer = stream.peer_id
        conn = stream.connection
        if not conn.relayed or conn.direction != "outbound" or peer in self._answering:
            await stream.reset()
            return
        self._answering.add(peer)
        try:
            offer, _ = await read_message(stream, HolePunch.from_bytes, timeout=STREAM_TIMEOUT)
            if offer.type is not PunchType.CONNECT:
                raise DecodeError("expected CONNECT")
            answer = HolePunch(PunchType.CONNECT, tuple(self.punch_addrs()))
            await write_message(stream, answer, timeout=STREAM_TIMEOUT)
            sync, _ = await read_message(stream, HolePunch.from_bytes, timeout=STREAM_TIMEOUT)
            if sync.type is not PunchType.SYNC:
                raise DecodeError("expected SYNC")
            if await self._dial_all(peer, offer.addrs, initiator=True, punch=True):
                self.punched += 1
        except trio.TooSlowError:
            await stream.reset()
        finally:
            self._answering.discard(peer)

    async def _dial_all(
        self,
        peer: PeerId,
        addrs: Sequence[Multiaddr],
        *,
        initiator: bool,
        punch: bool,
    ) -> bool:
        """Dial every address at once; adopt the first connection, drop the rest."""
        targets = [a for a in addrs if direct_tcp(a)][:MAX_TARGETS]
        winner: RawConnection | None = None

        async def attempt(addr: Multiaddr, nursery: trio.Nursery) -> None:
            nonlocal winner
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    if punch:
                        raw = await self.tcp.dial_from(addr)
                    else:
                        raw = await self.tcp.dial(addr)
            except (OSError, trio.TooSlowError) as exc:
                log.debug("direct dial to %s at %s failed: %s", peer, addr, exc)
                return
            if winner is None:
                winner = raw
                nursery.cancel_scope.cancel()
            else:
                await trio.aclose_forcefully(raw.stream)

        async with trio.open_nursery() as nursery:
            for addr in targets:
                nursery.start_soon(attempt, addr, nursery)
        if winner is None:
            return False
        try:
            await self.host.adopt(winner, peer, initiator=initiator)
        except DIAL_ERRORS as exc:
            log.info("direct connection to %s failed its handshake: %s", peer, exc)
            return False
        return True
