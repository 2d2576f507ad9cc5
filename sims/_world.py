"""The simulated network: peers, clients and adversaries living in virtual time.

Peers come and go as their owners use their Macs; while online they announce
their models and node records in the DHT and serve requests with a calibrated
service-time model (prefill at the device's prefill speed, decoding at its
decode speed shared across a batch). Clients behave like `dbloom shim`: find
providers (cached, one lookup in flight per model), read node records, rank with
the shim's own `Router`, dial, attest with real evidence and the real verifier,
fail over, and countersign the node's signed receipt, which they publish in
batches over the real gossipsub router to the ledger-keeping peers; auditors
among them store every receipt in a real SQLite `Ledger`.

Every delay passes through `World.sleep`, which adds under a microsecond of
seeded jitter: trio breaks ties between equal deadlines by object address, so
without it two runs with one seed could order simultaneous events differently.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing

from dbloom.api._routing import Candidate, Router, RoutingPolicy
from dbloom.attest import Claims, DevProvider, Policy, default_verifiers, verify_evidence
from dbloom.inference import ModelOffer, NodeRecord, decode_node_record, model_provider_key
from dbloom.ledger import (
    Ledger,
    ReceiptBody,
    ReceiptError,
    Terms,
    compute_amount,
    countersign,
    decode_node_receipt,
    sign_as_node,
    tokens_digest,
)
from dbloom.ledger._service import TOPIC, decode_batch, encode_batch
from dbloom.p2p import DecodeError, KeyPair, Multiaddr, PeerId
from dbloom.p2p.gossip import RPC, GossipConfig, GossipRouter, Message, ValidationResult
from dbloom.p2p.kad import (
    KadMessage,
    Lookup,
    MessageType,
    PeerInfo,
    kad_key,
    node_record_key,
    open_node_record,
    peer_key,
    provider_key,
    seal_node_record,
    settled_neighbours,
)

from ._devices import DEVICE_CLASSES, DeviceClass
from ._events import Scheduler
from ._kad import LookupStats, MemoValidator, SimKad
from ._net import COLD_EXTRA_RTTS, Endpoint, SimNetwork
from ._scenario import Distribution, ModelSpec, Scenario

EPOCH_START_MS = 1_767_225_600_000
"""Virtual time 0 on the receipts' wall clock: 2026-01-01T00:00:00Z."""
MEASUREMENT = bytes(32)
MAX_BATCH_RECEIPTS = 64
GOSSIP_DEGREE = 8
FILE_EVERY = 30.0
CLIENT_GOSSIP_PEERS = 4
UTC_OFFSETS = {"eu": 1.0, "us": -6.0, "asia": 8.0, "sa": -3.0, "oceania": 10.0, "africa": 2.0}
_NODE_RECORD_SEQ_BASE = 1_000_000


@dataclass(slots=True)
class RequestRow:
    """One request, as the per-request CSV shows it."""

    id: int
    client: int
    client_region: str
    model: str
    arrived: float
    prompt_tokens: int
    output_tokens: int
    status: str = "pending"
    node: int = -1
    node_region: str = ""
    device: str = ""
    attempts: int = 0
    stale_dials: int = 0
    adversaries_reached: str = ""
    ttft: float = math.nan
    latency: float = math.nan
    lookup_seconds: float = 0.0


@dataclass(slots=True)
class Node:
    """A serving peer: its keys, hardware, place, role, and what it has done."""

    index: int
    key: KeyPair
    kad: SimKad
    device: DeviceClass
    always_on: bool
    adversary: str
    speeds: dict[str, tuple[float, float]]
    max_batch: int
    max_queue: int
    gossip: GossipRouter | None = None
    ledger: Ledger | None = None
    active: int = 0
    queue: deque[trio.Event] = field(default_factory=deque)
    slot_seconds: float = 0.0
    online_seconds: float = 0.0
    changed_at: float = 0.0
    online_since: float = 0.0
    served: int = 0
    tokens_out: int = 0
    record_seq: int = 0

    @property
    def endpoint(self) -> Endpoint:
        return self.kad.endpoint

    @property
    def peer_id(self) -> PeerId:
        return self.kad.peer_id

    def account(self, now: float) -> None:
        """Fold busy slot-time and online time up to `now` into the totals."""
        dt = now - self.changed_at
        if dt > 0:
            self.slot_seconds += self.active * dt
            if self.endpoint.online:
                self.online_seconds += dt
        self.changed_at = now


