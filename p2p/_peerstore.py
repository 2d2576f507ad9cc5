"""What we know about other peers: addresses with expiry, keys, protocols, agent.

Sans-IO: every call that cares about time takes `now`. Bounded: past `max_peers`
the peers whose addresses expire soonest are forgotten first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._identity import PeerId, PublicKey
from ._multiaddr import Multiaddr

DEFAULT_MAX_PEERS = 50_000
DEFAULT_MAX_ADDRS_PER_PEER = 16
PERMANENT = float("inf")


@dataclass(slots=True)
class PeerInfo:
    """Everything recorded about one peer."""

    addrs: dict[Multiaddr, float] = field(default_factory=dict)  # address -> expires at
    public_key: PublicKey | None = None
    protocols: tuple[str, ...] = ()
    agent: str | None = None

    def latest_expiry(self) -> float:
        return max(self.addrs.values(), default=0.0)


class PeerStore:
    """Addresses (with TTL) and identify facts per peer."""

    def __init__(
        self,
        *,
        max_peers: int = DEFAULT_MAX_PEERS,
        max_addrs_per_peer: int = DEFAULT_MAX_ADDRS_PER_PEER,
    ) -> None:
        self.max_peers = max_peers
        self.max_addrs_per_peer = max_addrs_per_peer
        self._peers: dict[PeerId, PeerInfo] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer: PeerId) -> bool:
        return peer in self._peers

    def info(self, peer: PeerId) -> PeerInfo | None:
        """The record for `peer`, if any."""
        return self._peers.get(peer)

    def _entry(self, peer: PeerId) -> PeerInfo:
        entry = self._peers.get(peer)
        if entry is None:
            if len(self._peers) >= self.max_peers:
                self._evict_one()
            entry = self._peers[peer] = PeerInfo()
        return entry

    def _evict_one(self) -> None:
        victim = min(self._peers, key=lambda p: self._peers[p].latest_expiry())
        del self._peers[victim]

    def add_addrs(self, peer: PeerId, addrs: list[Multiaddr], ttl: float, now: float) -> None:
        """Remember addresses until now + ttl (extending, never shortening, an expiry)."""
        entry = self._entry(peer)
        expires = now + ttl
        for addr in addrs:
            bare = addr.without_peer_id()
            if entry.addrs.get(bare, 0.0) < expires:
                entry.addrs[bare] = expires
        if len(entry.addrs) > self.max_addrs_per_peer:
            keep = sorted(entry.addrs.items(), key=lambda item: -item[1])
            entry.addrs = dict(keep[: self.max_addrs_per_peer])

    def addrs(self, peer: PeerId, now: float) -> list[Multiaddr]:
        """Unexpired addresses, freshest first."""
        entry = self._peers.get(peer)
        if entry is None:
            return []
        live = [(expiry, addr) for addr, expiry in entry.addrs.items() if expiry > now]
        return [addr for _, addr in sorted(live, key=lambda item: -item[0])]

    def set_public_key(self, peer: PeerId, key: PublicKey) -> None:
        """Record a key proven by a handshake."""
        self._entry(peer).public_key = key

    def set_identify(self, peer: PeerId, *, protocols: list[str], agent: str | None) -> None:
        """Record what identify told us."""
        entry = self._entry(peer)
        entry.protocols = tuple(protocols)
        entry.agent = agent

    def protocols(self, peer: PeerId) -> tuple[str, ...]:
        """Protocols the peer said it speaks."""
        entry = self._peers.get(peer)
        return entry.protocols if entry else ()

    def prune(self, now: float) -> int:
        """Drop expired addresses and peers left with nothing; returns peers dropped."""
        dropped = 0
        for peer in list(self._peers):
            entry = self._peers[peer]
            entry.addrs = {a: e for a, e in entry.addrs.items() if e > now}
            if not entry.addrs and entry.public_key is None:
                del self._peers[peer]
                dropped += 1
        return dropped
