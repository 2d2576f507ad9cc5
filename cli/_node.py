"""A serving peer, assembled: identity, engines, host, DHT, attestation and announcements.

`dbloom peer`, `dbloom demo` and the end-to-end tests all run this one class, so what the
demo shows is what an operator runs. Lifecycle: `run()` sets everything up, announces, and
then serves until `request_stop()`; it then stops announcing, refuses new requests (as
busy, so shims fail over), lets running ones finish within `drain_timeout`, and returns.

Availability: unless the owner's rules say "always on", a task samples the machine
(`_probes.py`) and asks the policy (`_availability.py`). On "pause" the pool stops
admitting at once, the provider keys stop being republished and a record saying
`draining` is published (so shims skip this node on their next lookup); running requests
get `drain_timeout` to finish and are then handed back (their streams reset, so a shim
that has no token yet fails over). On "serve" the pool admits again and the node
re-announces. A status file, when configured, tells `dbloom status` all of this.

Reachability: the node answers AutoNAT dial-backs for others and, with `reachability`
"auto", asks relays found in the DHT to dial it back; while they cannot (a home NAT) it
holds slots on relays (`AutoRelay`), so its record lists `/p2p-circuit` addresses next
to its own, and the record is republished whenever those addresses change. Connections
that arrive through a relay are then upgraded to direct ones by hole punching (DCUtR)
where the NATs allow; either way the relay carries only the Noise session's ciphertext.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import trio

from dbloom.attest import (
    PROTOCOL_ID as ATTEST_PROTOCOL,
)
from dbloom.attest import (
    AttestationError,
    DevProvider,
    EvidenceProvider,
    NodeAttester,
    Posture,
    Reason,
    harden_process,
    measure_software,
    read_posture,
    serve_attest,
)
from dbloom.attest._tlog import LogError, check_log_proof, read_bundle_file
from dbloom.inference import (
    DIRECTORY_KEY,
    EngineError,
    EnginePool,
    Final,
    GenerateRequest,
    InsufficientMemory,
    LocalModel,
    MLXEngine,
    ModelOffer,
    NodeRecord,
    Speed,
    inspect_model,
    measure_speed,
    model_provider_key,
    resolve_model,
    serve_infer,
)
from dbloom.inference import (
    PROTOCOL_ID as INFER_PROTOCOL,
)
from dbloom.inference._models import WEIGHT_SUFFIX, estimate_memory
from dbloom.ledger import Ledger, ReceiptBody, compute_amount, sign_as_node, tokens_digest
from dbloom.ledger._service import ReceiptService
from dbloom.p2p import Host, KeyPair, Multiaddr, NetStream, TcpTransport, open_host
from dbloom.p2p.gossip import Gossip
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key
from dbloom.p2p.relay import (
    AutoNatService,
    AutoRelay,
    AutoRelayConfig,
    HolePunchService,
    Reachability,
)

from ._availability import ALWAYS_ON, Availability, Decision, Rules
from ._probes import Probes, read_all, read_idle, read_machine, system_probes
from .status import STATUS_INTERVAL, STATUS_VERSION, write_status

log = logging.getLogger(__name__)

MAX_ADDRS = 16
RECEIPT_ID_SIZE = 16
RECORD_CHECK = 2.0
RECORD_MIN_GAP = 5.0
ANNOUNCE_TIMEOUT = 30.0
WITHDRAW_TIMEOUT = 5.0
EVIDENCE_TIMEOUT = 20.0
RESET_TIMEOUT = 1.0
IDLE_POLL = 0.5
"""Seconds between idle-time samples (2 Hz): the owner's return stops new work within this
and the probe's run time (a few milliseconds)."""
MACHINE_POLL = 5.0
"""Seconds between samples of power, heat and memory, which change slowly."""
SPEED_REFRESH = 900.0
"""Seconds between self-benchmarks after the first, each run only while nothing is served."""
SPEED_SAMPLES = 3
"""The advertised speed is the upper median of this many recent self-benchmarks: one taken
while the owner's other work ran (or one read late, which overstates decode) counts only
until the next two, and a lasting change shows after two."""