@dataclass(slots=True)
class Client:
    """An app developer's shim: DHT client, router, attestation cache, receipt batch."""

    index: int
    key: KeyPair
    kad: SimKad
    router: Router
    gossip: GossipRouter | None
    candidates: dict[str, tuple[float, list[Candidate]]] = field(default_factory=dict)
    inflight: dict[str, trio.Event] = field(default_factory=dict)
    records: dict[PeerId, tuple[float, NodeRecord | None]] = field(default_factory=dict)
    attested: dict[int, int] = field(default_factory=dict)
    pending: list[bytes] = field(default_factory=list)


class World:
    """Builds a scenario's network and runs it; `metrics` are read afterwards."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        ledger_dir: Path,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed)
        self.ledger_dir = ledger_dir
        self.progress = progress
        net = scenario.network
        self.net = SimNetwork(
            net.rtt_ms, bandwidth_mbit=net.bandwidth_mbit, relay_rtt_ms=net.relay_rtt_ms
        )
        self.nursery: trio.Nursery | None = None
        self.counters: Counter[str] = Counter()
        self.lookups: list[LookupStats] = []
        self.requests: list[RequestRow] = []
        self.samples: list[dict[str, float]] = []
        self.gossip_sent: dict[bytes, tuple[float, int]] = {}
        self.gossip_seen: dict[bytes, list[float]] = {}
        self.nodes: list[Node] = []
        self.clients: list[Client] = []
        self.fake_ids: list[PeerId] = []
        self._kads: dict[PeerId, SimKad] = {}
        self._addrs: dict[PeerId, tuple[Multiaddr, ...]] = {}
        self._nodes_by_id: dict[PeerId, Node] = {}
        self._gossipers: dict[PeerId, GossipRouter] = {}
        self._gossip_owner: dict[PeerId, Endpoint] = {}
        self._ledgers: dict[PeerId, Ledger] = {}
        self._unfiled: dict[PeerId, list[bytes]] = defaultdict(list)
        self._validator = MemoValidator()
        self._verifiers = default_verifiers()
        self._policy = Policy().with_dev()
        self.in_flight = 0
        self._gossip_config = GossipConfig()
        self._build()

    # ---- the KadWorld protocol ---------------------------------------------------------

    def kad_of(self, peer: PeerId) -> SimKad | None:
        return self._kads.get(peer)

    def endpoint_of(self, peer: PeerId) -> Endpoint | None:
        kad = self._kads.get(peer)
        return None if kad is None else kad.endpoint

    def addrs_of(self, peer: PeerId) -> tuple[Multiaddr, ...]:
        """One shared tuple per peer, so reply entries can be reused as they are."""
        addrs = self._addrs.get(peer)
        if addrs is None:
            addrs = self._addrs[peer] = (Multiaddr.parse("/ip4/192.0.2.1/tcp/4001"),)
        return addrs

    def note(self, counter: str, amount: int = 1) -> None:
        self.counters[counter] += amount

    # ---- building ----------------------------------------------------------------------

    def _pick(self, shares: Mapping[str, float]) -> str:
        names = sorted(shares)
        picked: str = self.rng.choices(names, weights=[shares[n] for n in names])[0]
        return picked

    def _new_key(self) -> KeyPair:
        return KeyPair.from_seed(self.rng.randbytes(32))

    def _addr_for(self, index: int) -> Multiaddr:
        a, b = divmod(index, 250)
        return Multiaddr.parse(f"/ip4/10.{a // 250 % 250}.{a % 250}.{b + 1}/tcp/4001")

    def _build(self) -> None:
        s = self.scenario
        peers, adv = s.peers, s.adversaries
        kinds = (
            ["invalid_attestation"] * round(adv.invalid_attestation * peers.count)
            + ["garbage"] * round(adv.garbage * peers.count)
            + ["poisoning"] * round(adv.poisoning * peers.count)
            + ["receipt_inflation"] * round(adv.receipt_inflation * peers.count)
        )
        kinds = kinds[: peers.count] + [""] * (peers.count - len(kinds))
        self.rng.shuffle(kinds)
        always_on = [self.rng.random() < s.availability.always_on_share for _ in range(peers.count)]
        for i in range(peers.count):
            key = self._new_key()
            region = self._pick(peers.regions)
            nat = self.rng.random() < peers.nat_share
            endpoint = self.net.add(region, behind_nat=nat)
            addr = self._addr_for(i)
            kad = SimKad(
                key.peer_id, endpoint, addr, s.kad, self, server=not nat, validator=self._validator
            )
            device = DEVICE_CLASSES[self._pick(peers.devices)]
            speeds = {m.id: device.speeds(m.params_b) for m in s.models}
            node = Node(
                i,
                key,
                kad,
                device,
                always_on[i],
                kinds[i],
                speeds,
                peers.max_batch,
                peers.max_queue,
            )
            if kinds[i] == "poisoning":
                kad.answer_hook = self._poisoned_answer
            self.nodes.append(node)
            self._kads[key.peer_id] = kad
            self._addrs[key.peer_id] = (addr,)
            self._nodes_by_id[key.peer_id] = node
        self.fake_ids = [self._new_key().peer_id for _ in range(max(20, peers.count // 50))]
        for i in range(s.workload.clients):
            key = self._new_key()
            endpoint = self.net.add(self._pick(s.workload.regions))
            kad = SimKad(
                key.peer_id,
                endpoint,
                self._addr_for(peers.count + i),
                s.kad,
                self,
                server=False,
                validator=self._validator,
            )
            self._kads[key.peer_id] = kad
            router = Router(
                RoutingPolicy(allowed_kinds=frozenset({"dev"})),
                rng=random.Random(self.rng.random()),
            )
            self.clients.append(Client(i, key, kad, router, None))
        self._seed_tables()
        self._build_gossip()

    def _seed_tables(self) -> None:
        """A settled network: every table holds its nearest servers and some far ones."""
        servers = [n.kad for n in self.nodes if n.kad.server]
        if not servers:
            return
        keys = [int.from_bytes(peer_key(k.peer_id), "big") for k in servers]
        neighbours = settled_neighbours(keys, self.rng, near=40, far=60)
        for kad, chosen in zip(servers, neighbours, strict=True):
            for j in chosen:
                kad.table.update(servers[j].peer_id, self.addrs_of(servers[j].peer_id), 0.0)
        for kad in [n.kad for n in self.nodes if not n.kad.server] + [c.kad for c in self.clients]:
            for j in self.rng.sample(range(len(servers)), min(60, len(servers))):
                kad.table.update(servers[j].peer_id, self.addrs_of(servers[j].peer_id), 0.0)

    def _build_gossip(self) -> None:
        spec = self.scenario.ledger
        eligible = [n for n in self.nodes if n.always_on and not n.adversary]
        eligible = eligible or [n for n in self.nodes if not n.adversary]
        chosen = self.rng.sample(eligible, min(spec.gossip_peers, len(eligible)))
        for n, node in enumerate(chosen):
            node.gossip = GossipRouter(
                node.key, self._gossip_config, rng=random.Random(self.rng.random())
            )
            node.gossip.join(TOPIC, 0.0)
            node.gossip.set_validator(TOPIC, _structural_validator)
            self._gossipers[node.peer_id] = node.gossip
            self._gossip_owner[node.peer_id] = node.endpoint
            if n < spec.auditors:
                node.ledger = Ledger.open(
                    self.ledger_dir / f"auditor-{n}.sqlite", epoch_seconds=spec.epoch_seconds
                )
                self._ledgers[node.peer_id] = node.ledger
        if not chosen:
            return
        for i, node in enumerate(chosen):
            for other in self.rng.sample(chosen, min(GOSSIP_DEGREE, len(chosen))):
                if other is not node:
                    self._gossip_link(node.key.peer_id, other.key.peer_id, outbound=True)
            del i
        for client in self.clients:
            client.gossip = GossipRouter(
                client.key, self._gossip_config, rng=random.Random(self.rng.random())
            )
            self._gossipers[client.key.peer_id] = client.gossip
            self._gossip_owner[client.key.peer_id] = client.kad.endpoint
            for other in self.rng.sample(chosen, min(CLIENT_GOSSIP_PEERS, len(chosen))):
                self._gossip_link(client.key.peer_id, other.key.peer_id, outbound=True)

    def _gossip_link(self, a: PeerId, b: PeerId, *, outbound: bool) -> None:
        self._gossipers[a].peer_connected(b, outbound=outbound, now=0.0)
        self._gossipers[b].peer_connected(a, outbound=not outbound, now=0.0)

    # ---- time --------------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds` of virtual time plus a seeded sub-microsecond tie-breaker."""
        await trio.sleep(max(0.0, seconds) + self.scheduler.jitter())

    def later(self, delay: float, callback: Callable[[], None]) -> None:
        self.scheduler.call_later(delay, callback)

    def _draw(self, dist: Distribution) -> float:
        if dist.kind == "fixed":
            value = dist.mean
        elif dist.kind == "exponential":
            value = self.rng.expovariate(1.0 / dist.mean)
        else:
            mu = math.log(dist.mean) - dist.sigma**2 / 2
            value = self.rng.lognormvariate(mu, dist.sigma)
        return min(max(value, dist.low), dist.high)

    # ---- running -----------------------------------------------------------------------

    async def run(self, clock: trio.testing.MockClock) -> None:
        s = self.scenario
        self.t0 = trio.current_time()
        self.scheduler = Scheduler(clock, self.rng)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for node in self.nodes:
                self._start_life(node)
            self._settle_records()
            for peer, router in self._gossipers.items():
                self.later(self.rng.random(), partial(self._heartbeat, peer, router))
            for client in self.clients:
                every = s.ledger.batch_seconds
                self.later(self.rng.random() * every, partial(self._publish_receipts, client))
            for event in s.churn_events:
                self.later(event.at, partial(self._churn_event, event.share, event.back_after))
            self.later(s.warmup, self._arrival)
            self.later(0.0, self._sample)
            self.later(FILE_EVERY, self._filing)
            await self.scheduler.run(self.t0 + s.duration)
            nursery.cancel_scope.cancel()
        end = self.t0 + s.duration
        for node in self.nodes:
            node.account(end)
        self._file_receipts()

    def now(self) -> float:
        """Virtual seconds since the run began."""
        return self.scheduler.now() - self.t0

    def _sample(self) -> None:
        self.samples.append(
            {
                "t": round(self.now(), 3),
                "online": sum(1 for n in self.nodes if n.endpoint.online),
                "busy_slots": sum(n.active for n in self.nodes),
                "in_flight": self.in_flight,
            }
        )
        if self.progress is not None:
            self.progress(self.now())
        self.later(self.scenario.sample_every, self._sample)

    # ---- availability ------------------------------------------------------------------

    def _offline_scale(self, node: Node) -> float:
        """Offline spells are shortest at the region's `peak_hour`: Macs idle at night."""
        a = self.scenario.availability
        region = node.endpoint.region
        offset = self.scenario.network.utc_offset.get(region, UTC_OFFSETS.get(region, 0.0))
        hour = (self.now() / 3600.0 + offset) % 24.0
        return 1.0 - a.diurnal_amplitude * math.cos(2 * math.pi * (hour - a.peak_hour) / 24.0)

    def _start_life(self, node: Node) -> None:
        """The run starts from a settled network: who is online has been for a while."""
        a = self.scenario.availability
        if node.always_on:
            self._join(node, settled=True)
            return
        mean_on = a.online.mean
        mean_off = a.offline.mean * self._offline_scale(node)
        if self.rng.random() < mean_on / (mean_on + mean_off):
            self._join(node, settled=True)
            self.later(self._draw(a.online) * self.rng.random(), partial(self._go_off, node))
        else:
            self._leave(node)
            spell = self._draw(a.offline) * self._offline_scale(node) * self.rng.random()
            self.later(spell, partial(self._go_on, node))

    def _go_on(self, node: Node) -> None:
        if node.endpoint.online:
            return
        self._join(node)
        if not node.always_on:
            self.later(self._draw(self.scenario.availability.online), partial(self._go_off, node))

    def _go_off(self, node: Node) -> None:
        if node.always_on or not node.endpoint.online:
            return
        self._leave(node)
        spell = self._draw(self.scenario.availability.offline) * self._offline_scale(node)
        self.later(spell, partial(self._go_on, node))

    def _churn_event(self, share: float, back_after: float) -> None:
        online = [n for n in self.nodes if n.endpoint.online]
        leaving = self.rng.sample(online, int(len(online) * share))
        self.note("churn_event_departures", len(leaving))
        for node in leaving:
            self._leave(node)

        def back() -> None:
            for node in leaving:
                if not node.endpoint.online:
                    self._join(node)
                    if not node.always_on:
                        online_for = self._draw(self.scenario.availability.online)
                        self.later(online_for, partial(self._go_off, node))

        self.later(back_after, back)

    def _leave(self, node: Node) -> None:
        if node.endpoint.online and node.endpoint.session:
            self.note("departures")
        node.account(self.scheduler.now())
        self.net.go_offline(node.endpoint)
        node.active = 0
        while node.queue:
            node.queue.popleft().set()

    def _settle_records(self) -> None:
        """Place the records a settled network holds: every online peer's node record and
        provider records already sit at the (approximately) k closest online servers."""
        servers = sorted(
            (int.from_bytes(peer_key(n.peer_id), "big"), n.kad)
            for n in self.nodes
            if n.endpoint.online and n.kad.server
        )
        if not servers:
            return
        keys = [key for key, _ in servers]
        k = self.scenario.kad.k
        now = self.scheduler.now()

        def closest(raw_key: bytes) -> list[SimKad]:
            goal = int.from_bytes(kad_key(raw_key), "big")
            at = bisect.bisect_left(keys, goal)
            window = servers[max(0, at - 2 * k) : at + 2 * k]
            return [kad for _, kad in sorted(window, key=lambda e: e[0] ^ goal)[:k]]

        online = [n for n in self.nodes if n.endpoint.online]
        for model in self.scenario.models:
            key = provider_key(model_provider_key(model.id))
            holders = closest(key)
            for node in online:
                info = PeerInfo(peer_id=node.peer_id, addrs=self.addrs_of(node.peer_id))
                for kad in holders:
                    kad.providers.add(key, info, now)
        for node in online:
            key = node_record_key(node.peer_id)
            sealed = self._sealed_record(node)
            node.kad.records.put(key, sealed, from_peer=node.peer_id, now=now)
            for kad in closest(key):
                kad.records.put(key, sealed, from_peer=node.peer_id, now=now)

    def _join(self, node: Node, *, settled: bool = False) -> None:
        """Come online as a real peer does: bootstrap, then announce, then keep it fresh.

        `settled` peers were already up when the run began: their records are in
        place (`_settle_records`) and their timers are somewhere in their period.
        """
        node.account(self.scheduler.now())
        self.net.go_online(node.endpoint)
        session = node.endpoint.session
        spec = self.scenario.kad

        def alive() -> bool:
            return _same(node, session)

        def republish_providers() -> None:
            if alive():
                self._provide_all(node)
                self.later(spec.provider_republish, republish_providers)

        def republish_record() -> None:
            if alive():
                self._publish_record(node)
                self.later(spec.record_republish, republish_record)

        def refresh() -> None:
            if alive():
                node.kad.lookup(
                    MessageType.FIND_NODE,
                    node.peer_id.multihash,
                    label="refresh",
                    done=self._lookup_done,
                )
                self.later(spec.refresh_interval, refresh)

        def announce() -> None:
            if alive():
                self._publish_record(node)
                self._provide_all(node)
                self.later(spec.provider_republish, republish_providers)
                self.later(spec.record_republish, republish_record)
                if node.kad.server:
                    self.later(spec.refresh_interval, refresh)

        if settled:
            self.later(self.rng.random() * spec.provider_republish, republish_providers)
            self.later(self.rng.random() * spec.record_republish, republish_record)
            if node.kad.server:
                self.later(self.rng.random() * spec.refresh_interval, refresh)
            return
        if node.kad.server:

            def bootstrapped(lookup: Lookup, stats: LookupStats) -> None:
                self.lookups.append(stats)
                announce()

            node.kad.lookup(
                MessageType.FIND_NODE,
                node.peer_id.multihash,
                label="bootstrap",
                done=bootstrapped,
            )
        else:
            announce()

    def _lookup_done(self, lookup: object, stats: LookupStats) -> None:
        self.lookups.append(stats)

    def _record_stats(self, stats: LookupStats) -> None:
        self.lookups.append(stats)

    def _provide_all(self, node: Node) -> None:
        for model in self.scenario.models:
            node.kad.provide(provider_key(model_provider_key(model.id)), self._record_stats)

    def _publish_record(self, node: Node) -> None:
        node.kad.put(node_record_key(node.peer_id), self._sealed_record(node), self._record_stats)

    def _sealed_record(self, node: Node) -> bytes:
        offers = tuple(
            ModelOffer(
                id=m.id,
                digest="0" * 64,
                context_length=8192,
                decode_tps=node.speeds[m.id][0],
                prefill_tps=node.speeds[m.id][1],
                price_in=m.price_in,
                price_out=m.price_out,
            )
            for m in self.scenario.models
        )
        record = NodeRecord(
            addrs=(str(node.kad.addr),),
            models=offers,
            max_batch=node.max_batch,
            active=node.active,
            queued=len(node.queue),
            attest_kind="dev",
            measurement=MEASUREMENT.hex(),
            updated_ms=EPOCH_START_MS + int(self.now() * 1000),
        )
        node.record_seq += 1
        return seal_node_record(node.key, _NODE_RECORD_SEQ_BASE + node.record_seq, record.encode())

    # ---- adversaries in the DHT ----------------------------------------------------------

    def _poisoned_answer(
        self, kad: SimKad, sender: PeerId, request: KadMessage, now: float
    ) -> KadMessage | None:
        """Closer peers that do not exist, providers that do not exist, records refused."""
        fakes = tuple(
            PeerInfo(peer_id=p, addrs=self.addrs_of(p))
            for p in self.rng.sample(self.fake_ids, min(kad.spec.k, len(self.fake_ids)))
        )
        if request.type is MessageType.GET_PROVIDERS:
            self.note("poisoned_replies")
            return KadMessage(
                type=request.type, key=request.key, provider_peers=fakes[:5], closer_peers=fakes
            )
        if request.type in (MessageType.FIND_NODE, MessageType.GET_VALUE):
            self.note("poisoned_replies")
            return KadMessage(type=request.type, key=request.key, closer_peers=fakes)
        return kad.responder.answer(sender, request, now)

    # ---- workload ----------------------------------------------------------------------

    def _arrival(self) -> None:
        s = self.scenario
        w = s.workload
        if w.rate_per_s <= 0:
            return
        assert self.nursery is not None
        client = self.clients[self.rng.randrange(len(self.clients))]
        model = self.rng.choices(s.models, weights=[m.weight for m in s.models])[0]
        row = RequestRow(
            id=len(self.requests),
            client=client.index,
            client_region=client.kad.endpoint.region,
            model=model.id,
            arrived=self.now(),
            prompt_tokens=max(1, int(self._draw(w.prompt_tokens))),
            output_tokens=max(1, int(self._draw(w.output_tokens))),
        )
        self.requests.append(row)
        self.nursery.start_soon(self._request, client, model, row)
        self.later(self.rng.expovariate(w.rate_per_s), self._arrival)

    async def _wait(self, start: Callable[[Callable[..., None]], None]) -> tuple[Any, ...]:
        """Await a callback-style operation from a trio task."""
        finished = trio.Event()
        box: list[tuple[Any, ...]] = []

        def done(*args: Any) -> None:
            box.append(args)
            finished.set()

        start(done)
        await finished.wait()
        return box[0]

    async def _candidates(
        self, client: Client, model: ModelSpec, row: RequestRow
    ) -> list[Candidate]:
        w = self.scenario.workload
        now = self.scheduler.now()
        cached = client.candidates.get(model.id)
        if cached is not None and now - cached[0] < w.provider_cache_s:
            return cached[1]
        waiting = client.inflight.get(model.id)
        if waiting is not None:
            await waiting.wait()
            return client.candidates.get(model.id, (0.0, []))[1]
        done = client.inflight[model.id] = trio.Event()
        start = self.scheduler.now()
        try:
            providers, stats = await self._wait(
                partial(
                    client.kad.find_providers,
                    provider_key(model_provider_key(model.id)),
                    self.scenario.kad.providers_wanted,
                )
            )
            self.lookups.append(stats)
            found: list[Candidate] = []

            async def fetch(info: PeerInfo) -> None:
                record = await self._record(client, info.peer_id)
                if record is not None:
                    offer = record.offer(model.id)
                    if offer is not None:
                        found.append(Candidate(info.peer_id, record, offer, info.addrs))

            async with trio.open_nursery() as nursery:
                for info in providers:
                    nursery.start_soon(fetch, info)
            found.sort(key=lambda c: c.peer.multihash)
            client.candidates[model.id] = (self.scheduler.now(), found)
            row.lookup_seconds = self.scheduler.now() - start
            return found
        finally:
            del client.inflight[model.id]
            done.set()

    async def _record(self, client: Client, peer: PeerId) -> NodeRecord | None:
        now = self.scheduler.now()
        cached = client.records.get(peer)
        if cached is not None and now - cached[0] < self.scenario.workload.record_cache_s:
            return cached[1]
        raw, stats = await self._wait(partial(client.kad.get, node_record_key(peer)))
        self.lookups.append(stats)
        record = None
        if raw is not None:
            try:
                envelope = open_node_record(raw)
                if envelope.peer_id == peer:
                    record = decode_node_record(envelope.data)
            except (DecodeError, ValueError):
                self.note("bad_node_records")
        client.records[peer] = (self.scheduler.now(), record)
        return record

    async def _request(self, client: Client, model: ModelSpec, row: RequestRow) -> None:
        self.in_flight += 1
        try:
            await self._serve_request(client, model, row)
        finally:
            self.in_flight -= 1

    async def _serve_request(self, client: Client, model: ModelSpec, row: RequestRow) -> None:
        w = self.scenario.workload
        start = self.scheduler.now()
        with trio.move_on_after(w.first_token_timeout + 3600.0):
            candidates = await self._candidates(client, model, row)
            ordered = client.router.order(candidates, self.scheduler.now())
            if not ordered:
                row.status = "no_provider"
                return
            reached: list[str] = []
            for candidate in ordered[: w.max_attempts]:
                row.attempts += 1
                outcome = await self._attempt(client, candidate, model, row, start, reached)
                if outcome in ("ok", "cut"):
                    break
            row.adversaries_reached = ";".join(reached)
            if row.status == "pending":
                row.status = outcome if outcome not in ("ok", "cut") else row.status
            return
        row.status = "timeout"

    async def _attempt(
        self,
        client: Client,
        candidate: Candidate,
        model: ModelSpec,
        row: RequestRow,
        start: float,
        reached: list[str],
    ) -> str:
        node = self._nodes_by_id.get(candidate.peer)
        endpoint = client.kad.endpoint
        timeout = self.scenario.kad.query_timeout
        if node is None or not node.endpoint.online:
            await self.sleep(timeout)
            row.stale_dials += 1
            self.note("stale_record_dials")
            client.router.failed(candidate.peer, self.scheduler.now())
            return "unreachable"
        rtt = self.net.rtt(endpoint, node.endpoint)
        if not self.net.connected(endpoint, node.endpoint):
            await self.sleep(COLD_EXTRA_RTTS * rtt)
            self.net.connect(endpoint, node.endpoint)
            client.router.measured(candidate.peer, rtt)
        client.router.started(candidate.peer)
        try:
            return await self._exchange(client, candidate, node, model, row, start, reached)
        finally:
            client.router.finished(candidate.peer)

    async def _exchange(
        self,
        client: Client,
        candidate: Candidate,
        node: Node,
        model: ModelSpec,
        row: RequestRow,
        start: float,
        reached: list[str],
    ) -> str:
        rtt = self.net.rtt(client.kad.endpoint, node.endpoint)
        timeout = self.scenario.kad.query_timeout
        if client.attested.get(node.index) != node.endpoint.session:
            await self.sleep(rtt)
            if not await self._attest(client, node):
                self.note("attestation_refused")
                client.router.refused(candidate.peer, self.scheduler.now())
                if node.adversary:
                    reached.append(node.adversary)
                return "refused"
            client.attested[node.index] = node.endpoint.session
        if node.adversary:
            reached.append(node.adversary)
        session = node.endpoint.session
        await self.sleep(rtt / 2 + self.net.transfer(row.prompt_tokens * 4))
        if not _same(node, session):
            await self.sleep(timeout)
            client.router.failed(candidate.peer, self.scheduler.now())
            return "node_left"
        if node.adversary == "garbage":
            await self.sleep(rtt / 2)
            self.note("garbage_replies")
            client.router.failed(candidate.peer, self.scheduler.now())
            return "garbage"
        admitted = await self._admit(node, session)
        if admitted is None:
            await self.sleep(rtt / 2)
            client.router.failed(candidate.peer, self.scheduler.now())
            return "busy"
        if not admitted:
            return "node_left"
        try:
            decode_tps, prefill_tps = node.speeds[model.id]
            per_stream = decode_tps * node.active ** (self.scenario.peers.batch_gain - 1.0)
            await self.sleep(row.prompt_tokens / prefill_tps + rtt / 2)
            if not _same(node, session):
                client.router.failed(candidate.peer, self.scheduler.now())
                return "node_left"
            first = self.scheduler.now()
            row.ttft = first - start
            await self.sleep(row.output_tokens / per_stream)
        finally:
            if _same(node, session):
                node.account(self.scheduler.now())
                node.active -= 1
                self._next_in_queue(node)
        row.node, row.node_region, row.device = node.index, node.endpoint.region, node.device.name
        row.latency = self.scheduler.now() - start
        if not _same(node, session):
            row.status = "cut"
            return "cut"
        node.served += 1
        node.tokens_out += row.output_tokens
        row.status = "ok"
        self._receipt(client, node, model, row, start)
        return "ok"

    async def _attest(self, client: Client, node: Node) -> bool:
        nonce = self.rng.randbytes(32)
        signer = node.key if node.adversary != "invalid_attestation" else self._new_key()
        claims = Claims(
            peer_id=node.peer_id,
            measurement=MEASUREMENT,
            nonce=nonce,
            issued_at_ms=EPOCH_START_MS + int(self.now() * 1000),
        )
        evidence = (await DevProvider(signer).evidence(claims)).encode()
        verdict = verify_evidence(
            evidence,
            policy=self._policy,
            peer=node.peer_id,
            nonce=nonce,
            verifiers=self._verifiers,
            now=EPOCH_START_MS / 1000 + self.now(),
        )
        return not verdict.refusals

    async def _admit(self, node: Node, session: int) -> bool | None:
        """True once a batch slot is ours; None if the node is full; False if it left."""
        node.account(self.scheduler.now())
        if node.active < node.max_batch:
            node.active += 1
            return True
        if len(node.queue) >= node.max_queue:
            return None
        ready = trio.Event()
        node.queue.append(ready)
        try:
            await ready.wait()
        except trio.Cancelled:
            if ready in node.queue:
                node.queue.remove(ready)
            elif _same(node, session):
                node.account(self.scheduler.now())
                node.active -= 1
                self._next_in_queue(node)
            raise
        return _same(node, session)

    def _next_in_queue(self, node: Node) -> None:
        if node.queue and node.active < node.max_batch:
            node.active += 1
            node.queue.popleft().set()

    # ---- receipts and gossip -----------------------------------------------------------

    def _receipt(
        self, client: Client, node: Node, model: ModelSpec, row: RequestRow, start: float
    ) -> None:
        request_id = self.rng.randbytes(16)
        salt = self.rng.randbytes(16)
        received = list(range(row.output_tokens))
        claimed = received
        if node.adversary == "receipt_inflation":
            factor = self.scenario.adversaries.inflation_factor
            claimed = list(range(max(row.output_tokens + 1, int(row.output_tokens * factor))))
        body = ReceiptBody(
            id=request_id,
            node=node.peer_id.multihash,
            client=client.key.public_key.data,
            model=model.id,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=len(claimed),
            price_in=model.price_in,
            price_out=model.price_out,
            amount=compute_amount(row.prompt_tokens, len(claimed), model.price_in, model.price_out),
            started_ms=EPOCH_START_MS + int((start - self.t0) * 1000),
            finished_ms=EPOCH_START_MS + int(self.now() * 1000),
            tokens_digest=tokens_digest(claimed, salt),
        )
        node_receipt = decode_node_receipt(sign_as_node(body, node.key))
        terms = Terms(
            id=request_id,
            node=node.peer_id,
            model=model.id,
            price_in=model.price_in,
            price_out=model.price_out,
            salt=salt,
        )
        try:
            raw = countersign(node_receipt, client.key, received_tokens=received, terms=terms)
        except ReceiptError:
            self.note("receipts_refused_by_client")
            return
        self.note("receipts")
        client.pending.append(raw)

    def _filing(self) -> None:
        self._file_receipts()
        self.later(FILE_EVERY, self._filing)

    def _publish_receipts(self, client: Client) -> None:
        self._flush_receipts(client)
        self.later(self.scenario.ledger.batch_seconds, partial(self._publish_receipts, client))

    def _flush_receipts(self, client: Client) -> None:
        while client.pending:
            batch = client.pending[:MAX_BATCH_RECEIPTS]
            del client.pending[:MAX_BATCH_RECEIPTS]
            if client.gossip is None:
                continue
            message = client.gossip.publish(TOPIC, encode_batch(batch), self.scheduler.now())
            self.gossip_sent[_message_id(message)] = (self.now(), len(batch))
            self.gossip_seen[_message_id(message)] = []
            self._flush_gossip(client.key.peer_id)

    def _heartbeat(self, peer: PeerId, router: GossipRouter) -> None:
        router.heartbeat(self.scheduler.now())
        self._flush_gossip(peer)
        interval = self._gossip_config.heartbeat_interval
        self.later(interval, partial(self._heartbeat, peer, router))

    def _flush_gossip(self, source: PeerId) -> None:
        router = self._gossipers[source]
        origin = self._gossip_owner[source]
        for target, rpc in router.take_outgoing():
            destination = self._gossip_owner.get(target)
            if destination is None:
                continue
            delay = self.net.rtt(origin, destination) / 2 + self.net.transfer(_rpc_size(rpc))
            self.later(delay, _Delivery(self, source, target, rpc))
        for message in router.take_delivered():
            self._delivered(source, message)

    def _deliver(self, source: PeerId, target: PeerId, rpc: RPC) -> None:
        router = self._gossipers[target]
        router.handle_rpc(source, rpc, self.scheduler.now())
        self._flush_gossip(target)

    def _delivered(self, at: PeerId, message: Message) -> None:
        if at not in self._nodes_by_id:
            return
        seen = self.gossip_seen.get(_message_id(message))
        if seen is not None:
            seen.append(self.now())
        if at in self._ledgers:
            try:
                self._unfiled[at].extend(decode_batch(message.data))
            except DecodeError:
                self.note("undecodable_batches")

    def _file_receipts(self) -> None:
        """Auditors store what gossip brought in batches, as `ReceiptService` queues do."""
        for peer, ledger in self._ledgers.items():
            pending = self._unfiled[peer]
            if pending:
                ledger.ingest_many(pending)
                pending.clear()


@dataclass(slots=True)
class _Delivery:
    world: World
    source: PeerId
    target: PeerId
    rpc: RPC

    def __call__(self) -> None:
        self.world._deliver(self.source, self.target, self.rpc)


def _same(node: Node, session: int) -> bool:
    """The node is still online in the session a request started in."""
    return node.endpoint.online and node.endpoint.session == session


def _message_id(message: Message) -> bytes:
    return (message.from_peer or b"") + (message.seqno or b"")


def _rpc_size(rpc: RPC) -> int:
    return 64 + sum(len(m.raw) + 8 for m in rpc.publish)


def _structural_validator(peer: PeerId, message: Message) -> ValidationResult:
    """Relayers check a batch's shape; auditors then verify every receipt in their ledger."""
    try:
        decode_batch(message.data)
    except DecodeError:
        return ValidationResult.REJECT
    return ValidationResult.ACCEPT
