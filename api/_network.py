"""The shim's engine: requests go to attested nodes found in the DHT.

`NetworkEngine` implements `dbloom.inference.Engine`, so the HTTP layer cannot tell it
from a local engine. For each request it finds the model's providers, reads their node
records, ranks them (`Router`), and tries them in order: connect (pooled by the host),
attest (cached per connection; nothing but a nonce is sent before the verdict), open
`/dbloom/infer`, and wait for the first item. A node that fails before the first item is
replaced by the next candidate; after it, errors reach the HTTP layer, which ends the
stream with an error event.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import trio

from dbloom.attest import AttestationError, AttestationRefused, Attestor
from dbloom.inference import (
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
from dbloom.p2p import DialError, KeyPair, Multiaddr, MultiaddrError, PeerId, ProtocolError
from dbloom.p2p.kad import KademliaDHT, node_record_key, open_node_record, provider_key

from ._errors import NoNodeAvailable
from ._routing import Candidate, Router

log = logging.getLogger(__name__)

RECORD_TTL = 15.0
MODELS_TTL = 10.0
FIRST_ITEM_TIMEOUT = 60.0
MAX_ATTEMPTS = 3
PROVIDERS_WANTED = 20
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
    trio.TooSlowError,
)


class NetworkEngine(Engine):
    """Routes each generation to the best attested node; see the module docstring."""

    def __init__(
        self,
        dht: KademliaDHT,
        attestor: Attestor,
        router: Router,
        *,
        first_item_timeout: float = FIRST_ITEM_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
        account: KeyPair | None = None,
        on_receipt: Callable[[bytes], None] | None = None,
    ) -> None:
        self.dht = dht
        self.host = dht.host
        self.attestor = attestor
        self.router = router
        self.first_item_timeout = first_item_timeout
        self.max_attempts = max_attempts
        self.in_flight = 0
        self.account = account
        self.on_receipt = on_receipt
        self.receipts = {"ok": 0, "disputed": 0, "refused": 0, "missing": 0}
        self._records: dict[PeerId, tuple[float, NodeRecord | None]] = {}
        self._models: tuple[float, tuple[ModelInfo, ...]] | None = None

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
        return record

    async def _records_for(
        self, key: str
    ) -> list[tuple[PeerId, NodeRecord, tuple[Multiaddr, ...]]]:
        providers = await self.dht.find_providers_list(provider_key(key), PROVIDERS_WANTED)
        found: list[tuple[PeerId, NodeRecord, tuple[Multiaddr, ...]]] = []

        async def fetch(peer: PeerId, addrs: tuple[Multiaddr, ...]) -> None:
            record = await self.record(peer)
            if record is not None:
                found.append((peer, record, addrs))

        async with trio.open_nursery() as nursery:
            for info in providers:
                if info.peer_id != self.host.peer_id:
                    nursery.start_soon(fetch, info.peer_id, info.addrs)
        return found

    async def candidates(self, model: str) -> list[Candidate]:
        """Every node that announced `model` and published a record offering it."""
        out = []
        for peer, record, addrs in await self._records_for(model_provider_key(model)):
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
        return out

    async def models(self) -> tuple[ModelInfo, ...]:
        """Models offered by at least one node the policy accepts (cached a few seconds)."""
        now = trio.current_time()
        if self._models is not None and now - self._models[0] < MODELS_TTL:
            return self._models[1]
        seen: dict[str, ModelInfo] = {}
        for peer, record, addrs in await self._records_for(DIRECTORY_KEY):
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

    def generate(self, request: GenerateRequest) -> Generation:
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
        self._started = False
        self._closed = False
        self._counted = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        engine = self._engine
        try:
            with trio.fail_after(engine.first_item_timeout):
                await self._connect()
        except trio.TooSlowError:
            raise RequestTimeout(
                f"no node produced a first token within {engine.first_item_timeout:.0f} s"
            ) from None
        engine.in_flight += 1
        self._counted = True

    async def _connect(self) -> None:
        engine, request = self._engine, self._request
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
        engine = self._engine
        began = trio.current_time()
        host = engine.host
        host.peerstore.add_addrs(candidate.peer, list(candidate.addrs), 600.0, began)
        conn = await host.connect(candidate.peer)
        await engine.attestor.verdict(conn)
        stream = await conn.new_stream([PROTOCOL_ID], lazy=True)
        results = infer(stream, self._request)
        try:
            self._first = await results.__anext__()
        except BaseException:
            await results.aclose()  # type: ignore[attr-defined]
            raise
        self._stream = results
        self.node = str(candidate.peer)
        self._terms = Terms(
            id=self._receipt_id,
            node=candidate.peer,
            model=self._request.model,
            price_in=candidate.offer.price_in,
            price_out=candidate.offer.price_out,
            salt=self._salt,
        )
        engine.router.succeeded(candidate.peer, trio.current_time() - began)

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
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()  # type: ignore[attr-defined]

    def cancel(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        await self._release()