ReachabilityMode = Literal["auto", "public", "private"]
REACHABILITY_MODES: tuple[ReachabilityMode, ...] = ("auto", "public", "private")
"""auto: dial-backs decide, relay slots while private; public: no relays (a public IP or
a port forward); private: relay slots at once, without asking (known to be behind NAT)."""


@dataclass(slots=True)
class PeerSettings:
    """What an operator chooses; defaults suit a single Mac on a home network.

    `availability` defaults to always on, for the demo and tests; `dbloom peer` passes the
    owner's rules (idle time, power, heat, memory, hours).
    """

    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    attest: str = "dev"
    price_in: int = 0
    price_out: int = 0
    max_batch: int = 8
    max_queue: int = 16
    drain_timeout: float = 30.0
    benchmark: bool = True
    speed_refresh: float = SPEED_REFRESH
    harden: bool = True
    record_interval: float = 600.0
    log_proof: bytes | None = None
    """An inclusion bundle `read_log_proof` checked."""
    kad: KadConfig | None = None
    ledger: Path | None = None
    availability: Rules = field(default_factory=lambda: Rules(always_on=True))
    max_memory: int | None = None
    status_file: Path | None = None
    reachability: ReachabilityMode = "auto"


def _local_ips(family: socket.AddressFamily) -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def advertised_addrs(host: Host) -> list[str]:
    """Where others can dial us, at most MAX_ADDRS: bound addresses (a wildcard becomes
    loopback and this host's IPs), then circuit addresses through the relays we hold slots
    on, which a cut keeps (behind a NAT they are the ones that work)."""
    listened = set(host.listen_addrs)
    relayed = [str(a) for a in host.advertised_addrs if a not in listened][:MAX_ADDRS]
    direct = expand_addrs(map(str, host.listen_addrs))
    return direct[: MAX_ADDRS - len(relayed)] + relayed


def expand_addrs(addrs: Iterable[str]) -> list[str]:
    """`advertised_addrs` for addresses not yet listened on (a dry run)."""
    out: list[str] = []
    for addr in addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            ips = ["127.0.0.1", *_local_ips(socket.AF_INET)]
            out += [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in dict.fromkeys(ips)]
        elif addr.startswith("/ip6/::/"):
            ips = ["::1", *_local_ips(socket.AF_INET6)]
            out += [addr.replace("/ip6/::/", f"/ip6/{ip}/", 1) for ip in dict.fromkeys(ips)]
        else:
            out.append(addr)
    return out


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """A model to serve, resolved to a folder, with what loading and serving it costs."""

    id: str
    path: Path
    memory: int
    """Bytes needed to load it (weights, caches, activations)."""
    headroom: int
    """Of those, bytes that grow while serving (caches and activations)."""


def _resolve(ref: str, *, download: bool = True) -> tuple[str, Path]:
    """The model id we announce and the local folder: a folder's name, or the hub repo id."""
    path = resolve_model(ref, download=download)
    return (path.name if Path(ref).expanduser().is_dir() else ref), path


def _plan_model(ref: str, model_id: str | None, *, download: bool) -> ModelPlan:
    name, path = _resolve(ref, download=download)
    weights = sum(f.stat().st_size for f in path.glob(f"*{WEIGHT_SUFFIX}"))
    memory = estimate_memory(weights)
    return ModelPlan(id=model_id or name, path=path, memory=memory, headroom=memory - weights)


def _inspect(plan: ModelPlan) -> LocalModel:
    return inspect_model(plan.path, model_id=plan.id)


class LogProofError(ValueError):
    """`--log-proof` names a file that does not prove this software is logged."""


def read_log_proof(path: Path, measurement: bytes) -> bytes:
    """The inclusion bundle in `path`, checked against this software's `measurement`.

    Checked at start because a node shipping a broken proof would run, announce and
    then be refused by every client that requires logged software. Whose log keys
    to trust is the client's choice, so the tree head's signature is not checked here.
    """
    try:
        raw = read_bundle_file(path)
    except LogError as e:
        raise LogProofError(f"--log-proof: {e}") from None
    except OSError as e:
        raise LogProofError(f"--log-proof {path}: cannot read it ({e.strerror})") from None
    problems = [
        r for r in check_log_proof(raw, measurement, ()) if r.reason is not Reason.BAD_LOG_SIGNATURE
    ]
    if problems:
        raise LogProofError(f"--log-proof {path}: {problems[0].detail}")
    return raw


