"""The gossipsub v1.1 router as a sans-IO state machine.

Inputs are peers coming and going, decoded RPCs, local publishes and heartbeat
ticks, each with `now`; outputs are RPCs to send (`take_outgoing`) and messages
for local subscribers (`take_delivered`). No trio, no clock, no sockets: given
the same inputs and a seeded RNG it makes the same choices, so the whole
protocol can be tested and simulated by feeding it.

Messages follow `StrictSign`: each is checked (author, key, signature) once,
after the cheap dedup by id, then by the topic's validator. A forged copy is
not remembered as seen, so it cannot shadow the real message behind it.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from .._errors import LocalProtocolError
from .._identity import KeyPair, PeerId
from ._caches import MessageCache, SeenCache
from ._config import GossipConfig
from ._outbox import Outbox
from ._rpc import RPC, Control, Graft, IHave, IWant, Message, Prune, SubOpts
from ._score import PeerScore
from ._signing import MessageRejected, sign_message, verify_message

log = logging.getLogger("dbloom.p2p.gossip")

T = TypeVar("T")
_RPC_HEADROOM = 64  # an RPC frame around a lone message: tags, lengths, nothing else


class ValidationResult(enum.Enum):
    """A topic validator's verdict (gossipsub v1.1 extended validators)."""

    ACCEPT = "accept"  # deliver and forward
    REJECT = "reject"  # drop, and penalise the peer that sent it (P₄)
    IGNORE = "ignore"  # drop quietly: neither delivered, forwarded nor penalised


Validator = Callable[[PeerId, Message], ValidationResult]
"""Judges a correctly signed message: called with the peer it came from and the message."""


@dataclass(slots=True)
class RouterStats:
    """Counters since start, for `stats()`, tests and benchmarks."""

    published: int = 0
    delivered: int = 0  # to local subscribers, own messages included
    duplicates: int = 0
    rejected: int = 0  # bad signature, or refused by a validator
    ignored: int = 0  # validator IGNORE, unjoined topic, our own replayed
    graylisted_rpcs: int = 0
    malformed_rpcs: int = 0
    iwant_served: int = 0
    broken_promises: int = 0


@dataclass(slots=True)
class _Peer:
    outbound: bool
    topics: set[str] = field(default_factory=set)
    ihaves: int = 0  # IHAVEs heeded since the last heartbeat
    asked: int = 0  # message ids asked for since the last heartbeat


