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
        """Open a raw connection; raises OSError when the remote cannot be reached."""
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
    """TCP: trio connects and accepts, `TcpStream` carries the bytes (TCP_NODELAY on)."""

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
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = [_sockaddr_to_multiaddr(listener.socket.getsockname()) for listener in listeners]

        async def handle(stream: trio.SocketStream) -> None:
            await handler(_raw(stream))

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started(bound)


def _raw(stream: trio.SocketStream) -> RawConnection:
    """Take the socket out of trio's SocketStream into our TcpStream."""
    trio_sock = stream.socket
    local = _sockaddr_to_multiaddr(trio_sock.getsockname())
    remote = _sockaddr_to_multiaddr(trio_sock.getpeername())
    sock = socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, trio_sock.detach())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return RawConnection(stream=TcpStream(sock), local_addr=local, remote_addr=remote)