def check_max_memory(plans: Sequence[ModelPlan], max_memory: int | None) -> None:
    """Refuse models whose estimated memory together exceeds the owner's limit."""
    total = sum(p.memory for p in plans)
    if max_memory is not None and total > max_memory:
        raise InsufficientMemory(
            f"the models need about {total / 2**30:.2f} GiB, above the "
            f"{max_memory / 2**30:.2f} GiB the owner allows (max_memory)"
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """What `run()` would serve and announce, resolved without loading or listening."""

    models: tuple[ModelPlan, ...]
    record: NodeRecord


class PeerNode:
    """One serving peer; see the module docstring for its lifecycle."""

    def __init__(
        self,
        identity: KeyPair,
        settings: PeerSettings,
        *,
        provider: EvidenceProvider | None = None,
        model_ids: dict[str, str] | None = None,
        probes: Probes | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.provider = provider or DevProvider(identity)
        self.model_ids = model_ids or {}
        self.probes = probes
        self.host: Host | None = None
        self.dht: KademliaDHT | None = None
        self.autorelay: AutoRelay | None = None
        self.holepunch: HolePunchService | None = None
        self.pool: EnginePool | None = None
        self.record: NodeRecord | None = None
        self.speed_samples: dict[str, deque[Speed]] = {}
        """Each model's recent self-benchmarks, oldest first."""
        self._benchmark: trio.CancelScope | None = None
        self.posture = Posture()
        self.measurement = b""
        self.status = "starting"
        self.ledger: Ledger | None = None
        self.receipts: ReceiptService | None = None
        self.availability = Availability(settings.availability)
        self.decision: Decision = ALWAYS_ON
        self.attestation = "not checked yet"
        self.challenges = 0
        self.started_ms = int(time.time() * 1000)
        self.offers: tuple[ModelOffer, ...] = ()
        self._keys: list[bytes] = []
        self._stop = trio.Event()
        self._published_at = -1e9
        self._publish_lock = trio.Lock()
        self._requests: set[trio.CancelScope] = set()
        self._serving = False
        self._transition: trio.CancelScope | None = None

    @property
    def peer_id(self) -> str:
        return str(self.identity.peer_id)

    @property
    def speeds(self) -> dict[str, Speed]:
        """What the offers advertise: see `SPEED_SAMPLES`."""
        return {model: _typical(samples) for model, samples in self.speed_samples.items()}

    def request_stop(self) -> None:
        """Begin the graceful shutdown (Ctrl-C)."""
        self._stop.set()
        self._stop_benchmark()

    async def plan(self) -> Plan:
        """Resolve models (cached ones only), digests, measurement and the record `run()`
        would publish, without loading a model, listening or announcing (`--dry-run`)."""
        s = self.settings
        plans = await self._plan_models(download=False)
        infos = [(await trio.to_thread.run_sync(_inspect, p)).info for p in plans]
        self.measurement = measure_software().digest
        offers = tuple(
            ModelOffer(
                id=m.id,
                digest=m.digest,
                context_length=m.context_length,
                decode_tps=0.0,
                prefill_tps=0.0,
                price_in=s.price_in,
                price_out=s.price_out,
            )
            for m in infos
        )
        record = NodeRecord(
            addrs=tuple(expand_addrs(s.listen)[:MAX_ADDRS]),
            models=offers,
            max_batch=s.max_batch * len(plans),
            active=0,
            queued=0,
            attest_kind=self.provider.kind,
            measurement=self.measurement.hex(),
            updated_ms=int(time.time() * 1000),
        )
        return Plan(models=tuple(plans), record=record)

    async def _plan_models(self, *, download: bool) -> list[ModelPlan]:
        plans = []
        for ref in self.settings.models:
            plan = partial(_plan_model, ref, self.model_ids.get(ref), download=download)
            plans.append(await trio.to_thread.run_sync(plan))
        check_max_memory(plans, self.settings.max_memory)
        return plans

    async def run(
        self, *, task_status: trio.TaskStatus[PeerNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        self.posture = harden_process() if s.harden else read_posture()
        self.measurement = measure_software().digest
        async with AsyncExitStack() as stack:
            if s.ledger is not None:
                self.ledger = stack.enter_context(Ledger.open(s.ledger))
            self.status = "loading models"
            plans = await self._plan_models(download=True)
            self.availability = Availability(
                replace(s.availability, memory_need=sum(p.headroom for p in plans))
            )
            engines = {}
            for plan in plans:
                engines[plan.id] = await stack.enter_async_context(
                    MLXEngine(
                        plan.path, model_id=plan.id, max_batch=s.max_batch, max_queue=s.max_queue
                    )
                )
            self.pool = pool = EnginePool(engines)
            if s.benchmark:
                self.status = "measuring speed"
                for model_id, engine in engines.items():
                    self.speed_samples[model_id] = deque(
                        [await measure_speed(engine, model_id)], maxlen=SPEED_SAMPLES
                    )
            infos = await pool.models()
            attester = NodeAttester(
                key=self.identity,
                provider=self.provider,
                measurement=self.measurement,
                models={m.id: bytes.fromhex(m.digest) for m in infos},
                posture=self.posture,
                log_bundle=s.log_proof,
            )
            self.status = "checking attestation"
            self.attestation = await _check_attestation(attester)
            # SO_REUSEPORT lets hole punches dial from the port peers were told to dial
            tcp = TcpTransport(reuseport=True)
            host = self.host = await stack.enter_async_context(
                open_host(
                    self.identity, listen=[Multiaddr.parse(a) for a in s.listen], transports=[tcp]
                )
            )

            async def attest_handler(stream: NetStream) -> None:
                self.challenges += 1
                await serve_attest(stream, attester)

            host.set_stream_handler(ATTEST_PROTOCOL, attest_handler)
            host.set_stream_handler(INFER_PROTOCOL, self._infer_handler)
            nursery = await stack.enter_async_context(trio.open_nursery())
            kad = s.kad or KadConfig()
            kad = replace(
                kad, mode="server", bootstrap=tuple(Multiaddr.parse(b) for b in s.bootstrap)
            )
            dht = self.dht = KademliaDHT(host, kad)
            await nursery.start(dht.run)
            await self._start_reachability(nursery, host, dht, tcp)
            gossip = Gossip(host)
            await nursery.start(gossip.run)
            if self.ledger is not None:
                self.receipts = ReceiptService(gossip, self.ledger)
                await nursery.start(self.receipts.run)
            self.status = "announcing"
            speeds = self.speeds
            self.offers = tuple(
                ModelOffer(
                    id=m.id,
                    digest=m.digest,
                    context_length=m.context_length,
                    decode_tps=speeds.get(m.id, Speed(0.0, 0.0)).decode_tps,
                    prefill_tps=speeds.get(m.id, Speed(0.0, 0.0)).prefill_tps,
                    price_in=s.price_in,
                    price_out=s.price_out,
                )
                for m in infos
            )
            self._keys = [provider_key(model_provider_key(m.id)) for m in infos]
            self._keys.append(provider_key(DIRECTORY_KEY))
            probes = None if s.availability.always_on else (self.probes or system_probes())
            if probes is not None:
                self.decision = self.availability.update(
                    await read_all(probes), trio.current_time()
                )
            self._serving = self.decision.serve
            if self._serving:
                await self._announce()
                self.status = "serving"
            else:
                log.info("paused at start: %s", "; ".join(self.decision.reasons))
                pool.drain()
                await self._publish_current()
                self.status = "paused"
            nursery.start_soon(self._keep_record_fresh)
            if s.benchmark:
                nursery.start_soon(self._keep_speeds_current)
            if s.status_file is not None:
                nursery.start_soon(self._keep_status_file, s.status_file)
            watching = trio.CancelScope()
            if probes is not None:
                nursery.start_soon(self._watch, probes, watching)
            task_status.started(self)
            await self._stop.wait()
            watching.cancel()
            await self._shutdown()
            if s.status_file is not None:
                await trio.to_thread.run_sync(write_status, s.status_file, self.snapshot())
            nursery.cancel_scope.cancel()

    async def _start_reachability(
        self, nursery: trio.Nursery, host: Host, dht: KademliaDHT, tcp: TcpTransport
    ) -> None:
        """Dial-backs for others, hole punching, and relay slots unless we are public."""
        AutoNatService(host)
        self.holepunch = HolePunchService(host, tcp)
        await nursery.start(self.holepunch.run)
        mode = self.settings.reachability
        if mode == "public":
            return
        if mode == "private":
            # the operator's word stands in for dial-backs: no probes, private from the start
            self.autorelay = AutoRelay(host, dht, config=AutoRelayConfig(max_probes=0))
            self.autorelay.tracker.status = Reachability.PRIVATE
        else:
            self.autorelay = AutoRelay(host, dht)
        await nursery.start(self.autorelay.run)

    def reachability(self) -> str:
        """The verdict for status displays: how others reach us, and through how many relays."""
        if self.autorelay is None:
            return "public (no relays: --reachability public)"
        relays = len(self.autorelay.client.reservations)
        verdict = self.autorelay.reachability.value
        return f"{verdict}, {relays} relay{'s' * (relays != 1)}" if relays else verdict

    async def _infer_handler(self, stream: NetStream) -> None:
        """Serve one request; a pause that outlasts the deadline hands it back (a reset)."""
        assert self.pool is not None
        with trio.CancelScope() as scope:
            self._requests.add(scope)
            try:
                await serve_infer(
                    stream,
                    self.pool,
                    sign_receipt=self._sign_receipt,
                    client=str(stream.peer_id),
                )
            finally:
                self._requests.discard(scope)
        if scope.cancelled_caught:
            with trio.move_on_after(RESET_TIMEOUT):
                await stream.reset()

    def _sign_receipt(
        self, request: GenerateRequest, final: Final, token_ids: Sequence[int], started_ms: int
    ) -> bytes | None:
        """The node's half of the receipt for a finished request that names an account."""
        offer = next((o for o in self.offers if o.id == request.model), None)
        if offer is None or request.account is None or request.request_id is None:
            return None
        try:
            receipt_id = bytes.fromhex(request.request_id)
        except ValueError:
            return None
        if len(receipt_id) != RECEIPT_ID_SIZE:
            return None
        finished_ms = max(started_ms, int(time.time() * 1000))
        log.info(
            "request %s: %d prompt and %d completion tokens in %d ms",
            receipt_id.hex(),
            final.prompt_tokens,
            final.completion_tokens,
            finished_ms - started_ms,
        )
        body = ReceiptBody(
            id=receipt_id,
            node=self.identity.peer_id.multihash,
            client=request.account,
            model=request.model,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            price_in=offer.price_in,
            price_out=offer.price_out,
            amount=compute_amount(
                final.prompt_tokens, final.completion_tokens, offer.price_in, offer.price_out
            ),
            started_ms=started_ms,
            finished_ms=finished_ms,
            tokens_digest=tokens_digest(token_ids, request.salt or b""),
        )
        return sign_as_node(body, self.identity)

    def earnings(self) -> tuple[int, int]:
        """(receipts, operator share in micro-units) for this node in the current epoch."""
        if self.ledger is None:
            return 0, 0
        epoch = self.ledger.epoch_of(int(time.time() * 1000))
        for payout in self.ledger.payouts(epoch).operators:
            if payout.node == self.identity.peer_id:
                return payout.receipts, payout.operator
        return 0, 0

    def current_record(self) -> NodeRecord:
        """The record as of now; `draining` while paused or stopping."""
        assert self.host is not None and self.pool is not None
        load = self.pool.load()
        active = load.active
        if self._benchmark is not None:  # our own benchmark: no reason to steer work away
            active = max(0, active - 1)
        return NodeRecord(
            addrs=tuple(advertised_addrs(self.host)[:MAX_ADDRS]),
            models=self.offers,
            max_batch=load.max_batch,
            active=active,
            queued=load.queued,
            attest_kind=self.provider.kind,
            measurement=self.measurement.hex(),
            updated_ms=int(time.time() * 1000),
            draining=self.pool.draining,
        )

    def snapshot(self) -> dict[str, Any]:
        """What `dbloom status` shows: state, availability, counts; never request data."""
        pool = self.pool
        receipts, earned = self.earnings()
        return {
            "v": STATUS_VERSION,
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "started_ms": self.started_ms,
            "updated_ms": int(time.time() * 1000),
            "state": self.status,
            "availability": {
                "serve": self.decision.serve,
                "checks": [
                    {"name": c.name, "state": c.state, "text": c.text} for c in self.decision.checks
                ],
            },
            "models": [o.id for o in self.offers],
            "requests": pool.requests_total if pool else 0,
            "tokens": pool.tokens_total if pool else 0,
            "in_flight": pool.in_flight if pool else 0,
            "earnings": {"receipts": receipts, "micro": earned},
            "attestation": {"kind": self.provider.kind, "status": self.attestation_status()},
            "reachability": self.reachability(),
        }

    def attestation_status(self) -> str:
        return f"{self.attestation}; {self.challenges} challenges answered"

    async def _publish_current(self) -> None:
        """Publish the record as of now; one publication at a time, so none lands stale."""
        assert self.dht is not None
        async with self._publish_lock:
            record = self.record = self.current_record()
            self._published_at = trio.current_time()
            with trio.move_on_after(ANNOUNCE_TIMEOUT):
                stored = await self.dht.publish_node_record(record.encode())
                log.debug("node record stored at %d peers", stored)

    async def _announce(self) -> None:
        assert self.dht is not None
        dht = self.dht
        await self._publish_current()
        with trio.move_on_after(ANNOUNCE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for key in self._keys:
                    nursery.start_soon(dht.provide, key)

    def _withdraw(self) -> None:
        """Stop republishing our provider keys; remote copies lapse within the provider TTL."""
        assert self.dht is not None
        for key in self._keys:
            self.dht.stop_providing(key)

    async def _keep_record_fresh(self) -> None:
        """Republish when load or addresses change (a relay slot won or lost; at most every
        few seconds) or on the interval."""
        while True:
            await trio.sleep(RECORD_CHECK)
            since = trio.current_time() - self._published_at
            record = self.current_record()
            published = self.record
            changed = published is None or (
                record.active,
                record.queued,
                record.draining,
                record.addrs,
            ) != (published.active, published.queued, published.draining, published.addrs)
            if since >= self.settings.record_interval or (changed and since >= RECORD_MIN_GAP):
                await self._publish_current()

    async def _keep_speeds_current(self) -> None:
        """Benchmark again every `speed_refresh` seconds while nothing is served; when the
        advertised figure changes, the offers and the record follow it. A pause or a stop
        cancels a benchmark at once (the owner wants the machine back)."""
        assert self.pool is not None
        pool = self.pool
        while True:
            await trio.sleep(self.settings.speed_refresh)
            for model_id, engine in pool.engines.items():
                if not self._serving or pool.draining or pool.in_flight:
                    break
                served = pool.requests_total
                speed: Speed | None = None
                with trio.CancelScope() as self._benchmark:
                    try:
                        speed = await measure_speed(engine, model_id, warm_up=False)
                    except EngineError as e:  # the advertised figure stays; next time again
                        log.warning("%s: self-benchmark failed: %s", model_id, e)
                self._benchmark = None
                if speed is None or not self._serving or pool.draining:
                    break  # failed, cancelled, or it ran into a pause
                if pool.in_flight or pool.requests_total != served:
                    continue  # it shared the engine with a request: not a clean sample
                samples = self.speed_samples[model_id]
                before = _typical(samples)
                samples.append(speed)
                typical = _typical(samples)
                if typical != before:
                    log.info(
                        "%s: advertising %.1f tok/s decode, %.1f prefill (from the last %d "
                        "self-benchmarks)",
                        model_id,
                        typical.decode_tps,
                        typical.prefill_tps,
                        len(samples),
                    )
                    self.offers = tuple(
                        replace(o, decode_tps=typical.decode_tps, prefill_tps=typical.prefill_tps)
                        if o.id == model_id
                        else o
                        for o in self.offers
                    )
                    await self._publish_current()

    def _stop_benchmark(self) -> None:
        if self._benchmark is not None:
            self._benchmark.cancel()

    async def _keep_status_file(self, path: Path) -> None:
        while True:
            await trio.to_thread.run_sync(write_status, path, self.snapshot())
            await trio.sleep(STATUS_INTERVAL)

    async def _watch(self, probes: Probes, scope: trio.CancelScope) -> None:
        """Sample idle time every IDLE_POLL s (the rest every MACHINE_POLL s) and act on it."""
        with scope:
            machine = await read_machine(probes)
            async with trio.open_nursery() as nursery:

                async def refresh() -> None:
                    nonlocal machine
                    while True:
                        await trio.sleep(MACHINE_POLL)
                        machine = await read_machine(probes)

                nursery.start_soon(refresh)
                while True:
                    readings = replace(
                        machine, idle=await read_idle(probes), clock=probes.local_time()
                    )
                    self._decide(self.availability.update(readings, trio.current_time()), nursery)
                    await trio.sleep(IDLE_POLL)

    def _decide(self, decision: Decision, nursery: trio.Nursery) -> None:
        """Act on a change: stop admitting at once on pause; the rest runs as a transition
        that the next change cancels."""
        assert self.pool is not None
        self.decision = decision
        if decision.serve == self._serving:
            return
        self._serving = decision.serve
        if self._transition is not None:
            self._transition.cancel()
        scope = self._transition = trio.CancelScope()
        if decision.serve:
            log.info("serving again: %s", "; ".join(c.text for c in decision.checks))
            nursery.start_soon(self._transit, scope, self._resume)
        else:
            self.pool.drain()
            self._stop_benchmark()
            log.info("pausing: %s", "; ".join(decision.reasons))
            nursery.start_soon(self._transit, scope, self._pause)

    async def _transit(self, scope: trio.CancelScope, step: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await step()

    async def _pause(self) -> None:
        """Withdraw, let running requests finish within `drain_timeout`, hand back the rest."""
        assert self.pool is not None
        self.status = "pausing"
        self._withdraw()
        with trio.move_on_after(WITHDRAW_TIMEOUT):
            await self._publish_current()
        with trio.move_on_after(self.settings.drain_timeout):
            await self.pool.wait_idle()
        if self._requests:
            log.warning("handing back %d requests at the pause deadline", len(self._requests))
            for request in list(self._requests):
                request.cancel()
        self.status = "paused"

    async def _resume(self) -> None:
        assert self.pool is not None
        self.status = "resuming"
        self.pool.resume()
        await self._announce()
        self.status = "serving"

    async def _shutdown(self) -> None:
        assert self.pool is not None
        if self._transition is not None:
            self._transition.cancel()
        self.status = "draining"
        self.pool.drain()
        self._withdraw()
        with trio.move_on_after(WITHDRAW_TIMEOUT):
            await self._publish_current()
        with trio.move_on_after(self.settings.drain_timeout) as scope:
            await self.pool.wait_idle()
        if scope.cancelled_caught:
            log.warning("%d requests still running at the drain deadline", self.pool.in_flight)
        self.status = "stopped"


def _typical(samples: Iterable[Speed]) -> Speed:
    """The upper median prefill and decode rates of `samples`: see `SPEED_SAMPLES`."""
    samples = list(samples)
    return Speed(
        prefill_tps=statistics.median_high(x.prefill_tps for x in samples),
        decode_tps=statistics.median_high(x.decode_tps for x in samples),
    )


async def _check_attestation(attester: NodeAttester) -> str:
    """Produce evidence once for a throwaway nonce, so a broken provider shows at start."""
    try:
        with trio.fail_after(EVIDENCE_TIMEOUT):
            await attester.answer(secrets.token_bytes(32))
    except (AttestationError, OSError, trio.TooSlowError) as e:
        log.warning("cannot produce %s evidence: %s", attester.kind, e)
        return f"cannot produce evidence ({e or type(e).__name__})"
    return "evidence ok at start"
