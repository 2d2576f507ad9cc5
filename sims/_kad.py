"""One simulated peer's Kademlia: the real cores, driven as `KademliaDHT` drives them.

`RoutingTable`, `Lookup`, `RecordStore` (with the real signed node-record validator),
`ProviderStore` and `KadResponder` are the objects a real peer runs; this module is
the simulator's shell around them, shaped like `p2p/kad/_dht.py`: α queries at a
time, replies that end provider and value lookups early, a liveness ping before a
full bucket drops its oldest entry, requesters that serve Kademlia entering the
responder's table. Only the transport differs: an RPC is a call on the other
peer's responder after the simulated network's delays, as timed callbacks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from dbloom.p2p import DecodeError, Multiaddr, PeerId
from dbloom.p2p.kad import (
    KadMessage,
    KadResponder,
    Lookup,
    MessageType,
    NodeRecordValidator,
    PeerInfo,
    ProviderStore,
    Record,
    RecordRejected,
    RecordStore,
    RoutingTable,
    kad_key,
)
from dbloom.p2p.kad._lookup import Finished, Query
from dbloom.p2p.kad._table import Pending

from ._events import Scheduler
from ._net import COLD_EXTRA_RTTS, Endpoint, SimNetwork

if TYPE_CHECKING:
    from ._scenario import KadSpec

PEER_ENTRY_BYTES = 52
"""Wire bytes of one peer in a reply: 38-byte id, one /ip4/…/tcp address, tags."""
MESSAGE_OVERHEAD = 4
"""Type and tags, besides the key."""
LOOKUP_TIMEOUT_QUERIES = 6
"""A lookup gives up after this many query timeouts (60 s with the default 10 s)."""


def message_size(message: KadMessage) -> int:
    """Approximate wire size; `tests/sims` checks it against the real encoder."""
    size = MESSAGE_OVERHEAD + len(message.key)
    size += PEER_ENTRY_BYTES * (len(message.closer_peers) + len(message.provider_peers))
    if message.record is not None:
        size += len(message.record.key) + len(message.record.value) + 8
    return size


class MemoValidator(NodeRecordValidator):
    """The real node-record validator, remembering records it already accepted.

    The same signed bytes reach twenty replicas; checking the signature once per
    distinct record instead of once per copy keeps 10,000-peer runs affordable and
    changes no outcome (validation is a pure function of the bytes).
    """

    def __init__(self) -> None:
        super().__init__()
        self._good: set[bytes] = set()

    def validate(self, key: bytes, value: bytes) -> None:
        digest = hashlib.blake2b(key + value, digest_size=16).digest()
        if digest in self._good:
            return
        super().validate(key, value)
        self._good.add(digest)


@dataclass(slots=True)
class LookupStats:
    """One lookup as the metrics see it."""

    kind: str
    started: float
    seconds: float
    hops: int
    contacted: int
    failed: int
    found: bool


def _no_addrs(peer: PeerId) -> tuple[Multiaddr, ...]:
    """Replies carry the addresses in the table entry (the simulator has no peerstore)."""
    return ()


def _not_tracked(peer: PeerId) -> bool:
    """The CONNECTED/CAN_CONNECT hint in replies is advisory; the simulator always says
    CAN_CONNECT (a reply's hint changes nothing in how a lookup proceeds)."""
    return False


class KadWorld(Protocol):
    """What a SimKad needs from the world around it."""

    net: SimNetwork
    scheduler: Scheduler

    def kad_of(self, peer: PeerId) -> SimKad | None: ...

    def addrs_of(self, peer: PeerId) -> tuple[Multiaddr, ...]: ...

    def note(self, counter: str, amount: int = 1) -> None: ...


ReplyCallback = Callable[[KadMessage | None, bool], None]
"""Called with (reply, True) on an answer, (None, False) on a failure."""
AnswerHook = Callable[["SimKad", PeerId, KadMessage, float], KadMessage | None]
LookupDone = Callable[[Lookup, LookupStats], None]


class SimKad:
    """A peer's DHT state and operations inside the simulator."""

    def __init__(
        self,
        peer_id: PeerId,
        endpoint: Endpoint,
        addr: Multiaddr,
        spec: KadSpec,
        world: KadWorld,
        *,
        server: bool,
        validator: NodeRecordValidator,
    ) -> None:
        self.peer_id = peer_id
        self.endpoint = endpoint
        self.addr = addr
        self.spec = spec
        self.world = world
        self.server = server
        self.table = RoutingTable(peer_id, k=spec.k)
        self.records = RecordStore({"dbloom": validator})
        # Seeded per peer: a crowded key's reply samples stay the same run to run.
        self.providers = ProviderStore(ttl=spec.provider_ttl, rng=random.Random(peer_id.multihash))
        self.responder = KadResponder(
            self.table,
            self.records,
            self.providers,
            k=spec.k,
            addrs_of=_no_addrs,
            is_connected=_not_tracked,
        )
        self.answer_hook: AnswerHook | None = None
        self._liveness: set[PeerId] = set()

    def _now(self) -> float:
        return self.world.scheduler.now()

    # ---- answering -------------------------------------------------------------------

    def answer(self, sender: PeerId, request: KadMessage, now: float) -> KadMessage | None:
        """What this peer replies; adversaries answer through their hook."""
        if self.answer_hook is not None:
            return self.answer_hook(self, sender, request, now)
        return self.responder.answer(sender, request, now)

    # ---- RPC -------------------------------------------------------------------------

    def rpc(self, target: PeerId, request: KadMessage, done: ReplyCallback) -> None:
        """Send `request` to `target`; `done` runs when the reply arrives or the query fails.

        A dial to a peer that is gone (or behind NAT, or never existed) fails at the
        query timeout, as an unanswered TCP SYN does; a cold connection costs
        `COLD_EXTRA_RTTS` round trips before the request leaves.
        """
        world = self.world
        net = world.net
        scheduler = world.scheduler
        start = self._now()
        deadline = start + self.spec.query_timeout
        other = world.kad_of(target)

        def fail() -> None:
            done(None, False)

        if other is None or not other.endpoint.online or other.endpoint.behind_nat:
            scheduler.call_at(deadline, fail)
            return
        rtt = net.rtt(self.endpoint, other.endpoint)
        cold = not net.connected(self.endpoint, other.endpoint)
        arrive = start + (COLD_EXTRA_RTTS * rtt if cold else 0.0) + rtt / 2
        arrive += net.transfer(message_size(request))
        session = other.endpoint.session

        def on_arrival() -> None:
            now = self._now()
            if not other.endpoint.online or other.endpoint.session != session:
                scheduler.call_at(max(deadline, now), fail)
                return
            if cold:
                net.connect(self.endpoint, other.endpoint)
            try:
                reply = other.answer(self.peer_id, request, now)
            except DecodeError:
                scheduler.call_later(rtt / 2, fail)
                return
            if self.server:
                other.offer(self.peer_id)
            if reply is None:
                done(None, True)
                return
            back = rtt / 2 + net.transfer(message_size(reply))
            if now + back >= deadline:
                scheduler.call_at(deadline, fail)
                return

            def on_reply() -> None:
                if other.server:
                    self.offer(target)
                done(reply, True)

            scheduler.call_later(back, on_reply)

        scheduler.call_at(arrive, on_arrival)

    def offer(self, peer: PeerId) -> None:
        """A peer answered as a server: add it, pinging the oldest entry if the bucket is full."""
        result = self.table.update(peer, self.world.addrs_of(peer), self._now())
        if isinstance(result, Pending):
            candidate = result.candidate.peer
            if candidate in self._liveness:
                return
            self._liveness.add(candidate)

            def on_ping(reply: KadMessage | None, ok: bool) -> None:
                self._liveness.discard(candidate)
                self.table.on_liveness(candidate, ok, self._now())

            self.rpc(candidate, KadMessage(type=MessageType.PING), on_ping)

    # ---- lookups ---------------------------------------------------------------------

    def lookup(
        self,
        kind: MessageType,
        key: bytes,
        *,
        label: str,
        done: LookupDone,
        on_reply: Callable[[PeerId, KadMessage], bool] | None = None,
    ) -> None:
        """The iterative lookup of `key`, as `KademliaDHT._lookup` runs it."""
        _LookupRun(self, kind, key, label, done, on_reply).step()

    def find_providers(
        self, key: bytes, count: int, done: Callable[[list[PeerInfo], LookupStats], None]
    ) -> None:
        """Up to `count` providers of `key`, stopping once that many are found."""
        found: dict[PeerId, PeerInfo] = {}
        for info in self.providers.get(key, self._now(), limit=count):
            found[info.peer_id] = info
        if len(found) >= count:
            done(list(found.values()), LookupStats("providers", 0.0, 0.0, 0, 0, 0, True))
            return

        def on_reply(peer: PeerId, reply: KadMessage) -> bool:
            for info in reply.provider_peers:
                if len(found) < count:
                    found.setdefault(info.peer_id, info)
            return len(found) >= count

        def finished(lookup: Lookup, stats: LookupStats) -> None:
            stats.found = bool(found)
            done(list(found.values()), stats)

        self.lookup(
            MessageType.GET_PROVIDERS, key, label="providers", done=finished, on_reply=on_reply
        )

    def get(self, key: bytes, done: Callable[[bytes | None, LookupStats], None]) -> None:
        """The first valid value for `key` (quorum 1, as the shim reads node records)."""
        local = self.records.get(key, self._now())
        if local is not None:
            done(local, LookupStats("get", 0.0, 0.0, 0, 0, 0, True))
            return
        validator = self.records.validator_for(key)
        values: list[bytes] = []

        def on_reply(peer: PeerId, reply: KadMessage) -> bool:
            record = reply.record
            if record is None or record.key != key:
                return False
            try:
                validator.validate(key, record.value)
            except RecordRejected:
                self.world.note("invalid_records_returned")
                return False
            values.append(record.value)
            return True

        def finished(lookup: Lookup, stats: LookupStats) -> None:
            stats.found = bool(values)
            done(values[0] if values else None, stats)

        self.lookup(MessageType.GET_VALUE, key, label="get", done=finished, on_reply=on_reply)

    def send_to_closest(
        self, key: bytes, request: KadMessage, label: str, done: Callable[[LookupStats], None]
    ) -> None:
        """Find the k closest peers to `key` and send each `request` (PUT or ADD_PROVIDER)."""

        def finished(lookup: Lookup, stats: LookupStats) -> None:
            self.send_to(lookup.closest(), request)
            done(stats)

        self.lookup(MessageType.FIND_NODE, key, label=label, done=finished)

    def send_to(self, peers: Sequence[PeerId], request: KadMessage) -> None:
        def sent(reply: KadMessage | None, ok: bool) -> None:
            if not ok:
                self.world.note("store_failures")

        for peer in peers:
            self.rpc(peer, request, sent)

    def provide(self, key: bytes, done: Callable[[LookupStats], None]) -> None:
        info = PeerInfo(peer_id=self.peer_id, addrs=(self.addr,))
        if self.server:
            self.providers.add(key, info, self._now())
        request = KadMessage(type=MessageType.ADD_PROVIDER, key=key, provider_peers=(info,))
        self.send_to_closest(key, request, "provide", done)

    def put(self, key: bytes, value: bytes, done: Callable[[LookupStats], None]) -> None:
        self.records.put(key, value, from_peer=self.peer_id, now=self._now())
        request = KadMessage(
            type=MessageType.PUT_VALUE, key=key, record=Record(key=key, value=value)
        )
        self.send_to_closest(key, request, "put", done)


class _LookupRun:
    """Feeds one `Lookup` its replies and timeouts from scheduled callbacks."""

    __slots__ = (
        "done",
        "finished",
        "key",
        "kind",
        "label",
        "lookup",
        "on_reply",
        "owner",
        "start",
        "wake_at",
    )

    def __init__(
        self,
        owner: SimKad,
        kind: MessageType,
        key: bytes,
        label: str,
        done: LookupDone,
        on_reply: Callable[[PeerId, KadMessage], bool] | None,
    ) -> None:
        spec = owner.spec
        self.owner = owner
        self.kind = kind
        self.key = key
        self.label = label
        self.done = done
        self.on_reply = on_reply
        self.start = owner._now()
        target = kad_key(key)
        owner.table.note_lookup(target, self.start)
        seeds = [entry.peer for entry in owner.table.closest(target, spec.k)]
        self.lookup = Lookup(
            target,
            seeds,
            alpha=spec.alpha,
            k=spec.k,
            peer_timeout=spec.query_timeout,
            lookup_timeout=LOOKUP_TIMEOUT_QUERIES * spec.query_timeout,
            local=owner.peer_id,
            now=self.start,
        )
        self.finished = False
        self.wake_at = float("inf")

    def step(self) -> None:
        if self.finished:
            return
        while True:
            step = self.lookup.next(self.owner._now())
            if isinstance(step, Query):
                peer = step.peer
                self.owner.rpc(
                    peer, KadMessage(type=self.kind, key=self.key), partial(self._answered, peer)
                )
                continue
            if isinstance(step, Finished):
                self._finish()
                return
            if step.until < self.wake_at:
                self.wake_at = step.until
                self.owner.world.scheduler.call_at(step.until, self._timer)
            return

    def _timer(self) -> None:
        self.wake_at = float("inf")
        self.step()

    def _answered(self, peer: PeerId, reply: KadMessage | None, ok: bool) -> None:
        if self.finished:
            return
        now = self.owner._now()
        if ok and reply is not None:
            self.lookup.on_success(peer, [p.peer_id for p in reply.closer_peers], now)
            if self.on_reply is not None and self.on_reply(peer, reply):
                self._finish()
                return
        else:
            self.lookup.on_failure(peer, now)
            self.owner.table.query_failed(peer)  # as the real DHT: lookup queries only
        self.step()

    def _finish(self) -> None:
        self.finished = True
        lookup = self.lookup
        stats = LookupStats(
            kind=self.label,
            started=self.start,
            seconds=self.owner._now() - self.start,
            hops=lookup.hops,
            contacted=lookup.contacted,
            failed=lookup.failed,
            found=bool(lookup.closest()),
        )
        self.done(lookup, stats)
