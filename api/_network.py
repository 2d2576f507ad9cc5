"""The shim's engine: requests go to attested nodes found in the DHT.

`NetworkEngine` implements `dbloom.inference.Engine`, so the HTTP layer cannot tell it
from a local engine. For each request it takes the model's providers and their node
records, ranks them (`Router`), and tries them in order: connect (pooled by the host),
attest (cached per connection; nothing but a nonce is sent before the verdict), open
`/dbloom/infer`, and wait for the first item. A node that fails before the first item is
replaced by the next candidate; after it, errors reach the HTTP layer, which ends the
stream with an error event.

A provider lookup walks the DHT, so its answer is kept for `PROVIDERS_TTL` and shared:
concurrent requests wait for one lookup, and once the answer is stale requests go on
using it while one lookup refreshes it (in the background under `run`). A connection
carries a bounded number of streams, so requests to one node beyond
`streams_per_node` wait for a slot, under their deadline, instead of failing; when every
known node is full, the model is looked up again at once, in case more nodes serve it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import trio

from dbloom.attest import AttestationError, AttestationRefused, Attestor
from dbloom.inference import (
    DEFAULT_MAX_REQUEST,
    DIRECTORY_KEY,
    PROTOCOL_ID,
    Chunk,
    DecodeError,
    Engine,
    EngineBusy,
    EngineError,
    EngineLoad,
    Final,
    GenerateRequest,
    Generation,
    InvalidRequest,
    ModelInfo,
    NodeRecord,
    RequestTimeout,
    UnknownModel,
    decode_node_record,
    encode_message,
    infer,
    model_provider_key,
)
from dbloom.ledger._receipt import (
    ReceiptError,
    Terms,
    countersign,
    decode_node_receipt,
    disagreements,
)
from dbloom.p2p import (
    Connection,
    DialError,
    HostClosed,
    KeyPair,
    LocalProtocolError,
    Multiaddr,
    MultiaddrError,
    PeerId,
    ProtocolError,
)
from dbloom.p2p.kad import KademliaDHT, node_record_key, open_node_record, provider_key

from ._errors import REQUEST_TOO_LARGE, NoNodeAvailable
from ._routing import Candidate, Router

log = logging.getLogger(__name__)

RECORD_TTL = 15.0
MAX_CACHED_RECORDS = 4096
"""Node records kept; past this, the expired ones go (they would be fetched again anyway),
so peers that came and went over months do not pile up in a long-running shim."""
MODELS_TTL = 10.0
PROVIDERS_TTL = 5.0
"""How long a provider lookup's answer is used before a new lookup replaces it."""
SATURATED_REFRESH = 1.0
"""How soon a list whose nodes are all at their stream limit is looked up again."""
LOOKUP_TIMEOUT = 10.0
FIRST_ITEM_TIMEOUT = 60.0
QUEUE_TIMEOUT = 60.0
"""How long a request may wait for a stream slot (on top of FIRST_ITEM_TIMEOUT)."""
MAX_ATTEMPTS = 3
PROVIDERS_WANTED = 20
MAX_PROVIDER_KEYS = 1024
"""Provider answers kept, one per model asked for: a client naming ever new models cannot
grow the shim without bound. The oldest answer no lookup is refreshing goes first."""
STREAM_RESERVE = 32
"""Streams of a connection left to everything but inference (attestation, Kademlia,
gossip, identify), so inference can never starve them."""
PING_INTERVAL = 10.0
PING_TIMEOUT = 5.0
RECEIPT_ID_SIZE = 16
SALT_SIZE = 16
_Found = tuple[PeerId, NodeRecord, tuple[Multiaddr, ...]]
_NODE_FAILURES = (
    AttestationError,
    DialError,
    ProtocolError,
    EngineError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)
