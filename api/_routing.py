"""Choosing a node for a request: filter by the client's policy, rank, power of two choices.

Pure state and arithmetic (no I/O), so the simulator ranks exactly as the shim does.
A candidate's score is lower for cheaper, faster, idler, nearer and more reliable nodes.
Idleness is live: the shim counts its own requests on each node (`started`/`finished`);
the node's record, seconds old, counts only where it shows more (other shims' requests).
The round-trip time is a real round trip (`measured`), not a time to first token, which is
mostly the node's own work and already in its load and speed. The first pick is the
better of two random candidates from the best few (which spreads load without herding
every shim onto the single best node); the rest follow by score and serve as fail-over.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from dbloom.inference import ModelOffer, NodeRecord
from dbloom.p2p import Multiaddr, PeerId

FAILURE_HALF_LIFE = 60.0
REFUSAL_BAN = 300.0
RTT_SMOOTHING = 0.3
SHORTLIST = 4


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node that announced the model, with its record and where to dial it."""

    peer: PeerId
    record: NodeRecord
    offer: ModelOffer
    addrs: tuple[Multiaddr, ...]


@dataclass(slots=True)
class PeerStats:
    """What this client has observed of one node."""

    rtt: float | None = None
    in_flight: int = 0
    failures: float = 0.0
    failed_at: float = 0.0
    refused_until: float = 0.0


@dataclass(slots=True)
class RoutingPolicy:
    """The client's limits on whom it routes to."""

    allowed_kinds: frozenset[str]
    max_price_in: int | None = None
    max_price_out: int | None = None


@dataclass
class Router:
    """Ranks candidates for one client and remembers how each node behaved."""

    policy: RoutingPolicy
    rng: random.Random = field(default_factory=random.Random)
    stats: dict[PeerId, PeerStats] = field(default_factory=dict)

    def _stats(self, peer: PeerId) -> PeerStats:
        return self.stats.setdefault(peer, PeerStats())

    def why_not(self, candidate: Candidate, now: float) -> str | None:
        """Why the policy excludes `candidate` right now, or None if it is eligible."""
        record, offer = candidate.record, candidate.offer
        if record.draining:
            return "shutting down"
        if record.attest_kind not in self.policy.allowed_kinds:
            return f"{record.attest_kind} attestation is not allowed"
        if self.policy.max_price_in is not None and offer.price_in > self.policy.max_price_in:
            return "input price above --max-price"
        if self.policy.max_price_out is not None and offer.price_out > self.policy.max_price_out:
            return "output price above --max-price"
        if self._stats(candidate.peer).refused_until > now:
            return "its attestation was refused"
        return None

    def failures(self, peer: PeerId, now: float) -> float:
        s = self._stats(peer)
        return float(s.failures * 0.5 ** ((now - s.failed_at) / FAILURE_HALF_LIFE))

    def score(self, candidate: Candidate, now: float, cheapest: int, fastest: float) -> float:
        offer, record = candidate.offer, candidate.record
        price = offer.price_out + offer.price_in // 4
        price_term = price / cheapest if cheapest else (1.0 if price == 0 else 2.0)
        speed_term = fastest / offer.decode_tps if offer.decode_tps > 0 else 2.0
        stats = self._stats(candidate.peer)
        load = max(stats.in_flight, record.active + record.queued)
        load_term = load / max(record.max_batch, 1)
        rtt = stats.rtt
        rtt_term = 0.0 if rtt is None else rtt * 20
        return (
            price_term
            + speed_term
            + 2 * load_term
            + rtt_term
            + 3 * self.failures(candidate.peer, now)
        )

    def order(self, candidates: Sequence[Candidate], now: float) -> list[Candidate]:
        """Eligible candidates, best first: a power-of-two-choices pick, then by score."""
        eligible = [c for c in candidates if self.why_not(c, now) is None]
        if not eligible:
            return []
        priced = [c.offer.price_out + c.offer.price_in // 4 for c in eligible]
        cheapest = min(priced)
        fastest = max(c.offer.decode_tps for c in eligible)
        scores = {c.peer: self.score(c, now, cheapest, fastest) for c in eligible}
        ranked = sorted(eligible, key=lambda c: scores[c.peer])
        shortlist = ranked[:SHORTLIST]
        if len(shortlist) >= 2:
            a, b = self.rng.sample(shortlist, 2)  # in random order, so ties go either way
            first = b if scores[b.peer] < scores[a.peer] else a
            ranked.remove(first)
            ranked.insert(0, first)
        return ranked

    def in_flight(self, peer: PeerId) -> int:
        """This client's requests assigned to `peer` and not finished yet."""
        return self._stats(peer).in_flight

    def started(self, peer: PeerId) -> None:
        """A request was assigned to `peer` (it may still wait for a stream there)."""
        self._stats(peer).in_flight += 1

    def finished(self, peer: PeerId) -> None:
        """A request `started` on `peer` is over, whichever way it ended."""
        self._stats(peer).in_flight -= 1

    def measured(self, peer: PeerId, rtt: float) -> None:
        """A round trip to `peer` (a transport ping) took `rtt` seconds."""
        s = self._stats(peer)
        s.rtt = rtt if s.rtt is None else (1 - RTT_SMOOTHING) * s.rtt + RTT_SMOOTHING * rtt

    def failed(self, peer: PeerId, now: float) -> None:
        s = self._stats(peer)
        s.failures = self.failures(peer, now) + 1
        s.failed_at = now

    def refused(self, peer: PeerId, now: float) -> None:
        """Its attestation was refused: skip it for a while without asking again."""
        self._stats(peer).refused_until = now + REFUSAL_BAN
