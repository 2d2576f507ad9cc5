"""Gossipsub settings: the spec's parameters with its defaults, plus the service's I/O limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._rpc import RpcLimits
from ._score import ScoreParams, ScoreThresholds


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipConfig:
    """The router reads the protocol parameters; the trio service also the I/O ones.

    Mesh degrees and gossip follow gossipsub v1.0/v1.1 (D=6, D_lo=4, D_hi=12,
    D_lazy=6, D_score=4, D_out=2, 1 s heartbeat, 5 history and 3 gossip windows,
    2 minute seen cache); the IHAVE/IWANT limits are go-libp2p-pubsub's.
    """

    d: int = 6
    d_lo: int = 4
    d_hi: int = 12
    d_lazy: int = 6
    d_score: int = 4
    d_out: int = 2
    heartbeat_interval: float = 1.0
    fanout_ttl: float = 60.0
    mcache_len: int = 5
    mcache_gossip: int = 3
    seen_ttl: float = 120.0
    gossip_factor: float = 0.25
    gossip_retransmission: int = 3  # IWANT answers per message per peer
    max_ihave_length: int = 5000  # ids we ask for per peer per heartbeat
    max_ihave_messages: int = 10  # IHAVEs we heed per peer per heartbeat
    iwant_followup_time: float = 3.0  # an IHAVE we answered must deliver within this
    prune_backoff: float = 60.0
    unsubscribe_backoff: float = 10.0
    max_backoff: float = 3600.0  # longest backoff we accept from a PRUNE
    flood_publish: bool = True
    max_topics_per_peer: int = 1024
    limits: RpcLimits = field(default_factory=RpcLimits)
    score: ScoreParams = field(default_factory=ScoreParams)
    thresholds: ScoreThresholds = field(default_factory=ScoreThresholds)
    # the trio service
    write_timeout: float = 10.0
    open_timeout: float = 10.0
    subscription_backlog: int = 1024  # messages held for a slow subscriber
    max_queued_bytes: int = 8 << 20  # unsent RPC bytes per peer before we drop

    def __post_init__(self) -> None:
        if not 0 < self.d_lo <= self.d <= self.d_hi:
            raise ValueError("need 0 < d_lo <= d <= d_hi")
        if not 0 <= self.d_out < self.d_lo or self.d_out > self.d // 2:
            raise ValueError("need d_out < d_lo and d_out <= d / 2")
        if not 0 <= self.d_score <= self.d:
            raise ValueError("need 0 <= d_score <= d")
        if not 0 < self.mcache_gossip <= self.mcache_len:
            raise ValueError("need 0 < mcache_gossip <= mcache_len")
        if self.heartbeat_interval <= 0 or self.subscription_backlog < 0:
            raise ValueError("heartbeat interval must be positive, backlog non-negative")
