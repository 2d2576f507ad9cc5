"""A serving peer, assembled: identity, engines, host, DHT, attestation and announcements.

`dbloom peer`, `dbloom demo` and the end-to-end tests all run this one class, so what the
demo shows is what an operator runs. Lifecycle: `run()` sets everything up, announces, and
then serves until `request_stop()`; it then stops announcing, refuses new requests (as
busy, so shims fail over), lets running ones finish within `drain_timeout`, and returns.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from dbloom.attest import (
    PROTOCOL_ID as ATTEST_PROTOCOL,
)
from dbloom.attest import (
    DevProvider,
    EvidenceProvider,
    NodeAttester,
    Posture,
    harden_process,
    measure_software,
    read_posture,
    serve_attest,
)
from dbloom.inference import (
    DIRECTORY_KEY,
    EnginePool,
    Final,
    GenerateRequest,
    MLXEngine,
    ModelOffer,
    NodeRecord,
    Speed,
    measure_speed,
    model_provider_key,
    resolve_model,
    serve_infer,
)
from dbloom.inference import (
    PROTOCOL_ID as INFER_PROTOCOL,
)
from dbloom.ledger import Ledger, ReceiptBody, compute_amount, sign_as_node, tokens_digest
from dbloom.ledger._service import ReceiptService
from dbloom.p2p import Host, KeyPair, Multiaddr, NetStream, open_host
from dbloom.p2p.gossip import Gossip
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key

log = logging.getLogger(__name__)

MAX_ADDRS = 16
RECEIPT_ID_SIZE = 16
RECORD_CHECK = 2.0
RECORD_MIN_GAP = 5.0
ANNOUNCE_TIMEOUT = 30.0


@dataclass(slots=True)
class PeerSettings:
    """What an operator chooses; defaults suit a single Mac on a home network."""

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
    harden: bool = True
    record_interval: float = 600.0
    log_proof: Path | None = None
    kad: KadConfig | None = None
    ledger: Path | None = None


def _local_ips(family: socket.AddressFamily) -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def advertised_addrs(host: Host) -> list[str]:
    """Listen addresses others can dial: a wildcard becomes loopback and this host's IPs.

    (Reachability from outside a home network is the relay issue's job.)
    """
    out: list[str] = []
    for addr in map(str, host.listen_addrs):
        if addr.startswith("/ip4/0.0.0.0/"):
            ips = ["127.0.0.1", *_local_ips(socket.AF_INET)]
            out += [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in dict.fromkeys(ips)]
        elif addr.startswith("/ip6/::/"):
            ips = ["::1", *_local_ips(socket.AF_INET6)]
            out += [addr.replace("/ip6/::/", f"/ip6/{ip}/", 1) for ip in dict.fromkeys(ips)]
        else:
            out.append(addr)
    return out


def _resolve(ref: str) -> tuple[str, Path]:
    """The model id we announce and the local folder: a folder's name, or the hub repo id."""
    path = resolve_model(ref)
    return (path.name if Path(ref).expanduser().is_dir() else ref), path


class PeerNode:
    """One serving peer; see the module docstring for its lifecycle."""

    def __init__(
        self,
        identity: KeyPair,
        settings: PeerSettings,
        *,
        provider: EvidenceProvider | None = None,
        model_ids: dict[str, str] | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.provider = provider or DevProvider(identity)
        self.model_ids = model_ids or {}
        self.host: Host | None = None
        self.dht: KademliaDHT | None = None
        self.pool: EnginePool | None = None
        self.record: NodeRecord | None = None
        self.speeds: dict[str, Speed] = {}
        self.posture = Posture()
        self.measurement = b""
        self.status = "starting"
        self.ledger: Ledger | None = None
        self.receipts: ReceiptService | None = None
        self._stop = trio.Event()
        self._published_at = -1e9

    @property
    def peer_id(self) -> str:
        return str(self.identity.peer_id)

    def request_stop(self) -> None:
        """Begin the graceful shutdown (Ctrl-C)."""
        self._stop.set()

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
            engines = {}
            for ref in s.models:
                model_id, path = await trio.to_thread.run_sync(_resolve, ref)
                model_id = self.model_ids.get(ref, model_id)
                engines[model_id] = await stack.enter_async_context(
                    MLXEngine(path, model_id=model_id, max_batch=s.max_batch, max_queue=s.max_queue)
                )
            self.pool = pool = EnginePool(engines)
            if s.benchmark:
                self.status = "measuring speed"
                for model_id, engine in engines.items():
                    self.speeds[model_id] = await measure_speed(engine, model_id)
            infos = await pool.models()
            attester = NodeAttester(
                key=self.identity,
                provider=self.provider,
                measurement=self.measurement,
                models={m.id: bytes.fromhex(m.digest) for m in infos},
                posture=self.posture,
                log_bundle=s.log_proof.read_bytes() if s.log_proof else None,
            )
            host = self.host = await stack.enter_async_context(
                open_host(self.identity, listen=[Multiaddr.parse(a) for a in s.listen])
            )

            async def attest_handler(stream: NetStream) -> None:
                await serve_attest(stream, attester)

            signer = self._sign_receipt

            async def infer_handler(stream: NetStream) -> None:
                await serve_infer(stream, pool, sign_receipt=signer)

            host.set_stream_handler(ATTEST_PROTOCOL, attest_handler)
            host.set_stream_handler(INFER_PROTOCOL, infer_handler)
            nursery = await stack.enter_async_context(trio.open_nursery())
            kad = s.kad or KadConfig()
            kad = replace(
                kad, mode="server", bootstrap=tuple(Multiaddr.parse(b) for b in s.bootstrap)
            )
            dht = self.dht = KademliaDHT(host, kad)
            await nursery.start(dht.run)
            gossip = Gossip(host)
            await nursery.start(gossip.run)
            if self.ledger is not None:
                self.receipts = ReceiptService(gossip, self.ledger)
                await nursery.start(self.receipts.run)
            self.status = "announcing"
            self.offers = tuple(
                ModelOffer(
                    id=m.id,
                    digest=m.digest,
                    context_length=m.context_length,
                    decode_tps=self.speeds.get(m.id, Speed(0.0, 0.0)).decode_tps,
                    prefill_tps=self.speeds.get(m.id, Speed(0.0, 0.0)).prefill_tps,
                    price_in=s.price_in,
                    price_out=s.price_out,
                )
                for m in infos
            )
            self._keys = [provider_key(model_provider_key(m.id)) for m in infos]
            self._keys.append(provider_key(DIRECTORY_KEY))
            await self._announce()
            nursery.start_soon(self._keep_record_fresh)
            self.status = "serving"
            task_status.started(self)
            await self._stop.wait()
            await self._shutdown()
            nursery.cancel_scope.cancel()

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
            finished_ms=max(started_ms, int(time.time() * 1000)),
            tokens_digest=tokens_digest(token_ids),
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

    def current_record(self, *, draining: bool = False) -> NodeRecord:
        assert self.host is not None and self.pool is not None
        load = self.pool.load()
        return NodeRecord(
            addrs=tuple(advertised_addrs(self.host)[:MAX_ADDRS]),
            models=self.offers,
            max_batch=load.max_batch,
            active=load.active,
            queued=load.queued,
            attest_kind=self.provider.kind,
            measurement=self.measurement.hex(),
            updated_ms=int(time.time() * 1000),
            draining=draining,
        )

    async def _publish(self, record: NodeRecord) -> None:
        assert self.dht is not None
        self.record = record
        self._published_at = trio.current_time()
        with trio.move_on_after(ANNOUNCE_TIMEOUT):
            stored = await self.dht.publish_node_record(record.encode())
            log.debug("node record stored at %d peers", stored)

    async def _announce(self) -> None:
        assert self.dht is not None
        dht = self.dht
        await self._publish(self.current_record())
        with trio.move_on_after(ANNOUNCE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for key in self._keys:
                    nursery.start_soon(dht.provide, key)

    async def _keep_record_fresh(self) -> None:
        """Republish when load changes (at most every few seconds) or on the interval."""
        while True:
            await trio.sleep(RECORD_CHECK)
            since = trio.current_time() - self._published_at
            record = self.current_record()
            published = self.record
            changed = published is None or (record.active, record.queued) != (
                published.active,
                published.queued,
            )
            if since >= self.settings.record_interval or (changed and since >= RECORD_MIN_GAP):
                await self._publish(record)

    async def _shutdown(self) -> None:
        assert self.dht is not None and self.pool is not None
        self.status = "draining"
        self.pool.drain()
        for key in self._keys:
            self.dht.stop_providing(key)
        with trio.move_on_after(5):
            await self._publish(self.current_record(draining=True))
        with trio.move_on_after(self.settings.drain_timeout) as scope:
            await self.pool.wait_idle()
        if scope.cancelled_caught:
            log.warning("%d requests still running at the drain deadline", self.pool.in_flight)
        self.status = "stopped"