_LOOKUP_FAILURES = (
    HostClosed,
    ProtocolError,
    DialError,
    OSError,
    EOFError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


@dataclass(eq=False, slots=True)
class _Lookup:
    """One provider lookup in flight; every request that needs its answer waits on it."""

    done: trio.Event = field(default_factory=trio.Event)
    finished: bool = False
    error: str | None = None


@dataclass(slots=True)
class _Providers:
    """The last answer for one provider key, and the lookup refreshing it, if any."""

    found: list[_Found] = field(default_factory=list)
    at: float = -math.inf
    pending: _Lookup | None = None
    candidates: list[Candidate] | None = None
    """`found` as candidates, built once per answer: parsing addresses costs 5-20 µs each."""


class NetworkEngine(Engine):
    """Routes each generation to the best attested node; see the module docstring."""

    def __init__(
        self,
        dht: KademliaDHT,
        attestor: Attestor,
        router: Router,
        *,
        first_item_timeout: float = FIRST_ITEM_TIMEOUT,
        queue_timeout: float = QUEUE_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
        account: KeyPair | None = None,
        on_receipt: Callable[[bytes], None] | None = None,
        providers_ttl: float = PROVIDERS_TTL,
        lookup_timeout: float = LOOKUP_TIMEOUT,
        streams_per_node: int | None = None,
    ) -> None:
        self.dht = dht
        self.host = dht.host
        self.attestor = attestor
        self.router = router
        self.first_item_timeout = first_item_timeout
        self.queue_timeout = queue_timeout
        self.max_attempts = max_attempts
        self.in_flight = 0
        self.account = account
        self.on_receipt = on_receipt
        self.providers_ttl = providers_ttl
        self.lookup_timeout = lookup_timeout
        self.streams_per_node = streams_per_node or max(
            1, self.host.config.yamux.max_streams - STREAM_RESERVE
        )
        self.lookups = 0
        self.receipts = {"ok": 0, "disputed": 0, "refused": 0, "missing": 0}
        self._records: dict[PeerId, tuple[float, NodeRecord | None]] = {}
        self._models: tuple[float, tuple[ModelInfo, ...]] | None = None
        self._providers: dict[str, _Providers] = {}
        self._slots: dict[PeerId, trio.Semaphore] = {}
        self._pinged: dict[Connection, float] = {}
        self._nursery: trio.Nursery | None = None
        self.host.add_connection_listener(self._on_connection)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do the engine's background work (refreshing stale provider lists, pinging
        the nodes in use) until cancelled; start it with `nursery.start(engine.run)`. Without
        it a stale list is refreshed by the request that finds it, and no round trip is
        measured."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def record(self, peer: PeerId) -> NodeRecord | None:
        """The peer's node record from the DHT (cached briefly); None if absent or invalid."""
        now = trio.current_time()
        cached = self._records.get(peer)
        if cached is not None and now - cached[0] < RECORD_TTL:
            return cached[1]
        record = None
        raw = await self.dht.get(node_record_key(peer), quorum=1)
        if raw is not None:
            try:
                envelope = open_node_record(raw)
                if envelope.peer_id == peer:
                    record = decode_node_record(envelope.data)
            except (DecodeError, ValueError) as e:
                log.info("ignoring the node record of %s: %s", peer.short(), e)
        self._records[peer] = (now, record)
        if len(self._records) > MAX_CACHED_RECORDS:
            self._records = {p: c for p, c in self._records.items() if now - c[0] < RECORD_TTL}
        return record

    @property
    def cached_records(self) -> int:
        """How many node records the cache holds, so its bound can be checked from outside."""
        return len(self._records)

    async def _records_for(self, key: str) -> list[_Found]:
        self.lookups += 1
        providers = await self.dht.find_providers_list(provider_key(key), PROVIDERS_WANTED)
        found: list[_Found] = []

        async def fetch(peer: PeerId, addrs: tuple[Multiaddr, ...]) -> None:
            record = await self.record(peer)
            if record is not None:
                found.append((peer, record, addrs))

        async with trio.open_nursery() as nursery:
            for info in providers:
                if info.peer_id != self.host.peer_id:
                    nursery.start_soon(fetch, info.peer_id, info.addrs)
        return found

    async def _found(self, key: str) -> _Providers:
        """The answer for `key` (providers with their records), cached while it is fresh.

        A stale non-empty answer is served while one lookup refreshes it; otherwise the
        request waits for the lookup, which concurrent requests share. A failed lookup
        with nothing to fall back on raises NoNodeAvailable: the model may well exist.
        """
        entry = self._providers.get(key)
        if entry is None:
            self._make_room()
            entry = self._providers[key] = _Providers()
        while True:
            if entry.found and (
                trio.current_time() - entry.at < self.providers_ttl or entry.pending is not None
            ):
                return entry
            lookup = entry.pending
            if lookup is None:
                lookup = entry.pending = _Lookup()
                if entry.found and self._nursery is not None:
                    self._nursery.start_soon(self._refresh, key, entry)
                    return entry
                await self._refresh(key, entry)
            else:
                await lookup.done.wait()
            if lookup.finished:
                break
        if lookup.error is not None and not entry.found:
            raise NoNodeAvailable(lookup.error)
        return entry

    async def _refresh(self, key: str, entry: _Providers) -> None:
        """Run the lookup `entry.pending` stands for and record its outcome there."""
        lookup = entry.pending
        assert lookup is not None
        try:
            try:
                with trio.fail_after(self.lookup_timeout):
                    found = await self._records_for(key)
            except _LOOKUP_FAILURES as e:
                lookup.error = f"the DHT lookup of {key!r} failed: {e or type(e).__name__}"
                log.info("%s", lookup.error)
            else:
                # a new answer: its candidates are built at the next request
                entry.found, entry.at, entry.candidates = found, trio.current_time(), None
            lookup.finished = True
        finally:
            entry.pending = None
            lookup.done.set()

    def _make_room(self) -> None:
        if len(self._providers) < MAX_PROVIDER_KEYS:
            return
        for key, entry in self._providers.items():
            if entry.pending is None:
                del self._providers[key]
                return

    async def candidates(self, model: str) -> list[Candidate]:
        """Every node that announced `model` and published a record offering it."""
        entry = await self._found(model_provider_key(model))
        if entry.candidates is not None:
            return list(entry.candidates)
        out = []
        for peer, record, addrs in entry.found:
            offer = record.offer(model)
            if offer is None:
                continue
            dialable = list(addrs)
            for text in record.addrs:
                try:
                    dialable.append(Multiaddr.parse(text))
                except MultiaddrError:
                    continue
            out.append(Candidate(peer=peer, record=record, offer=offer, addrs=tuple(dialable)))
        entry.candidates = out
        return list(out)

    async def models(self) -> tuple[ModelInfo, ...]:
        """Models offered by at least one node the policy accepts (cached a few seconds)."""
        now = trio.current_time()
        if self._models is not None and now - self._models[0] < MODELS_TTL:
            return self._models[1]
        seen: dict[str, ModelInfo] = {}
        for peer, record, addrs in (await self._found(DIRECTORY_KEY)).found:
            for offer in record.models:
                candidate = Candidate(peer=peer, record=record, offer=offer, addrs=addrs)
                if offer.id in seen or self.router.why_not(candidate, now) is not None:
                    continue
                seen[offer.id] = ModelInfo(
                    id=offer.id,
                    digest=offer.digest,
                    context_length=offer.context_length,
                    vocab_size=0,
                    parameters=0,
                )
        models = tuple(sorted(seen.values(), key=lambda m: m.id))
        self._models = (now, models)
        return models

    def look_further(self, model: str) -> None:
        """Every known node of `model` is at its stream limit: look for more nodes now (in
        the background, at most every `SATURATED_REFRESH`) rather than when the list expires."""
        key = model_provider_key(model)
        entry = self._providers.get(key)
        if (
            entry is None
            or entry.pending is not None
            or self._nursery is None
            or trio.current_time() - entry.at < SATURATED_REFRESH
        ):
            return
        entry.pending = _Lookup()
        self._nursery.start_soon(self._refresh, key, entry)

    def slot(self, peer: PeerId) -> trio.Semaphore:
        """The inference streams this shim may have open to `peer` at once."""
        slots = self._slots.get(peer)
        if slots is None:
            slots = self._slots[peer] = trio.Semaphore(self.streams_per_node)
        return slots

    def measure(self, conn: Connection) -> None:
        """Ping `conn` in the background unless it was pinged in the last `PING_INTERVAL`:
        the router's round-trip times stay current, and each costs one yamux ping."""
        now = trio.current_time()
        if self._nursery is None or now - self._pinged.get(conn, -math.inf) < PING_INTERVAL:
            return
        self._pinged[conn] = now
        self._nursery.start_soon(self._ping, conn)

    async def _ping(self, conn: Connection) -> None:
        try:
            rtt = await conn.muxer.ping(PING_TIMEOUT)
        except (trio.TooSlowError, trio.ClosedResourceError):
            return
        self.router.measured(conn.peer_id, rtt)

    def _on_connection(self, conn: Connection, opened: bool) -> None:
        if not opened:
            self._pinged.pop(conn, None)

    def generate(self, request: GenerateRequest, *, client: str | None = None) -> Generation:
        """`client` is unused: the shim is the only client of the nodes it asks."""
        return _RemoteGeneration(self, request)

    def load(self) -> EngineLoad:
        return EngineLoad(active=self.in_flight, queued=0, max_batch=0, max_queue=0)


