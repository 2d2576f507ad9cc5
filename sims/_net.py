"""The simulator's network: who is online, how far apart, which connections are warm.

Messages are the protocol cores' own message objects, handed from one peer to the
other after the latency a real connection would add. Ten thousand real hosts with
their sockets, Noise sessions and yamux streams would need tens of gigabytes (see
`bench/dht.py`), so the simulator keeps only what shapes timing: the round trip
between two regions, the transfer time of each message's wire size at the link's
bandwidth, and whether a connection is already open (an RPC on a warm connection
costs one round trip; a cold one three, as the real TCP + multistream + Noise XX
upgrade does, measured in `bench/dht.py`). No byte is encrypted: the run says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

COLD_EXTRA_RTTS = 2.0
"""Round trips a fresh connection costs before its first request (dial + handshake)."""


@dataclass(slots=True)
class Endpoint:
    """What the network knows of one participant (peer or client)."""

    index: int
    region: str
    online: bool = True
    behind_nat: bool = False
    session: int = 0
    conns: set[int] = field(default_factory=set)


class SimNetwork:
    """Latency, bandwidth and connection state between endpoints; no I/O, no clock."""

    def __init__(
        self,
        rtt_ms: Mapping[tuple[str, str], float],
        *,
        bandwidth_mbit: float,
        relay_rtt_ms: float,
    ) -> None:
        self._rtt = {pair: ms / 1000.0 for pair, ms in rtt_ms.items()}
        self._bytes_per_s = bandwidth_mbit * 1e6 / 8
        self._relay = relay_rtt_ms / 1000.0
        self.endpoints: list[Endpoint] = []
        self.connects = 0

    def add(self, region: str, *, behind_nat: bool = False) -> Endpoint:
        """A new endpoint, online, with no connections."""
        endpoint = Endpoint(len(self.endpoints), region, behind_nat=behind_nat)
        self.endpoints.append(endpoint)
        return endpoint

    def rtt(self, a: Endpoint, b: Endpoint) -> float:
        """Round-trip seconds between two endpoints; a NATed end adds the relay detour."""
        pair = (a.region, b.region) if a.region <= b.region else (b.region, a.region)
        extra = self._relay if (a.behind_nat or b.behind_nat) else 0.0
        return self._rtt[pair] + extra

    def transfer(self, size: int) -> float:
        """Seconds to push `size` bytes through the slower end's link."""
        return size / self._bytes_per_s

    def connected(self, a: Endpoint, b: Endpoint) -> bool:
        return b.index in a.conns

    def connect(self, a: Endpoint, b: Endpoint) -> None:
        if b.index not in a.conns:
            self.connects += 1
        a.conns.add(b.index)
        b.conns.add(a.index)

    def go_offline(self, a: Endpoint) -> None:
        """The endpoint vanishes: every connection it had is gone at both ends."""
        a.online = False
        for other in a.conns:
            self.endpoints[other].conns.discard(a.index)
        a.conns.clear()

    def go_online(self, a: Endpoint) -> None:
        """The endpoint is back, as a new session: nothing sent to its last one arrives."""
        a.online = True
        a.session += 1
