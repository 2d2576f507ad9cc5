"""The Kademlia service on a host: answers RPCs (server mode) and runs lookups.

The cores do the thinking — `RoutingTable`, `Lookup`, `RecordStore`,
`ProviderStore` know nothing of trio — and this module does the I/O: one stream
per RPC under a deadline, α queries at a time in a nursery, and the timers that
keep the network fresh (refresh, republish, expiry). Peers enter the routing
table only once they have answered a Kademlia query or advertised the protocol
in identify, so clients (which do neither) never pollute it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from .._errors import DecodeError, ProtocolError
from .._host import DialError, Host, HostClosed, NetStream
from .._identify_core import IdentifyInfo
from .._identity import PeerId
from .._multiaddr import Multiaddr
from .._ping import ping
from .._wire import FrameReader, encode_frame
from ._envelope import seal_node_record
from ._keys import common_prefix_length, kad_key, node_record_key, peer_key
from ._lookup import DEFAULT_SLOW_AFTER, Finished, Lookup, Query, Waiting
from ._messages import (
    DEFAULT_MAX_MESSAGE,
    KadMessage,
    MessageType,
    PeerInfo,
    Record,
)
from ._responder import KadResponder
from ._store import NodeRecordValidator, ProviderStore, RecordRejected, RecordStore, Validator
from ._table import Pending, RoutingTable

log = logging.getLogger("dbloom.p2p.kad")

RPC_ERRORS = (
    ProtocolError,
    DialError,
    HostClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    EOFError,
    OSError,
)
MAX_REQUESTS_PER_STREAM = 64
MAX_SNAPSHOT_PEERS = 5000
MAX_BUCKET_KEY_TRIES = 1 << 18
INBOUND_STREAM_IDLE = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class KadConfig:
    """Kademlia settings; defaults follow DESIGN.md (k=20, α=3, providers 10 min / 4 min)."""

    protocol: str = "/dbloom/kad/1.0.0"
    mode: Literal["server", "client"] = "server"
    k: int = 20
    alpha: int = 3
    query_timeout: float = 10.0
    slow_after: float = DEFAULT_SLOW_AFTER
    lookup_timeout: float = 60.0
    disjoint_paths: int = 1
    provider_ttl: float = 600.0
    provider_republish: float = 240.0
    record_ttl: float = 36 * 3600.0
    record_republish: float = 3600.0
    refresh_interval: float = 300.0
    bootstrap: tuple[Multiaddr, ...] = ()
    table_path: Path | None = None
    max_message: int = DEFAULT_MAX_MESSAGE


@dataclass(slots=True)
class LookupResult:
    """What a lookup found and what it cost (for callers, benchmarks and sims)."""

    closest: list[PeerId]
    hops: int
    contacted: int
    failed: int
    timed_out: bool


class KademliaDHT:
    """One peer's view of the DHT; run it with `nursery.start(dht.run)`."""

    def __init__(
        self,
        host: Host,
        config: KadConfig | None = None,
        *,
        validators: Mapping[str, Validator] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.config = config or KadConfig()
        self.rng = rng or random.Random()
        self.table = RoutingTable(host.peer_id, k=self.config.k)
        self.records = RecordStore(
            validators or {"dbloom": NodeRecordValidator()}, record_ttl=self.config.record_ttl
        )
        self.providers = ProviderStore(ttl=self.config.provider_ttl)
        self.responder = KadResponder(
            self.table,
            self.records,
            self.providers,
            k=self.config.k,
            addrs_of=self._known_addrs,
            is_connected=lambda peer: host.connection(peer) is not None,
        )
        self._provided: set[bytes] = set()
        self._own_records: dict[bytes, bytes] = {}
        self._record_seq = 0
        self._liveness_checks: set[PeerId] = set()
        self._nursery: trio.Nursery | None = None
        self.rpc_failures = 0

    # ---- life cycle ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve, bootstrap, then keep the table and our records fresh until cancelled."""
        if self.config.mode == "server":
            self.host.set_stream_handler(self.config.protocol, self._serve)
        self.host.add_identify_listener(self._on_identified)
        self._load_table()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.bootstrap()
                task_status.started()
                nursery.start_soon(self._every, self.config.refresh_interval, self.refresh)
                nursery.start_soon(
                    self._every, self.config.provider_republish, self._republish_providers
                )
                nursery.start_soon(
                    self._every, self.config.record_republish, self._republish_records
                )
                nursery.start_soon(self._every, 60.0, self._expire)
        finally:
            self._nursery = None
            self.host.remove_stream_handler(self.config.protocol)
            self._save_table()

    async def _every(self, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        """Run `job` every `interval` (±10%, so peers do not beat in step)."""
        while True:
            await trio.sleep(interval * (0.9 + 0.2 * self.rng.random()))
            try:
                await job()
            except (*RPC_ERRORS, trio.TooSlowError) as exc:
                log.info("periodic DHT job %s failed: %s", job.__name__, exc)

    async def bootstrap(self) -> int:
        """Dial the bootstrap peers and look ourselves up; returns the table size."""
        async with trio.open_nursery() as nursery:
            for addr in self.config.bootstrap:
                nursery.start_soon(self._bootstrap_one, addr)
        if len(self.table):
            await self.find_closest_peers(self.host.peer_id.multihash)
        self._save_table()
        return len(self.table)

    async def _bootstrap_one(self, addr: Multiaddr) -> None:
        request = KadMessage(type=MessageType.FIND_NODE, key=self.host.peer_id.multihash)
        try:
            with trio.fail_after(self.config.query_timeout):
                await self._rpc(addr, request)
        except (*RPC_ERRORS, trio.TooSlowError) as exc:
            log.warning("bootstrap peer %s unreachable: %s", addr, exc)

    async def refresh(self) -> None:
        """Self-lookup plus one random lookup per stale bucket."""
        now = trio.current_time()
        await self.find_closest_peers(self.host.peer_id.multihash)
        for index in self.table.stale_buckets(now, self.config.refresh_interval)[:16]:
            key = self.random_key_in_bucket(index)
            if key is not None:
                await self.find_closest_peers(key)
        self._save_table()

    def random_key_in_bucket(
        self, index: int, *, max_tries: int = MAX_BUCKET_KEY_TRIES
    ) -> bytes | None:
        """A raw key whose keyspace position shares exactly `index` leading bits with ours.

        Peers answer FIND_NODE for SHA-256 of the key they are sent, so a bucket refresh
        must send a key that hashes into that bucket (found by trying: about 2^(index+1)
        hashes; None past `max_tries`, for buckets deeper than any network reaches).
        """
        local = self.table.local_key
        for _ in range(max_tries):
            raw = self.rng.randbytes(32)
            if common_prefix_length(kad_key(raw), local) == index:
                return raw
        return None

    async def _expire(self) -> None:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        self.providers.remove_expired(now)
        self.records.remove_expired(now)

    # ---- persistence -----------------------------------------------------------------

    def _load_table(self) -> None:
        path = self.config.table_path
        if path is None or not path.exists():
            return
        try:
            entries = json.loads(path.read_text())
            now = trio.current_time()
            snapshot = []
            for item in entries[:MAX_SNAPSHOT_PEERS]:
                peer = PeerId.from_string(item["peer"])
                addrs = tuple(Multiaddr.parse(a) for a in item["addrs"])
                self.host.peerstore.add_addrs(peer, list(addrs), self.config.provider_ttl, now)
                snapshot.append((peer, addrs))
            self.table.load(snapshot, now)
        except (OSError, ValueError, KeyError, TypeError, DecodeError, RecursionError) as exc:
            log.warning("ignoring unreadable routing table snapshot %s: %s", path, exc)

    def _save_table(self) -> None:
        path = self.config.table_path
        if path is None:
            return
        entries = [
            {"peer": str(peer), "addrs": [str(a) for a in addrs]}
            for peer, addrs in self.table.snapshot()
        ]
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not save the routing table to %s: %s", path, exc)

    # ---- serving ---------------------------------------------------------------------

    async def _serve(self, stream: NetStream) -> None:
        peer = stream.peer_id
        if self.config.protocol in self.host.peerstore.protocols(peer):
            self._offer(peer)
        reader = FrameReader(max_size=self.config.max_message)
        for _ in range(MAX_REQUESTS_PER_STREAM):
            with trio.move_on_after(INBOUND_STREAM_IDLE) as idle:
                request = await _read_message(stream, reader, self.config.max_message)
            if idle.cancelled_caught or request is None:
                return
            reply = self.responder.answer(peer, request, trio.current_time())
            if reply is not None:
                await stream.send_all(encode_frame(reply.to_bytes()))

    def _known_addrs(self, peer: PeerId) -> tuple[Multiaddr, ...]:
        return tuple(self.host.peerstore.addrs(peer, trio.current_time()))

    # ---- the routing table -----------------------------------------------------------

    def _on_identified(self, peer: PeerId, info: IdentifyInfo) -> None:
        if self.config.protocol in info.protocols:
            self._offer(peer)

    def _offer(self, peer: PeerId) -> None:
        """A peer proved it serves Kademlia: add it, checking an old entry if the bucket is full."""
        now = trio.current_time()
        addrs = tuple(self.host.peerstore.addrs(peer, now))
        result = self.table.update(peer, addrs, now)
        if isinstance(result, Pending) and self._nursery is not None:
            candidate = result.candidate.peer
            if candidate not in self._liveness_checks:
                self._liveness_checks.add(candidate)
                self._nursery.start_soon(self._check_liveness, candidate)

    async def _check_liveness(self, candidate: PeerId) -> None:
        try:
            with trio.fail_after(self.config.query_timeout):
                await ping(self.host, candidate, timeout=self.config.query_timeout)
            alive = True
        except (*RPC_ERRORS, trio.TooSlowError):
            alive = False
        finally:
            self._liveness_checks.discard(candidate)
        self.table.on_liveness(candidate, alive, trio.current_time())

    # ---- RPC -------------------------------------------------------------------------

    async def _rpc(self, target: PeerId | Multiaddr, request: KadMessage) -> KadMessage | None:
        """One request on a fresh stream; the reply (None for ADD_PROVIDER)."""
        stream = await self.host.new_stream(
            target, [self.config.protocol], timeout=self.config.query_timeout, lazy=True
        )
        try:
            await stream.send_all(encode_frame(request.to_bytes()))
            if request.type is MessageType.ADD_PROVIDER:
                await stream.send_eof()
                # Wait for the responder's EOF: closing now would reset the stream if its
                # multistream echo already arrived, and the reset can drop our request unread.
                while await stream.receive_some():
                    pass
                return None
            reader = FrameReader(max_size=self.config.max_message)
            reply = await _read_message(stream, reader, self.config.max_message)
            if reply is None:
                raise EOFError("kad stream closed before a reply")
        finally:
            await stream.aclose()
        self._learn(stream.peer_id, reply)
        return reply

    def _learn(self, responder: PeerId, reply: KadMessage) -> None:
        now = trio.current_time()
        self._offer(responder)
        for info in (*reply.closer_peers, *reply.provider_peers):
            if info.addrs and info.peer_id != self.host.peer_id:
                self.host.peerstore.add_addrs(
                    info.peer_id, list(info.addrs), self.config.provider_ttl, now
                )

    # ---- lookups ---------------------------------------------------------------------

    async def _lookup(
        self,
        target: bytes,
        kind: MessageType,
        key: bytes,
        *,
        on_reply: Callable[[PeerId, KadMessage], bool] | None = None,
    ) -> LookupResult:
        """Iterative lookup of the keyspace position `target`, sending `kind` RPCs for `key`.

        `on_reply` sees each reply; returning True ends the lookup early.
        """
        config = self.config
        now = trio.current_time()
        self.table.note_lookup(target, now)
        seeds = [
            entry.peer for entry in self.table.closest(target, config.k * config.disjoint_paths)
        ]
        lookup = Lookup(
            target,
            seeds,
            alpha=config.alpha,
            k=config.k,
            peer_timeout=config.query_timeout,
            slow_after=config.slow_after,
            lookup_timeout=config.lookup_timeout,
            disjoint_paths=config.disjoint_paths,
            local=self.host.peer_id,
            now=now,
        )
        changed = trio.Event()
        done = False

        async def query(peer: PeerId) -> None:
            nonlocal changed, done
            try:
                with trio.fail_after(config.query_timeout):
                    reply = await self._rpc(peer, KadMessage(type=kind, key=key))
                assert reply is not None
                lookup.on_success(
                    peer, [p.peer_id for p in reply.closer_peers], trio.current_time()
                )
                if on_reply is not None and on_reply(peer, reply):
                    done = True
            except (*RPC_ERRORS, trio.TooSlowError) as exc:
                self.rpc_failures += 1
                log.debug("kad query to %s failed: %s", peer, exc)
                lookup.on_failure(peer, trio.current_time())
                self.table.query_failed(peer)
            changed.set()
            changed = trio.Event()

        async with trio.open_nursery() as nursery:
            while not done:
                step = lookup.next(trio.current_time())
                if isinstance(step, Query):
                    nursery.start_soon(query, step.peer)
                elif isinstance(step, Waiting):
                    with trio.move_on_at(step.until):
                        await changed.wait()
                elif isinstance(step, Finished):
                    break
            nursery.cancel_scope.cancel()
        return LookupResult(
            closest=lookup.closest(),
            hops=lookup.hops,
            contacted=lookup.contacted,
            failed=lookup.failed,
            timed_out=lookup.timed_out,
        )

    async def find_closest_peers(self, key: bytes) -> LookupResult:
        """The k peers closest to `key` (raw key bytes) that answered us."""
        return await self._lookup(kad_key(key), MessageType.FIND_NODE, key)

    async def find_peer(self, peer: PeerId) -> list[Multiaddr]:
        """Addresses of `peer`, from a connection, the peerstore, or a lookup."""
        now = trio.current_time()
        known = self.host.peerstore.addrs(peer, now)
        if known and self.host.connection(peer) is not None:
            return known
        await self._lookup(peer_key(peer), MessageType.FIND_NODE, peer.multihash)
        return self.host.peerstore.addrs(peer, trio.current_time())

    # ---- providers -------------------------------------------------------------------

    def _self_info(self) -> PeerInfo:
        return PeerInfo(
            peer_id=self.host.peer_id,
            addrs=tuple(addr.without_peer_id() for addr in self.host.advertised_addrs),
        )

    async def provide(self, key: bytes) -> int:
        """Announce that we provide `key` (a provider key); kept fresh until `stop_providing`."""
        self._provided.add(key)
        return await self._announce(key)

    def stop_providing(self, key: bytes) -> None:
        """Stop republishing `key`; remote records lapse within the provider TTL."""
        self._provided.discard(key)

    async def _announce(self, key: bytes) -> int:
        me = self._self_info()
        if self.config.mode == "server":
            self.providers.add(key, me, trio.current_time())
        request = KadMessage(type=MessageType.ADD_PROVIDER, key=key, provider_peers=(me,))
        return await self._send_to_closest(key, request)

    async def _send_to_closest(self, key: bytes, request: KadMessage) -> int:
        """Send `request` to the k peers closest to `key`; returns how many took it."""
        result = await self._lookup(kad_key(key), MessageType.FIND_NODE, key)
        return await self._send_to(result.closest, request)

    async def _send_to(self, peers: list[PeerId], request: KadMessage) -> int:
        accepted = 0

        async def send(peer: PeerId) -> None:
            nonlocal accepted
            try:
                with trio.fail_after(self.config.query_timeout):
                    await self._rpc(peer, request)
                accepted += 1
            except (*RPC_ERRORS, trio.TooSlowError) as exc:
                log.debug("%s to %s failed: %s", request.type.name, peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(send, peer)
        return accepted

    async def _republish_providers(self) -> None:
        for key in list(self._provided):
            await self._announce(key)

    @asynccontextmanager
    async def find_providers(
        self, key: bytes, count: int = 20
    ) -> AsyncIterator[trio.MemoryReceiveChannel[PeerInfo]]:
        """Providers of `key`, deduplicated, streamed as replies arrive (at most `count`)."""
        send, receive = trio.open_memory_channel[PeerInfo](count)
        seen: set[PeerId] = set()

        def deliver(info: PeerInfo) -> bool:
            if info.peer_id in seen or len(seen) >= count:
                return len(seen) >= count
            seen.add(info.peer_id)
            send.send_nowait(info)
            return len(seen) >= count

        async def search() -> None:
            async with send:
                for info in self.providers.get(key, trio.current_time(), limit=count):
                    if deliver(info):
                        return

                def on_reply(peer: PeerId, reply: KadMessage) -> bool:
                    now = trio.current_time()
                    finished = False
                    for info in reply.provider_peers:
                        if info.addrs:
                            self.host.peerstore.add_addrs(
                                info.peer_id, list(info.addrs), self.config.provider_ttl, now
                            )
                        finished = deliver(info) or finished
                    return finished

                await self._lookup(kad_key(key), MessageType.GET_PROVIDERS, key, on_reply=on_reply)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(search)
            try:
                yield receive
            finally:
                nursery.cancel_scope.cancel()

    async def find_providers_list(self, key: bytes, count: int = 20) -> list[PeerInfo]:
        """All providers `find_providers` yields, as a list."""
        async with self.find_providers(key, count) as results:
            return [info async for info in results]

    # ---- values ----------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes) -> int:
        """Store a record at the k closest peers (checked here first); returns how many took it."""
        now = trio.current_time()
        self.records.put(key, value, from_peer=self.host.peer_id, now=now)
        self._own_records[key] = value
        return await self._store_at_closest(key, value)

    async def _store_at_closest(self, key: bytes, value: bytes) -> int:
        record = Record(key=key, value=value)
        return await self._send_to_closest(
            key, KadMessage(type=MessageType.PUT_VALUE, key=key, record=record)
        )

    async def _republish_records(self) -> None:
        for key, value in list(self._own_records.items()):
            await self._store_at_closest(key, value)

    async def publish_node_record(self, data: bytes) -> int:
        """Sign `data` as our node record (sequence number always rising) and store it."""
        # Wall-clock milliseconds: a restarted peer still outbids its older records.
        self._record_seq = max(self._record_seq + 1, int(time.time() * 1000))
        envelope = seal_node_record(self.host.identity, self._record_seq, data)
        return await self.put(node_record_key(self.host.peer_id), envelope)

    async def get(self, key: bytes, *, quorum: int = 3) -> bytes | None:
        """The best valid value for `key` once `quorum` peers answered (or the lookup ended)."""
        now = trio.current_time()
        validator = self.records.validator_for(key)
        values: list[tuple[PeerId | None, bytes]] = []
        local = self.records.get(key, now)
        if local is not None:
            if quorum <= 1:
                return local
            values.append((None, local))

        def on_reply(peer: PeerId, reply: KadMessage) -> bool:
            record = reply.record
            if record is None or record.key != key:
                return False
            try:
                validator.validate(key, record.value)
            except RecordRejected as exc:
                log.info("%s returned an invalid record: %s", peer, exc.reason)
                return False
            values.append((peer, record.value))
            return len(values) >= quorum

        await self._lookup(kad_key(key), MessageType.GET_VALUE, key, on_reply=on_reply)
        if not values:
            return None
        best = values[validator.select(key, [v for _, v in values])][1]
        outdated = [p for p, v in values if p is not None and v != best]
        if outdated and self._nursery is not None:
            self._nursery.start_soon(self._correct, key, best, outdated)
        return best

    async def _correct(self, key: bytes, best: bytes, peers: list[PeerId]) -> None:
        """Send the best record to peers that answered with a worse one."""
        record = Record(key=key, value=best)
        await self._send_to(peers, KadMessage(type=MessageType.PUT_VALUE, key=key, record=record))


async def _read_message(stream: NetStream, reader: FrameReader, max_size: int) -> KadMessage | None:
    """The next framed message; None at a clean end of stream."""
    while True:
        frame = reader.next_frame()
        if frame is not None:
            return KadMessage.from_bytes(frame, max_size=max_size)
        data = await stream.receive_some()
        if not data:
            if reader.buffered:
                raise DecodeError("kad stream ended inside a message")
            return None
        reader.receive_data(data)