class _RemoteGeneration(Generation):
    """One request's life on the network: choose, attest, stream, fail over."""

    def __init__(self, engine: NetworkEngine, request: GenerateRequest) -> None:
        self._engine = engine
        self._receipt_id = secrets.token_bytes(RECEIPT_ID_SIZE)
        self._salt = secrets.token_bytes(SALT_SIZE)
        if engine.account is not None:
            request = replace(
                request,
                request_id=self._receipt_id.hex(),
                account=engine.account.public_key.data,
                salt=self._salt,
            )
        self._request = request
        self._terms: Terms | None = None
        self._token_ids: list[int] = []
        self._stream: AsyncIterator[Chunk | Final] | None = None
        self._first: Chunk | Final | None = None
        self._peer: PeerId | None = None
        self._slot: trio.Semaphore | None = None
        self._deadline = trio.CancelScope()
        self._queued_out = False
        self._started = False
        self._closed = False
        self._counted = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        engine = self._engine
        with trio.move_on_after(engine.first_item_timeout) as self._deadline:
            await self._connect()
        if self._deadline.cancelled_caught:
            if self._queued_out:
                raise RequestTimeout(
                    f"no stream to a node came free within {engine.queue_timeout:.0f} s"
                )
            raise RequestTimeout(
                f"no node produced a first token within {engine.first_item_timeout:.0f} s"
            )
        engine.in_flight += 1
        self._counted = True

    async def _connect(self) -> None:
        engine, request = self._engine, self._request
        try:
            encode_message(request, max_size=DEFAULT_MAX_REQUEST)
        except LocalProtocolError as e:  # no node would take it: not "busy", and no retry
            raise InvalidRequest(f"{REQUEST_TOO_LARGE} ({e})") from None
        candidates = await engine.candidates(request.model)
        if not candidates:
            if await engine.models():
                raise UnknownModel(f"no node serves the model {request.model!r}")
            raise NoNodeAvailable("no node is reachable: is the network bootstrapped?")
        ordered = engine.router.order(candidates, trio.current_time())
        if not ordered:
            reasons = {engine.router.why_not(c, trio.current_time()) for c in candidates}
            raise NoNodeAvailable(
                f"no node serving {request.model!r} passes the policy ("
                + "; ".join(sorted(r for r in reasons if r))
                + ")"
            )
        # A node with a free stream slot before one where the request would wait.
        ordered.sort(key=lambda c: engine.slot(c.peer).value == 0)
        if engine.slot(ordered[0].peer).value == 0:
            engine.look_further(request.model)
        problems: list[str] = []
        busy = 0
        for candidate in ordered[: engine.max_attempts]:
            try:
                await self._try(candidate)
                return
            except InvalidRequest:
                raise
            except EngineBusy:
                busy += 1
                problems.append(f"{candidate.peer.short()}: busy")
            except LocalProtocolError as e:  # our side of the connection is full: not its fault
                busy += 1
                problems.append(f"{candidate.peer.short()}: {e}")
            except AttestationRefused as e:
                engine.router.refused(candidate.peer, trio.current_time())
                problems.append(f"{candidate.peer.short()}: {e}")
                log.warning("refused %s: %s", candidate.peer.short(), e)
            except _NODE_FAILURES as e:
                engine.router.failed(candidate.peer, trio.current_time())
                problems.append(f"{candidate.peer.short()}: {e or type(e).__name__}")
                log.info("node %s failed before the first token: %r", candidate.peer.short(), e)
        if busy == len(problems):
            raise EngineBusy(f"every node serving {request.model!r} is busy")
        raise NoNodeAvailable("no attested node could serve the request: " + "; ".join(problems))

    async def _try(self, candidate: Candidate) -> None:
        engine, peer = self._engine, candidate.peer
        engine.router.started(peer)
        self._peer = peer
        try:
            await self._open(candidate)
        except BaseException:
            self._unassign()
            raise
        self.node = str(peer)
        self._terms = Terms(
            id=self._receipt_id,
            node=peer,
            model=self._request.model,
            price_in=candidate.offer.price_in,
            price_out=candidate.offer.price_out,
            salt=self._salt,
        )

    async def _open(self, candidate: Candidate) -> None:
        """Connect, attest, wait for a stream slot, send the request, get the first item."""
        engine, host = self._engine, self._engine.host
        if host.connection(candidate.peer) is None:
            now = trio.current_time()
            host.peerstore.add_addrs(candidate.peer, list(candidate.addrs), 600.0, now)
        conn = await host.connect(candidate.peer)
        await engine.attestor.verdict(conn)
        engine.measure(conn)
        await self._take_slot(engine.slot(candidate.peer))
        stream = await conn.new_stream([PROTOCOL_ID], lazy=True)
        results = infer(stream, self._request)
        try:
            self._first = await results.__anext__()
        except BaseException:
            await results.aclose()  # type: ignore[attr-defined]
            raise
        self._stream = results

    async def _take_slot(self, slot: trio.Semaphore) -> None:
        """A stream slot on the node's connection, waiting for one if they are all taken.

        Time spent waiting here is the shim's own queue, not the node's slowness, so it
        moves the first-token deadline back; the wait itself ends after `queue_timeout`.
        """
        try:
            slot.acquire_nowait()
        except trio.WouldBlock:
            queued, deadline = trio.current_time(), self._deadline.deadline
            self._deadline.deadline = queued + self._engine.queue_timeout
            try:
                await slot.acquire()
            except trio.Cancelled:
                self._queued_out = trio.current_time() >= self._deadline.deadline
                raise
            finally:
                self._deadline.deadline = deadline + trio.current_time() - queued
        self._slot = slot

    def _unassign(self) -> None:
        """Give back the stream slot and the router's count of this request, once."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        peer, self._peer = self._peer, None
        if peer is not None:
            self._engine.router.finished(peer)

    async def __anext__(self) -> Chunk | Final:
        await self.start()
        if self._first is not None:
            item, self._first = self._first, None
        elif self._stream is None or self._closed:
            raise StopAsyncIteration
        else:
            try:
                item = await self._stream.__anext__()
            except BaseException:
                await self._release()
                raise
        if isinstance(item, Chunk):
            self._token_ids.extend(item.token_ids)
        else:
            self._settle(item)
            await self._release()
        return item

    def _settle(self, final: Final) -> None:
        """Countersign the node's receipt against what we received, and hand it on."""
        engine = self._engine
        if engine.account is None or self._terms is None:
            return
        if final.receipt is None:
            engine.receipts["missing"] += 1
            log.warning("%s sent no receipt for %s", self.node, self._receipt_id.hex())
            return
        try:
            node_receipt = decode_node_receipt(final.receipt)
            receipt = countersign(
                node_receipt, engine.account, received_tokens=self._token_ids, terms=self._terms
            )
        except ReceiptError as e:
            engine.receipts["refused"] += 1
            log.warning(
                "refused the receipt of %s from %s: %s", self._receipt_id.hex(), self.node, e
            )
            return
        disputed = bool(
            disagreements(node_receipt, received_tokens=self._token_ids, terms=self._terms)
        )
        engine.receipts["disputed" if disputed else "ok"] += 1
        if engine.on_receipt is not None:
            engine.on_receipt(receipt)

    async def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._engine.in_flight -= 1
        stream, self._stream = self._stream, None
        self._closed = True
        try:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()  # type: ignore[attr-defined]
        finally:
            self._unassign()

    def cancel(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        await self._release()
