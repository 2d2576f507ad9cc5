"""The gossipsub service on a host: streams, the heartbeat and local subscriptions.

The router decides, this module moves bytes. As the pubsub spec asks, each peer
gets one long-lived stream we only write (varint-length-prefixed RPC frames)
and we only read the one it opens to us. A task per peer drains that peer's
bounded queue under a write timeout, so a peer that stops reading loses its
stream, never our memory. Peers are found three ways: identify says they speak
`/meshsub`, they open a gossip stream to us, or `add_peer` dials them. A frame
that does not decode costs the sender its stream and a score penalty; nothing a
peer sends can take the service down.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import trio

from .._errors import DecodeError, ProtocolError
from .._host import Connection, Host, NetStream
from .._identify_core import IdentifyInfo
from .._identity import PeerId
from .._multiaddr import Multiaddr
from .._wire import FrameReader, encode_frame
from ..multistream import NegotiationFailed
from ._config import GossipConfig
from ._router import GossipRouter, Validator
from ._rpc import RPC, Message

log = logging.getLogger("dbloom.p2p.gossip")

GOSSIPSUB_V11: Final = "/meshsub/1.1.0"
GOSSIPSUB_V10: Final = "/meshsub/1.0.0"
PROTOCOLS: Final = (GOSSIPSUB_V11, GOSSIPSUB_V10)  # v1.1 is wire-compatible with v1.0

_STREAM_FAILURES = (
    ProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    EOFError,
    OSError,
)
_CLOSE_GRACE = 1.0
_QUIET = 10.0  # seconds without a drop that end a burst of drops


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipStats:
    """A snapshot of the service: peers, meshes, and what went through (or was dropped)."""

    peers: int
    mesh: Mapping[str, int]
    published: int
    delivered: int
    duplicates: int
    rejected: int
    ignored: int
    graylisted_rpcs: int
    malformed_rpcs: int
    iwant_served: int
    broken_promises: int
    rpcs_received: int
    rpcs_sent: int
    bytes_received: int
    bytes_sent: int
    dropped_rpcs: int  # a peer's send queue was full
    dropped_deliveries: int  # a local subscriber was too slow


class _Overflow:
    """Drops from one bounded queue, logged once per burst (when it starts, and its total
    when it ends), never per item. A burst ends once the queue has drained and nothing
    was dropped for `_QUIET` seconds, so a consumer that keeps slipping behind is one
    burst, not a log line per slip."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.total = 0
        self._burst = 0
        self._last = 0.0

    def drop(self) -> None:
        self.total += 1
        if not self._burst:
            log.warning("%s is full; dropping until it drains", self.what)
        self._burst += 1
        self._last = trio.current_time()

    def drained(self) -> None:
        if self._burst and trio.current_time() - self._last >= _QUIET:
            log.info("%s drained after dropping %d", self.what, self._burst)
            self._burst = 0


class Subscription:
    """Messages on one topic: `async for message in subscription`.

    A reader that falls `backlog` messages behind misses the newer ones until it
    has emptied its backlog; each is counted in `dropped`, and each burst of
    drops is logged once when it starts and once when it ends.
    Closing it (or leaving its `with` block) ends the iteration after the
    messages already queued; the last subscription to a topic leaves the topic.
    """

    def __init__(self, gossip: Gossip, topic: str, backlog: int) -> None:
        self.topic = topic
        self.backlog = backlog
        self.closed = False
        self._gossip = gossip
        self._send, self._receive = trio.open_memory_channel[Message](backlog)
        self._overflow = _Overflow(f"subscription to {topic!r} (backlog {backlog})")

    @property
    def dropped(self) -> int:
        """Messages this subscriber missed because its backlog was full."""
        return self._overflow.total

    def _offer(self, message: Message) -> None:
        if not self._receive.statistics().current_buffer_used:
            self._overflow.drained()
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self._overflow.drop()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving (messages already queued can still be read)."""
        if not self.closed:
            self.closed = True
            self._send.close()
            self._gossip._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Sender:
    """One peer's queue of encoded frames, bounded in bytes, and the scope of its task."""

    def __init__(self, peer: PeerId, limit: int) -> None:
        self.peer = peer
        self.limit = limit
        self.frames: list[bytes] = []
        self.size = 0
        self.ready = trio.Event()
        self.scope = trio.CancelScope()
        self.overflow = _Overflow(f"send queue to {peer}")

    def push(self, frame: bytes) -> None:
        if self.size + len(frame) > self.limit:
            self.overflow.drop()
            return
        self.frames.append(frame)
        self.size += len(frame)
        self.ready.set()

    def take(self) -> bytes:
        self.overflow.drained()
        data = b"".join(self.frames)
        self.frames.clear()
        self.size = 0
        self.ready = trio.Event()
        return data


