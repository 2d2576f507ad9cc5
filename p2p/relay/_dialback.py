"""AutoNAT v1 over trio: ask peers to dial us back, and dial back those who ask us.

A server dials only the IP address it sees the asker's connection come from (with the
ports the asker names), so it can never be used to make us connect to a third party.
It dials on a fresh connection (`Host.dial_back`), which an already open connection
cannot fake, and refuses askers that come through a relay or ask while it is busy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

from .._errors import DecodeError
from .._host import DIAL_ERRORS
from .._multiaddr import Multiaddr
from .._transport import tcp_host_port
from ._autonat import AUTONAT, DialRequest, DialResponse, DialStatus, decode_autonat
from ._framing import read_message, write_message

if TYPE_CHECKING:
    from .._host import Host, NetStream
    from .._identity import PeerId

log = logging.getLogger("dbloom.p2p.relay")

DIALBACK_TIMEOUT: Final = 5.0
PROBE_TIMEOUT: Final = 20.0
MAX_DIALS: Final = 4
DEFAULT_MAX_CONCURRENT: Final = 8


class AutoNatService:
    """Answers `/libp2p/autonat/1.0.0` on `host`: at most `max_concurrent` checks at once."""

    def __init__(self, host: Host, *, max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
        self.host = host
        self.max_concurrent = max_concurrent
        self._checking: set[PeerId] = set()
        host.set_stream_handler(AUTONAT, self._handle)

    async def _handle(self, stream: NetStream) -> None:
        try:
            response = await self._check(stream)
            await write_message(stream, response, timeout=DIALBACK_TIMEOUT)
        except trio.TooSlowError:
            await stream.reset()

    async def _check(self, stream: NetStream) -> DialResponse:
        peer = stream.peer_id
        conn = stream.connection
        try:
            request, _ = await read_message(stream, decode_autonat, timeout=DIALBACK_TIMEOUT)
        except DecodeError as exc:
            return DialResponse(DialStatus.E_BAD_REQUEST, str(exc))
        if not isinstance(request, DialRequest) or request.peer != peer:
            return DialResponse(DialStatus.E_BAD_REQUEST, "expected a dial request for the asker")
        if conn.relayed:
            return DialResponse(DialStatus.E_DIAL_REFUSED, "asked through a relay")
        if peer in self._checking or len(self._checking) >= self.max_concurrent:
            return DialResponse(DialStatus.E_DIAL_REFUSED, "busy")
        candidates = dial_candidates(conn.remote_addr, request.addrs)
        if not candidates:
            return DialResponse(DialStatus.E_DIAL_REFUSED, "no address at the observed IP")
        self._checking.add(peer)
        try:
            for addr in candidates:
                try:
                    with trio.fail_after(DIALBACK_TIMEOUT):
                        await self.host.dial_back(peer, addr)
                except DIAL_ERRORS as exc:
                    log.debug("dial-back to %s at %s failed: %s", peer, addr, exc)
                    continue
                return DialResponse(DialStatus.OK, addr=addr)
        finally:
            self._checking.discard(peer)
        return DialResponse(DialStatus.E_DIAL_ERROR, "no address answered")


def dial_candidates(observed: Multiaddr, addrs: tuple[Multiaddr, ...]) -> list[Multiaddr]:
    """The asker's TCP ports at the IP we see it at (one IP only: no third parties)."""
    for family in ("ip4", "ip6"):
        ip = observed.value_for(family)
        if ip is not None:
            break
    else:
        return []
    out: list[Multiaddr] = []
    for addr in addrs:
        bare = addr.without_peer_id()
        try:
            _, port = tcp_host_port(bare)
        except DecodeError:
            continue
        if bare.protocols()[0] != family or port == 0:
            continue
        candidate = Multiaddr(((family, ip), ("tcp", str(port))))
        if candidate not in out:
            out.append(candidate)
    return out[:MAX_DIALS]


async def probe(host: Host, server: PeerId, *, timeout: float = PROBE_TIMEOUT) -> DialResponse:
    """Ask `server` to dial us back at our bound addresses; its answer."""
    addrs = tuple(a.without_peer_id() for a in host.listen_addrs)
    with trio.fail_after(timeout):
        stream = await host.new_stream(server, [AUTONAT], timeout=timeout)
        try:
            await write_message(stream, DialRequest(host.peer_id, addrs), timeout=timeout)
            response, _ = await read_message(stream, decode_autonat, timeout=timeout)
        finally:
            await stream.aclose()
    if not isinstance(response, DialResponse):
        raise DecodeError("autonat server answered with a request")
    return response
