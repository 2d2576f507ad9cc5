"""Peer scoring (gossipsub v1.1): what each peer's behaviour has earned it, locally.

We compute four of the spec's terms, the same parameters for every topic:
P₁ time in mesh and P₂ first message deliveries (rewards, so a good mesh peer
is kept when pruning by score), P₄ invalid messages (counter squared: a peer
sending forgeries or messages the validator rejects sinks fast), and P₇
behaviour penalties (counter squared: GRAFT during backoff, broken IWANT
promises, malformed RPCs). Counters decay at each heartbeat, and a score
outlives a disconnect by `retain_score`, so reconnecting does not wash it.
The mesh-delivery terms (P₃, P₃b), application score (P₅) and IP colocation
(P₆) are not computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._identity import PeerId


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreParams:
    """Weights, caps and decays (per heartbeat) of the terms we compute."""

    topic_weight: float = 1.0
    topic_score_cap: float = 25.0  # positive total over all topics
    time_in_mesh_weight: float = 0.01
    time_in_mesh_quantum: float = 1.0
    time_in_mesh_cap: float = 300.0
    first_message_deliveries_weight: float = 1.0
    first_message_deliveries_decay: float = 0.9
    first_message_deliveries_cap: float = 20.0
    invalid_message_deliveries_weight: float = -10.0
    invalid_message_deliveries_decay: float = 0.99
    behaviour_penalty_weight: float = -1.0
    behaviour_penalty_decay: float = 0.99
    decay_to_zero: float = 0.01
    retain_score: float = 120.0

    def __post_init__(self) -> None:
        if self.invalid_message_deliveries_weight > 0 or self.behaviour_penalty_weight > 0:
            raise ValueError("penalty weights must not be positive")
        decays = (
            self.first_message_deliveries_decay,
            self.invalid_message_deliveries_decay,
            self.behaviour_penalty_decay,
        )
        if not all(0 < d < 1 for d in decays):
            raise ValueError("decay factors must lie in (0, 1)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreThresholds:
    """Below `gossip`: no IHAVE/IWANT either way; below `publish`: not flood-published to;
    below `graylist`: every RPC ignored. Below 0 a peer is pruned and never grafted."""

    gossip: float = -10.0
    publish: float = -50.0
    graylist: float = -80.0

    def __post_init__(self) -> None:
        if not self.graylist < self.publish <= self.gossip < 0:
            raise ValueError("need graylist < publish <= gossip < 0")


@dataclass(slots=True)
class _TopicStats:
    mesh_since: float | None = None
    first_deliveries: float = 0.0
    invalid_deliveries: float = 0.0


@dataclass(slots=True)
class _PeerStats:
    connected: bool = True
    forget_at: float = 0.0
    behaviour_penalty: float = 0.0
    topics: dict[str, _TopicStats] = field(default_factory=dict)

    def topic(self, topic: str) -> _TopicStats:
        stats = self.topics.get(topic)
        if stats is None:
            stats = self.topics[topic] = _TopicStats()
        return stats


class PeerScore:
    """Scores of connected peers and of recently disconnected ones."""

    def __init__(self, params: ScoreParams) -> None:
        self.params = params
        self._peers: dict[PeerId, _PeerStats] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def connect(self, peer: PeerId) -> None:
        """Start (or resume, if retained) scoring `peer`."""
        stats = self._peers.get(peer)
        if stats is None:
            self._peers[peer] = _PeerStats()
        else:
            stats.connected = True

    def disconnect(self, peer: PeerId, now: float) -> None:
        """Keep the score for `retain_score` seconds; time in mesh stops counting."""
        stats = self._peers.get(peer)
        if stats is not None:
            stats.connected = False
            stats.forget_at = now + self.params.retain_score
            for topic in stats.topics.values():
                topic.mesh_since = None

    def graft(self, peer: PeerId, topic: str, now: float) -> None:
        """`peer` entered our mesh for `topic`."""
        stats = self._peers.get(peer)
        if stats is not None:
            stats.topic(topic).mesh_since = now

    def prune(self, peer: PeerId, topic: str) -> None:
        """`peer` left our mesh for `topic`."""
        stats = self._peers.get(peer)
        if stats is not None and topic in stats.topics:
            stats.topics[topic].mesh_since = None

    def first_delivery(self, peer: PeerId, topic: str) -> None:
        """`peer` was first to bring us a valid message (P₂)."""
        stats = self._peers.get(peer)
        if stats is not None:
            t = stats.topic(topic)
            cap = self.params.first_message_deliveries_cap
            t.first_deliveries = min(cap, t.first_deliveries + 1)

    def invalid_message(self, peer: PeerId, topic: str) -> None:
        """`peer` sent a message that failed its signature or its validator (P₄)."""
        stats = self._peers.get(peer)
        if stats is not None:
            stats.topic(topic).invalid_deliveries += 1

    def penalize(self, peer: PeerId, count: float = 1.0) -> None:
        """`peer` misbehaved at the protocol level (P₇)."""
        stats = self._peers.get(peer)
        if stats is not None:
            stats.behaviour_penalty += count

    def score(self, peer: PeerId, now: float) -> float:
        """The current score; 0 for a peer we know nothing about."""
        stats = self._peers.get(peer)
        if stats is None:
            return 0.0
        p = self.params
        topics = 0.0
        for t in stats.topics.values():
            in_mesh = 0.0
            if t.mesh_since is not None:
                in_mesh = min(p.time_in_mesh_cap, (now - t.mesh_since) / p.time_in_mesh_quantum)
            topics += p.topic_weight * (
                p.time_in_mesh_weight * in_mesh
                + p.first_message_deliveries_weight * t.first_deliveries
                + p.invalid_message_deliveries_weight * t.invalid_deliveries**2
            )
        score = min(topics, p.topic_score_cap)
        return score + p.behaviour_penalty_weight * stats.behaviour_penalty**2

    def decay(self, now: float) -> None:
        """One decay step (each heartbeat); forget disconnected peers whose time is up."""
        p = self.params
        zero = p.decay_to_zero
        for peer, stats in list(self._peers.items()):
            if not stats.connected and now >= stats.forget_at:
                del self._peers[peer]
                continue
            stats.behaviour_penalty = _decayed(
                stats.behaviour_penalty, p.behaviour_penalty_decay, zero
            )
            for t in stats.topics.values():
                t.first_deliveries = _decayed(
                    t.first_deliveries, p.first_message_deliveries_decay, zero
                )
                t.invalid_deliveries = _decayed(
                    t.invalid_deliveries, p.invalid_message_deliveries_decay, zero
                )


def _decayed(value: float, factor: float, zero: float) -> float:
    value *= factor
    return value if value >= zero else 0.0