class GossipRouter:
    """One node's gossipsub state: peers, meshes, fanout, caches, scores."""

    def __init__(
        self,
        identity: KeyPair,
        config: GossipConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config or GossipConfig()
        self.rng = rng or random.Random()
        self.stats = RouterStats()
        self.scores = PeerScore(self.config.score)
        self._seqno = self.rng.getrandbits(63)  # random start: a restart cannot reuse ids
        self._peers: dict[PeerId, _Peer] = {}
        self._topic_peers: dict[str, set[PeerId]] = {}
        self._mesh: dict[str, set[PeerId]] = {}  # its keys are the topics we joined
        self._fanout: dict[str, set[PeerId]] = {}
        self._last_publish: dict[str, float] = {}
        self._backoff: dict[tuple[str, PeerId], float] = {}
        self._validators: dict[str, Validator] = {}
        self._seen = SeenCache(self.config.seen_ttl)
        self._mcache = MessageCache(self.config.mcache_len, self.config.mcache_gossip)
        self._promises: dict[bytes, dict[PeerId, float]] = {}  # IWANTed id -> peer -> due
        self._outbox = Outbox(self.config.limits)
        self._delivered: list[Message] = []

    # ---- what the router knows -------------------------------------------------------

    @property
    def peers(self) -> list[PeerId]:
        """Peers speaking gossipsub with us."""
        return list(self._peers)

    @property
    def topics(self) -> list[str]:
        """Topics we joined."""
        return list(self._mesh)

    def mesh_peers(self, topic: str) -> set[PeerId]:
        """Our mesh for `topic` (empty unless joined)."""
        return set(self._mesh.get(topic, ()))

    def fanout_peers(self, topic: str) -> set[PeerId]:
        """Where we publish on `topic` without joining it (when not flood-publishing)."""
        return set(self._fanout.get(topic, ()))

    def topic_peers(self, topic: str) -> set[PeerId]:
        """Peers that told us they subscribe to `topic`."""
        return set(self._topic_peers.get(topic, ()))

    def score(self, peer: PeerId, now: float) -> float:
        """`peer`'s score as we see it."""
        return self.scores.score(peer, now)

    def set_validator(self, topic: str, validator: Validator | None) -> None:
        """Judge every new message on `topic` with `validator` (None: accept all)."""
        if validator is None:
            self._validators.pop(topic, None)
        else:
            self._validators[topic] = validator

    # ---- outputs ---------------------------------------------------------------------

    def take_outgoing(self) -> list[tuple[PeerId, RPC]]:
        """RPCs to send, at most a few per peer (control piggybacks on messages)."""
        return self._outbox.take()

    def take_delivered(self) -> list[Message]:
        """Messages for local subscribers, in arrival order."""
        delivered, self._delivered = self._delivered, []
        return delivered

    # ---- peers -----------------------------------------------------------------------

    def peer_connected(self, peer: PeerId, *, outbound: bool, now: float) -> None:
        """A peer speaks gossipsub with us; it hears our subscriptions at once."""
        if peer in self._peers or peer == self.peer_id:
            return
        self._peers[peer] = _Peer(outbound=outbound)
        self.scores.connect(peer)
        for topic in self._mesh:
            self._outbox.subscription(peer, SubOpts(True, topic))

    def peer_disconnected(self, peer: PeerId, now: float) -> None:
        """A peer left; its score is kept for a while (`ScoreParams.retain_score`)."""
        state = self._peers.pop(peer, None)
        if state is None:
            return
        for topic in state.topics:
            self._forget_topic_peer(topic, peer)
        for mesh in self._mesh.values():
            mesh.discard(peer)
        self.scores.disconnect(peer, now)
        self._outbox.drop(peer)

    def _forget_topic_peer(self, topic: str, peer: PeerId) -> None:
        members = self._topic_peers.get(topic)
        if members is not None:
            members.discard(peer)
            if not members:
                del self._topic_peers[topic]
        if peer in self._mesh.get(topic, ()):
            self._mesh[topic].discard(peer)
            self.scores.prune(peer, topic)
        fanout = self._fanout.get(topic)
        if fanout is not None:
            fanout.discard(peer)

    # ---- topics ----------------------------------------------------------------------

    def join(self, topic: str, now: float) -> None:
        """Subscribe: announce it and build a mesh, fanout peers first (JOIN)."""
        if topic in self._mesh:
            return
        for peer in self._peers:
            self._outbox.subscription(peer, SubOpts(True, topic))
        mesh: set[PeerId] = set()
        self._mesh[topic] = mesh
        fanout = self._fanout.pop(topic, set())
        self._last_publish.pop(topic, None)
        ready = [p for p in sorted(fanout) if self._graftable(topic, p, now)]
        chosen = ready[: self.config.d]
        if len(chosen) < self.config.d:
            others = self._candidates(topic, now, exclude=set(chosen))
            chosen += self._sample(others, self.config.d - len(chosen))
        for peer in chosen:
            self._graft(peer, topic, now)

    def leave(self, topic: str, now: float) -> None:
        """Unsubscribe: announce it and prune the mesh with the short backoff (LEAVE)."""
        mesh = self._mesh.pop(topic, None)
        if mesh is None:
            return
        for peer in self._peers:
            self._outbox.subscription(peer, SubOpts(False, topic))
        for peer in sorted(mesh):
            self._prune(peer, topic, now, self.config.unsubscribe_backoff)

    # ---- publishing ------------------------------------------------------------------

    def publish(self, topic: str, data: bytes, now: float) -> Message:
        """Sign and send our own message; delivered locally too if we joined `topic`.

        With flood publishing (v1.1) it goes to every peer in the topic whose score
        is above the publish threshold, otherwise to the mesh or the fanout.
        """
        self._seqno = (self._seqno + 1) % (1 << 64)
        message = sign_message(self.identity, topic, data, self._seqno)
        if len(message.raw) + _RPC_HEADROOM > self.config.limits.max_size:
            raise LocalProtocolError(
                f"message of {len(message.raw)} bytes exceeds the RPC limit "
                f"of {self.config.limits.max_size}"
            )
        message_id = message.id
        self._seen.add(message_id, now)
        self._mcache.put(message_id, message)
        self.stats.published += 1
        if topic in self._mesh:
            self._deliver(message)
        for peer in self._publish_targets(topic, now):
            self._outbox.message(peer, message)
        return message

    def _publish_targets(self, topic: str, now: float) -> list[PeerId]:
        threshold = self.config.thresholds.publish
        if self.config.flood_publish:
            members = self._topic_peers.get(topic, ())
            return [p for p in sorted(members) if self.scores.score(p, now) >= threshold]
        if topic in self._mesh:
            return sorted(self._mesh[topic])
        self._last_publish[topic] = now
        fanout = self._fanout.get(topic)
        if fanout is None:
            members = self._topic_peers.get(topic, ())
            ready = [p for p in sorted(members) if self.scores.score(p, now) >= threshold]
            fanout = self._fanout[topic] = set(self._sample(ready, self.config.d))
        return sorted(fanout)

    # ---- receiving -------------------------------------------------------------------

    def handle_rpc(self, peer: PeerId, rpc: RPC, now: float) -> None:
        """Process one RPC from a connected peer; a graylisted peer's RPCs are ignored."""
        state = self._peers.get(peer)
        if state is None:
            return
        if self.scores.score(peer, now) < self.config.thresholds.graylist:
            self.stats.graylisted_rpcs += 1
            return
        for sub in rpc.subscriptions:
            self._handle_subscription(peer, state, sub)
        for message in rpc.publish:
            self._handle_message(peer, message, now)
        if rpc.control is not None:
            self._handle_control(peer, state, rpc.control, now)

    def malformed_rpc(self, peer: PeerId) -> None:
        """The shell could not decode a frame from `peer`: a behaviour penalty (P₇)."""
        self.stats.malformed_rpcs += 1
        self.scores.penalize(peer)

    def _handle_subscription(self, peer: PeerId, state: _Peer, sub: SubOpts) -> None:
        topic = sub.topic
        if not sub.subscribe:
            if topic in state.topics:
                state.topics.discard(topic)
                self._forget_topic_peer(topic, peer)
            return
        if topic in state.topics or len(state.topics) >= self.config.max_topics_per_peer:
            return
        state.topics.add(topic)
        self._topic_peers.setdefault(topic, set()).add(peer)

    def _handle_message(self, source: PeerId, message: Message, now: float) -> None:
        topic = message.topic
        if topic not in self._mesh:
            self.stats.ignored += 1
            return
        message_id = message.id
        if message_id in self._seen:
            # Our own messages land here too: js peers do not spare the author when forwarding.
            self.stats.duplicates += 1
            if self._seen.rejected(message_id):
                self.scores.invalid_message(source, topic)
            return
        if message.from_peer == self.peer_id.multihash:
            self.stats.ignored += 1  # ours, but older than the seen cache: a replay
            return
        try:
            author = verify_message(message)
        except MessageRejected as exc:
            self._reject(source, topic, exc.reason)
            return
        self._promises.pop(message_id, None)
        verdict = self._validate(source, message)
        self._seen.add(message_id, now, rejected=verdict is ValidationResult.REJECT)
        if verdict is ValidationResult.REJECT:
            self._reject(source, topic, "refused by the topic validator")
            return
        if verdict is ValidationResult.IGNORE:
            self.stats.ignored += 1
            return
        self.scores.first_delivery(source, topic)
        self._mcache.put(message_id, message)
        self._deliver(message)
        for peer in sorted(self._mesh[topic]):
            if peer != source and peer != author:
                self._outbox.message(peer, message)

    def _validate(self, source: PeerId, message: Message) -> ValidationResult:
        validator = self._validators.get(message.topic)
        if validator is None:
            return ValidationResult.ACCEPT
        try:
            return validator(source, message)
        except Exception:
            log.exception("validator for topic %r failed; ignoring the message", message.topic)
            return ValidationResult.IGNORE

    def _reject(self, source: PeerId, topic: str, reason: str) -> None:
        self.stats.rejected += 1
        self.scores.invalid_message(source, topic)
        log.debug("rejected a message on %r from %s: %s", topic, source, reason)

    def _deliver(self, message: Message) -> None:
        self._delivered.append(message)
        self.stats.delivered += 1

    # ---- control ---------------------------------------------------------------------

    def _handle_control(self, peer: PeerId, state: _Peer, control: Control, now: float) -> None:
        if self.scores.score(peer, now) >= self.config.thresholds.gossip:
            for ihave in control.ihave:
                self._handle_ihave(peer, state, ihave, now)
            for iwant in control.iwant:
                self._handle_iwant(peer, iwant)
        for graft in control.graft:
            self._handle_graft(peer, state, graft, now)
        for prune in control.prune:
            self._handle_prune(peer, prune, now)

    def _handle_ihave(self, peer: PeerId, state: _Peer, ihave: IHave, now: float) -> None:
        config = self.config
        state.ihaves += 1
        if (
            state.ihaves > config.max_ihave_messages
            or state.asked >= config.max_ihave_length
            or ihave.topic not in self._mesh
        ):
            return
        wanted = list(dict.fromkeys(m for m in ihave.message_ids if m not in self._seen))
        if not wanted:
            return
        self.rng.shuffle(wanted)
        wanted = wanted[: config.max_ihave_length - state.asked]
        state.asked += len(wanted)
        self._outbox.iwant(peer, wanted)
        # Track one id per IHAVE: if it never arrives, the advertiser broke its promise.
        promised = self.rng.choice(wanted)
        self._promises.setdefault(promised, {}).setdefault(peer, now + config.iwant_followup_time)

    def _handle_iwant(self, peer: PeerId, iwant: IWant) -> None:
        for message_id in dict.fromkeys(iwant.message_ids):
            found = self._mcache.get_for_peer(message_id, peer)
            if found is None or found[1] > self.config.gossip_retransmission:
                continue
            self.stats.iwant_served += 1
            self._outbox.message(peer, found[0])

    def _handle_graft(self, peer: PeerId, state: _Peer, graft: Graft, now: float) -> None:
        topic = graft.topic
        mesh = self._mesh.get(topic)
        if mesh is None or peer in mesh:
            return  # v1.1: a GRAFT for a topic we did not join gets no answer
        if now < self._backoff.get((topic, peer), 0.0):
            self.scores.penalize(peer)
            self._prune(peer, topic, now, self.config.prune_backoff)
            return
        if self.scores.score(peer, now) < 0 or (
            len(mesh) >= self.config.d_hi and not state.outbound
        ):
            self._prune(peer, topic, now, self.config.prune_backoff)
            return
        mesh.add(peer)
        self.scores.graft(peer, topic, now)

    def _handle_prune(self, peer: PeerId, prune: Prune, now: float) -> None:
        topic = prune.topic
        mesh = self._mesh.get(topic)
        if mesh is None:
            return  # backoff only matters where we graft; made-up topics cost us nothing
        if peer in mesh:
            mesh.discard(peer)
            self.scores.prune(peer, topic)
        backoff = self.config.prune_backoff if prune.backoff is None else prune.backoff
        self._set_backoff(topic, peer, now + min(backoff, self.config.max_backoff))

    def _graft(self, peer: PeerId, topic: str, now: float) -> None:
        self._mesh[topic].add(peer)
        self.scores.graft(peer, topic, now)
        self._outbox.graft(peer, topic)

    def _prune(self, peer: PeerId, topic: str, now: float, backoff: float) -> None:
        mesh = self._mesh.get(topic)
        if mesh is not None:
            mesh.discard(peer)
        self.scores.prune(peer, topic)
        self._set_backoff(topic, peer, now + backoff)
        self._outbox.prune(peer, topic, backoff)

    def _set_backoff(self, topic: str, peer: PeerId, until: float) -> None:
        key = (topic, peer)
        self._backoff[key] = max(self._backoff.get(key, 0.0), until)

    # ---- heartbeat -------------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        """The periodic work: scores, promises, meshes, fanout, gossip, cache windows."""
        self.scores.decay(now)
        self._backoff = {k: until for k, until in self._backoff.items() if until > now}
        self._check_promises(now)
        for state in self._peers.values():
            state.ihaves = 0
            state.asked = 0
        for topic in self._mesh:
            self._maintain_mesh(topic, now)
        self._maintain_fanout(now)
        self._emit_gossip(now)
        self._mcache.shift()
        self._seen.expire(now)

    def _check_promises(self, now: float) -> None:
        for message_id, due in list(self._promises.items()):
            for peer, deadline in list(due.items()):
                if deadline <= now:
                    del due[peer]
                    self.stats.broken_promises += 1
                    self.scores.penalize(peer)
            if not due:
                del self._promises[message_id]

    def _maintain_mesh(self, topic: str, now: float) -> None:
        config = self.config
        mesh = self._mesh[topic]
        for peer in sorted(mesh):
            if self.scores.score(peer, now) < 0:
                self._prune(peer, topic, now, config.prune_backoff)
        if len(mesh) < config.d_lo:
            candidates = self._candidates(topic, now, exclude=mesh)
            for peer in self._sample(candidates, config.d - len(mesh)):
                self._graft(peer, topic, now)
        elif len(mesh) > config.d_hi:
            keep = self._survivors(mesh, now)
            for peer in sorted(mesh - keep):
                self._prune(peer, topic, now, config.prune_backoff)
        outbound = sum(self._peers[p].outbound for p in mesh)
        if len(mesh) >= config.d_lo and outbound < config.d_out:
            candidates = [
                p for p in self._candidates(topic, now, exclude=mesh) if self._peers[p].outbound
            ]
            for peer in self._sample(candidates, config.d_out - outbound):
                self._graft(peer, topic, now)

    def _survivors(self, mesh: set[PeerId], now: float) -> set[PeerId]:
        """Who stays when pruning to D: the best D_score by score, the rest at random,
        swapping in outbound peers until at least D_out are outbound."""
        config = self.config
        ranked = self._sample(sorted(mesh), len(mesh))  # shuffle, so ties break at random
        ranked.sort(key=lambda p: self.scores.score(p, now), reverse=True)
        rest = ranked[config.d_score :]
        self.rng.shuffle(rest)
        keep = ranked[: config.d_score] + rest[: config.d - config.d_score]
        spare = [p for p in rest[config.d - config.d_score :] if self._peers[p].outbound]
        missing = config.d_out - sum(self._peers[p].outbound for p in keep)
        for index in range(len(keep) - 1, -1, -1):
            if missing <= 0 or not spare:
                break
            if not self._peers[keep[index]].outbound:
                keep[index] = spare.pop()
                missing -= 1
        return set(keep)

    def _maintain_fanout(self, now: float) -> None:
        threshold = self.config.thresholds.publish
        for topic in list(self._fanout):
            if now - self._last_publish.get(topic, now) > self.config.fanout_ttl:
                del self._fanout[topic]
                self._last_publish.pop(topic, None)
                continue
            fanout = self._fanout[topic]
            members = self._topic_peers.get(topic, set())
            for peer in list(fanout):
                if peer not in members or self.scores.score(peer, now) < threshold:
                    fanout.discard(peer)
            if len(fanout) < self.config.d:
                ready = [
                    p for p in sorted(members - fanout) if self.scores.score(p, now) >= threshold
                ]
                fanout.update(self._sample(ready, self.config.d - len(fanout)))

    def _emit_gossip(self, now: float) -> None:
        config = self.config
        threshold = config.thresholds.gossip
        for topic, excluded in [*self._mesh.items(), *self._fanout.items()]:
            message_ids = self._mcache.gossip_ids(topic)
            if not message_ids:
                continue
            members = self._topic_peers.get(topic, set())
            candidates = [
                p for p in sorted(members - excluded) if self.scores.score(p, now) >= threshold
            ]
            target = max(config.d_lazy, int(config.gossip_factor * len(candidates)))
            for peer in self._sample(candidates, target):
                ids = message_ids
                if len(ids) > config.max_ihave_length:
                    ids = self._sample(ids, config.max_ihave_length)
                self._outbox.ihave(peer, topic, ids)

    # ---- choosing peers --------------------------------------------------------------

    def _graftable(self, topic: str, peer: PeerId, now: float) -> bool:
        return (
            peer in self._peers
            and now >= self._backoff.get((topic, peer), 0.0)
            and self.scores.score(peer, now) >= 0
        )

    def _candidates(self, topic: str, now: float, *, exclude: Iterable[PeerId]) -> list[PeerId]:
        """Peers in `topic` we may graft: not excluded, not backing off, score >= 0."""
        members = self._topic_peers.get(topic, set()) - set(exclude)
        return [p for p in sorted(members) if self._graftable(topic, p, now)]

    def _sample(self, items: list[T], count: int) -> list[T]:
        return self.rng.sample(items, min(count, len(items)))
