"""Raw transports: TCP on real sockets. The host upgrades what they return."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from ._multiaddr import Multiaddr, MultiaddrError
from ._tcp import TcpStream


@dataclass(frozen=True, slots=True)
class RawConnection:
    """An unauthenticated byte stream and the addresses at its two ends."""

    stream: trio.abc.Stream
    local_addr: Multiaddr
    remote_addr: Multiaddr


RawHandler = Callable[[RawConnection], Awaitable[None]]


class Transport(Protocol):
    """What the host needs from a transport: dial and serve multiaddrs."""

    def handles(self, addr: Multiaddr) -> bool:
        """True if this transport can dial or listen on `addr`."""
        ...

    async def dial(self, addr: Multiaddr) -> RawConnection:
        """Open a raw connection; raises OSError when the remote cannot be reached.

        `addr` ends in /p2p/<peer id> when the host knows whom it is dialing (a circuit
        address needs it: it names the peer the relay should connect us to).
        """
        ...

    async def serve(
        self,
        addr: Multiaddr,
        handler: RawHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `addr`, report the bound addresses, and run `handler` per connection."""
        ...


def _sockaddr_to_multiaddr(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> Multiaddr:
    host, port = sockaddr[0], sockaddr[1]
    family = "ip6" if ":" in host else "ip4"
    return Multiaddr(((family, host.split("%")[0]), ("tcp", str(port))))


def tcp_host_port(addr: Multiaddr) -> tuple[str, int]:
    """(host, port) of /ip4|/ip6|/dns*/…/tcp/… addresses."""
    protocols = addr.without_peer_id().protocols()
    if (
        len(protocols) != 2
        or protocols[1] != "tcp"
        or protocols[0]
        not in (
            "ip4",
            "ip6",
            "dns",
            "dns4",
            "dns6",
        )
    ):
        raise MultiaddrError(f"not a TCP address: {addr}")
    host = addr.parts[0][1]
    port = addr.parts[1][1]
    assert host is not None and port is not None
    return host, int(port)


class TcpTransport:
    """TCP: trio connects and accepts, `TcpStream` carries the bytes (TCP_NODELAY on).

    With `reuseport`, listeners set SO_REUSEPORT so `dial_from` can connect from the
    port we listen on: hole punching needs the NAT mapping of an outgoing connection
    to be the one peers were told to dial. A fixed port another listener holds is
    still refused as "address in use" (a probe bind without SO_REUSEPORT comes first).
    """

    def __init__(self, *, reuseport: bool = False) -> None:
        self.reuseport = reuseport
        self.ports: dict[str, int] = {}
        """A bound port per family ("ip4", "ip6"): where `dial_from` dials from."""

    def handles(self, addr: Multiaddr) -> bool:
        """IP and DNS addresses over TCP."""
        try:
            tcp_host_port(addr)
        except MultiaddrError:
            return False
        return True

    async def dial(self, addr: Multiaddr) -> RawConnection:
        """Connect; the host bounds this with its dial timeout."""
        host, port = tcp_host_port(addr)
        stream = await trio.open_tcp_stream(host, port)
        return _raw(stream)

    async def serve(
        self,
        addr: Multiaddr,
        handler: RawHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, report the real port (for /tcp/0), then accept until cancelled."""
        host, port = tcp_host_port(addr)
        if self.reuseport:
            listeners = [await _reuseport_listener(host, port)]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)
        bound = [_sockaddr_to_multiaddr(listener.socket.getsockname()) for listener in listeners]
        for multiaddr in bound:
            self.ports.setdefault(multiaddr.protocols()[0], int(multiaddr.parts[1][1] or 0))

        async def handle(stream: trio.SocketStream) -> None:
            await handler(_raw(stream))

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started(bound)

    async def dial_from(self, addr: Multiaddr) -> RawConnection:
        """Connect from the port we listen on (needs `reuseport` and a listener of the family).

        Two peers doing this towards each other at once make a TCP simultaneous open,
        which is how a hole is punched through both NATs.
        """
        host, port = tcp_host_port(addr)
        family = addr.protocols()[0]
        local = self.ports.get(family)
        if not self.reuseport or local is None:
            raise OSError(f"no reusable {family} listening port to dial {addr} from")
        sock = trio.socket.socket(socket.AF_INET if family == "ip4" else socket.AF_INET6)
        try:
            _set_reuse(sock)
            await sock.bind(("0.0.0.0" if family == "ip4" else "::", local))
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return _raw(trio.SocketStream(sock))


def _set_reuse(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


async def _reuseport_listener(host: str, port: int) -> trio.SocketListener:
    """One listening socket with SO_REUSEPORT (a literal IP only: no name resolution).

    A fixed port is first bound without SO_REUSEPORT, so a port another listener
    holds (a second peer started by mistake) is still "address in use" rather
    than silently shared.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        probe = trio.socket.socket(family)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await probe.bind((host, port))
        finally:
            probe.close()
    sock = trio.socket.socket(family)
    try:
        _set_reuse(sock)
        await sock.bind((host, port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _raw(stream: trio.SocketStream) -> RawConnection:
    """Take the socket out of trio's SocketStream into our TcpStream."""
    trio_sock = stream.socket
    local = _sockaddr_to_multiaddr(trio_sock.getsockname())
    remote = _sockaddr_to_multiaddr(trio_sock.getpeername())
    sock = socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, trio_sock.detach())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return RawConnection(stream=TcpStream(sock), local_addr=local, remote_addr=remote)