class Gossip:
    """Gossipsub v1.1 on a host; run it with `nursery.start(gossip.run)`."""

    def __init__(
        self,
        host: Host,
        config: GossipConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.config = config or GossipConfig()
        self.rng = rng or random.Random()
        self.router = GossipRouter(host.identity, self.config, rng=self.rng)
        self._senders: dict[PeerId, _Sender] = {}
        self._inbound: dict[PeerId, trio.CancelScope] = {}
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._nursery: trio.Nursery | None = None
        self._rpcs_received = 0
        self._rpcs_sent = 0
        self._bytes_received = 0
        self._bytes_sent = 0
        self._dropped_rpcs = 0
        self._dropped_deliveries = 0

    # ---- life cycle ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the gossip protocols and beat the heart until cancelled."""
        for protocol in PROTOCOLS:
            self.host.set_stream_handler(protocol, self._serve)
        self.host.add_identify_listener(self._on_identified)
        self.host.add_connection_listener(self._on_connection)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._reconnect()
                nursery.start_soon(self._heartbeat)
                task_status.started()
        finally:
            self._nursery = None
            for protocol in PROTOCOLS:
                self.host.remove_stream_handler(protocol)
            for subscriptions in self._subscriptions.values():
                for subscription in subscriptions:
                    subscription._send.close()

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval
        await trio.sleep(interval * self.rng.random())  # so peers do not beat in step
        while True:
            self._reconnect()
            self.router.heartbeat(trio.current_time())
            self._flush()
            await trio.sleep(interval)

    def _reconnect(self) -> None:
        """Open our stream to connected gossip peers that lack one: new ones, and those
        whose stream broke (a write timed out, or its duplicate connection closed)."""
        known = set(self.router.peers)
        for peer in self.host.connected_peers():
            if peer not in self._senders and (
                peer in known or self._speaks_gossip(self.host.peerstore.protocols(peer))
            ):
                self._ensure_peer(peer)

    # ---- the application's side ----------------------------------------------------

    def subscribe(self, topic: str, *, backlog: int | None = None) -> Subscription:
        """Receive `topic`'s messages (own ones included); the first subscription joins it."""
        size = self.config.subscription_backlog if backlog is None else backlog
        subscription = Subscription(self, topic, size)
        subscriptions = self._subscriptions.setdefault(topic, [])
        subscriptions.append(subscription)
        if len(subscriptions) == 1:
            self.router.join(topic, trio.current_time())
            self._flush()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.topic, [])
        if subscription in subscriptions:
            self._dropped_deliveries += subscription.dropped
            subscriptions.remove(subscription)
            if not subscriptions:
                del self._subscriptions[subscription.topic]
                self.router.leave(subscription.topic, trio.current_time())
                self._flush()

    async def publish(self, topic: str, data: bytes) -> Message:
        """Sign `data` and send it on `topic` (subscribed or not); returns the message."""
        message = self.router.publish(topic, data, trio.current_time())
        self._flush()
        await trio.lowlevel.checkpoint()
        return message

    def set_validator(self, topic: str, validator: Validator | None) -> None:
        """Judge each new message on `topic` before it is delivered or forwarded."""
        self.router.set_validator(topic, validator)

    async def add_peer(self, target: PeerId | Multiaddr | str) -> PeerId:
        """Connect to a peer if need be and gossip with it (if it speaks the protocol)."""
        connection = await self.host.connect(target)
        self._ensure_peer(connection.peer_id)
        return connection.peer_id

    def score(self, peer: PeerId) -> float:
        """`peer`'s gossip score as we see it."""
        return self.router.score(peer, trio.current_time())

    def stats(self) -> GossipStats:
        """Counters since start, and the current peers and mesh sizes."""
        router = self.router.stats
        live = sum(s.dropped for subs in self._subscriptions.values() for s in subs)
        return GossipStats(
            peers=len(self.router.peers),
            mesh={topic: len(self.router.mesh_peers(topic)) for topic in self.router.topics},
            published=router.published,
            delivered=router.delivered,
            duplicates=router.duplicates,
            rejected=router.rejected,
            ignored=router.ignored,
            graylisted_rpcs=router.graylisted_rpcs,
            malformed_rpcs=router.malformed_rpcs,
            iwant_served=router.iwant_served,
            broken_promises=router.broken_promises,
            rpcs_received=self._rpcs_received,
            rpcs_sent=self._rpcs_sent,
            bytes_received=self._bytes_received,
            bytes_sent=self._bytes_sent,
            dropped_rpcs=self._dropped_rpcs + sum(s.overflow.total for s in self._senders.values()),
            dropped_deliveries=self._dropped_deliveries + live,
        )

    # ---- moving the router's output ------------------------------------------------

    def _flush(self) -> None:
        for peer, rpc in self.router.take_outgoing():
            sender = self._senders.get(peer)
            if sender is None:
                self._dropped_rpcs += 1  # its stream is being reopened
                continue
            sender.push(encode_frame(rpc.to_bytes()))
            self._rpcs_sent += 1
        for message in self.router.take_delivered():
            for subscription in self._subscriptions.get(message.topic, ()):
                subscription._offer(message)

    # ---- peers ---------------------------------------------------------------------

    @staticmethod
    def _speaks_gossip(protocols: tuple[str, ...]) -> bool:
        return any(protocol in protocols for protocol in PROTOCOLS)

    def _on_identified(self, peer: PeerId, info: IdentifyInfo) -> None:
        if self._speaks_gossip(info.protocols):
            self._ensure_peer(peer)

    def _on_connection(self, connection: Connection, opened: bool) -> None:
        peer = connection.peer_id
        if opened:
            if self._speaks_gossip(self.host.peerstore.protocols(peer)):
                self._ensure_peer(peer)
            return
        sender = self._senders.get(peer)
        if sender is not None:
            sender.scope.cancel()
        if self._nursery is not None:
            self.router.peer_disconnected(peer, trio.current_time())
            self._flush()

    def _ensure_peer(self, peer: PeerId) -> None:
        """Start gossiping with a connected peer, unless we already do."""
        if self._nursery is None or peer in self._senders or peer == self.host.peer_id:
            return
        connection = self.host.connection(peer)
        if connection is None:
            return
        sender = _Sender(peer, self.config.max_queued_bytes)
        self._senders[peer] = sender
        outbound = connection.direction == "outbound"
        self.router.peer_connected(peer, outbound=outbound, now=trio.current_time())
        self._nursery.start_soon(self._send_loop, sender, connection)
        self._flush()

    async def _send_loop(self, sender: _Sender, connection: Connection) -> None:
        """Open our stream to the peer and write its queue until it fails or the peer leaves.

        The router forgets the peer when its connection closes, or here if it refuses
        the protocol; a stream that merely broke is reopened by the next heartbeat.
        """
        peer = sender.peer
        refused = False
        try:
            with sender.scope:
                try:
                    with trio.fail_after(self.config.open_timeout):
                        stream = await connection.new_stream(
                            PROTOCOLS, timeout=self.config.open_timeout
                        )
                except NegotiationFailed:
                    refused = True
                    raise
                try:
                    while True:
                        await sender.ready.wait()
                        # Let the other tasks of this scheduler pass add to the queue:
                        # one write then carries what several inbound RPCs produced.
                        await trio.lowlevel.checkpoint()
                        data = sender.take()
                        with trio.fail_after(self.config.write_timeout):
                            await stream.send_all(data)
                        self._bytes_sent += len(data)
                except BaseException as exc:
                    # Stopping (cancelled): close politely. Failing: reset, which frees
                    # the stream at both ends even if the peer never reads again.
                    with trio.move_on_after(_CLOSE_GRACE) as cleanup:
                        cleanup.shield = True
                        if isinstance(exc, trio.Cancelled):
                            await stream.aclose()
                        else:
                            await stream.reset()
                    raise
        except _STREAM_FAILURES as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else exc
            log.info("gossip stream to %s ended: %s", peer, reason)
        finally:
            if self._senders.get(peer) is sender:
                del self._senders[peer]
            self._dropped_rpcs += sender.overflow.total
            if refused:
                self.router.peer_disconnected(peer, trio.current_time())
                self._flush()

    async def _serve(self, stream: NetStream) -> None:
        """Read a peer's RPCs; a frame that does not decode costs it the stream and score.

        A new stream is the peer (re)starting gossip with us, so our side starts too;
        while our stream to it is down, the router ignores what it sends.
        """
        peer = stream.peer_id
        previous = self._inbound.get(peer)
        if previous is not None:
            previous.cancel()  # a peer has one stream to us; a newer one replaces the old
        scope = self._inbound[peer] = trio.CancelScope()
        reader = FrameReader(max_size=self.config.limits.max_size)
        try:
            with scope:
                self._ensure_peer(peer)
                while True:
                    data = await stream.receive_some()
                    if not data:
                        if reader.buffered:
                            raise DecodeError("gossip stream ended inside a frame")
                        return
                    self._bytes_received += len(data)
                    reader.receive_data(data)
                    now = trio.current_time()
                    while (frame := reader.next_frame()) is not None:
                        rpc = RPC.from_bytes(frame, self.config.limits)
                        self._rpcs_received += 1
                        self.router.handle_rpc(peer, rpc, now)
                    self._flush()
        except DecodeError:
            self.router.malformed_rpc(peer)
            raise
        finally:
            if self._inbound.get(peer) is scope:
                del self._inbound[peer]
            self._flush()
