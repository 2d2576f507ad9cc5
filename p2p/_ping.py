"""`/ipfs/ping/1.0.0`: 32 random bytes echoed back, for liveness and round-trip time."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

import trio

from ._errors import RemoteProtocolError
from ._streams import receive_exactly

if TYPE_CHECKING:
    from ._host import Host, NetStream
    from ._identity import PeerId
    from ._multiaddr import Multiaddr

PING: Final = "/ipfs/ping/1.0.0"
PING_SIZE: Final = 32
PING_IDLE_TIMEOUT: Final = 60.0


async def _serve_ping(stream: NetStream) -> None:
    """Echo 32-byte payloads until the dialer half-closes (or goes quiet for a minute)."""
    while True:
        with trio.move_on_after(PING_IDLE_TIMEOUT):
            try:
                payload = await receive_exactly(stream, PING_SIZE)
            except EOFError:
                return
            await stream.send_all(payload)
            continue
        return


def register_ping(host: Host) -> None:
    """Answer pings on `host`."""
    host.set_stream_handler(PING, _serve_ping)


async def ping(
    host: Host, peer: PeerId | Multiaddr | str, *, count: int = 1, timeout: float = 10.0
) -> list[float]:
    """Round-trip times in seconds, one per ping, over a single stream."""
    stream = await host.new_stream(peer, [PING], timeout=timeout)
    rtts: list[float] = []
    try:
        for _ in range(count):
            payload = os.urandom(PING_SIZE)
            with trio.fail_after(timeout):
                start = trio.current_time()
                await stream.send_all(payload)
                echoed = await receive_exactly(stream, PING_SIZE)
                rtts.append(trio.current_time() - start)
            if echoed != payload:
                raise RemoteProtocolError("ping answer does not match what was sent")
        await stream.send_eof()
    finally:
        await stream.aclose()
    return rtts
