"""Dialing `/…/p2p/<relay>/p2p-circuit/p2p/<target>`: a hop CONNECT as a raw connection.

The host upgrades the hop stream exactly as it upgrades TCP (multistream, Noise XX,
yamux), so the Noise session runs end to end between us and the target and the
relay sees only ciphertext.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

from .._errors import ErrorCode, ProtocolError
from .._multiaddr import Multiaddr, MultiaddrError
from .._streams import PrefixedStream
from .._transport import RawConnection, RawHandler
from ._framing import read_message, write_message
from ._messages import HOP, HopMessage, HopType, Peer, Status

if TYPE_CHECKING:
    from .._host import Host
    from .._identity import PeerId

CIRCUIT: Final = "p2p-circuit"
HOP_TIMEOUT: Final = 10.0


class RelayRefused(ProtocolError):
    """A relay answered a hop or stop request with a status other than OK."""

    def __init__(self, status: Status, what: str) -> None:
        super().__init__(f"relay refused {what}: {status.name}", ErrorCode.UNSUPPORTED)
        self.status = status


def split_circuit(addr: Multiaddr) -> tuple[Multiaddr, PeerId | None]:
    """(the relay's address ending in /p2p/<relay>, the target) of a circuit address."""
    protocols = addr.protocols()
    if protocols.count(CIRCUIT) != 1:
        raise MultiaddrError(f"not a single-hop circuit address: {addr}")
    at = protocols.index(CIRCUIT)
    relay = Multiaddr(addr.parts[:at]) if at else None
    if relay is None or relay.peer_id is None:
        raise MultiaddrError(f"circuit address does not name its relay: {addr}")
    tail = addr.parts[at + 1 :]
    if len(tail) > 1 or (tail and tail[0][0] != "p2p"):
        raise MultiaddrError(f"circuit address must end in /p2p-circuit[/p2p/<peer>]: {addr}")
    return relay, Multiaddr(tail).peer_id if tail else None


def circuit_addr(relay: Multiaddr) -> Multiaddr:
    """`relay` (ending in /p2p/<relay>) followed by /p2p-circuit."""
    return Multiaddr((*relay.parts, (CIRCUIT, None)))


class CircuitTransport:
    """Dials circuit addresses through the host's own connection to the relay."""

    def __init__(self, host: Host) -> None:
        self._host = host

    def handles(self, addr: Multiaddr) -> bool:
        """Addresses with one /p2p-circuit."""
        return addr.protocols().count(CIRCUIT) == 1

    async def dial(self, addr: Multiaddr) -> RawConnection:
        """Connect to the relay if needed and ask it (hop CONNECT) for a circuit."""
        relay_addr, target = split_circuit(addr)
        if target is None:
            raise MultiaddrError(f"circuit address does not name its target: {addr}")
        relay = relay_addr.peer_id
        assert relay is not None
        bare = relay_addr.without_peer_id()
        conn = await self._host.connect(relay if bare == relay_addr else relay_addr)
        if conn.relayed:
            raise RelayRefused(Status.PERMISSION_DENIED, "a circuit over a circuit")
        stream = await conn.new_stream([HOP], timeout=HOP_TIMEOUT)
        try:
            request = HopMessage(type=HopType.CONNECT, peer=Peer(target))
            await write_message(stream, request, timeout=HOP_TIMEOUT)
            reply, rest = await read_message(stream, HopMessage.from_bytes, timeout=HOP_TIMEOUT)
            if reply.type is not HopType.STATUS or reply.status is not Status.OK:
                raise RelayRefused(reply.status or Status.UNUSED, f"a circuit to {target}")
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.reset()
            raise
        local = circuit_addr(conn.remote_addr.with_peer_id(relay))
        return RawConnection(
            stream=PrefixedStream(stream, rest) if rest else stream,
            local_addr=local,
            remote_addr=local,
        )

    async def serve(
        self,
        addr: Multiaddr,
        handler: RawHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Circuits are not listened on: a RelayClient reservation makes us reachable."""
        raise MultiaddrError(f"cannot listen on {addr}: reserve a slot on a relay instead")
