"""The host: listens, dials, keeps one connection per peer and routes streams by protocol.

Everything the host starts lives in its nursery. A misbehaving peer or a handler
that raises costs only its stream or its connection; the error is logged once,
with the peer id, and the host goes on serving everyone else.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import trio

from . import multistream
from ._errors import ErrorCode, ProtocolError, RemoteProtocolError
from ._identify_core import IdentifyInfo
from ._identity import KeyPair, PeerId, PublicKey
from ._memory import MemoryTransport
from ._multiaddr import Multiaddr, MultiaddrError
from ._peerstore import PERMANENT, PeerStore
from ._transport import RawConnection, TcpTransport, Transport
from ._upgrade import Upgraded, upgrade
from .noise import StaticKey
from .yamux import YamuxConfig, YamuxConnection, YamuxStream

log = logging.getLogger("dbloom.p2p")

try:
    _VERSION = version("dbloom")
except PackageNotFoundError:  # running from a source tree
    _VERSION = "0.0.0"

STREAM_ERRORS = (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError)
DIAL_ERRORS = (*STREAM_ERRORS, OSError, trio.TooSlowError)


class DialError(Exception):
    """No address of the peer could be reached and upgraded; says why for each."""


class HostClosed(Exception):
    """The host is shutting down."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    """Timeouts and limits; the defaults suit a home Mac serving a few hundred peers."""

    agent_version: str = f"dbloom/{_VERSION}"
    dial_timeout: float = 10.0
    upgrade_timeout: float = 10.0
    negotiate_timeout: float = 10.0
    idle_timeout: float = 120.0
    duplicate_idle_timeout: float = 2.0
    write_timeout: float = 30.0
    close_grace: float = 2.0
    max_connections: int = 1024
    max_pending_inbound: int = 64
    """Inbound handshakes in progress. When full, a newcomer displaces the oldest handshake
    of the source (IPv4 address, IPv6 /64, relayed peer) holding the most, unless that is
    its own source: one source's silent sockets cannot lock everyone else out."""
    addr_ttl: float = 600.0
    identify_on_connect: bool = True
    early_muxer_negotiation: bool = True
    insecure_plaintext: bool = (
        False  # simulations only: refused unless every transport is in-memory
    )
    yamux: YamuxConfig = field(default_factory=YamuxConfig)


class NetStream(trio.abc.HalfCloseableStream):
    """A negotiated stream to a peer: knows its protocol, peer and connection."""

    def __init__(
        self,
        inner: YamuxStream,
        protocol: str,
        connection: Connection,
        prefix: bytes = b"",
        *,
        unconfirmed: multistream.LazyProposal | None = None,
    ) -> None:
        self.inner = inner
        self.protocol = protocol
        self.connection = connection
        self._prefix = prefix
        self._unconfirmed = unconfirmed

    @property
    def peer_id(self) -> PeerId:
        """The authenticated remote peer."""
        return self.connection.peer_id

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write (blocks on the stream's flow-control window only)."""
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Delegates to the yamux stream."""
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Bytes pipelined behind the negotiation first, then the stream."""
        if self._unconfirmed is not None:
            await self._confirm(self._unconfirmed)
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:size], self._prefix[size:]
            return out
        return await self.inner.receive_some(max_bytes)

    async def _confirm(self, proposal: multistream.LazyProposal) -> None:
        """Read the answer to a lazily proposed protocol; raises if the peer refused it."""
        rest = None
        while rest is None:
            data = await self.inner.receive_some()
            if not data:
                raise RemoteProtocolError("stream closed before the protocol was confirmed")
            rest = proposal.confirm(data)
        self._unconfirmed = None
        self._prefix = rest

    async def send_eof(self) -> None:
        """Half-close (yamux FIN)."""
        await self.inner.send_eof()

    async def aclose(self) -> None:
        """Close this stream only."""
        await self.inner.aclose()

    async def reset(self) -> None:
        """Abort the stream (yamux RST)."""
        await self.inner.reset()


StreamHandler = Callable[[NetStream], Awaitable[None]]
ConnectionListener = Callable[["Connection", bool], None]
IdentifyListener = Callable[[PeerId, IdentifyInfo], None]


class Connection:
    """An authenticated, multiplexed connection to one peer."""

    def __init__(
        self,
        host: Host,
        *,
        peer_id: PeerId,
        public_key: PublicKey,
        muxer: YamuxConnection,
        raw: RawConnection,
        direction: Literal["inbound", "outbound"],
    ) -> None:
        self.host = host
        self.peer_id = peer_id
        self.public_key = public_key
        self.muxer = muxer
        self.local_addr = raw.local_addr
        self.remote_addr = raw.remote_addr
        self.direction = direction
        self.opened_at = trio.current_time()
        self.duplicate = False
        self.idle_since: float | None = None
        self.identified: IdentifyInfo | None = None
        self.close_reason: BaseException | None = None
        self._cancel = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<Connection {self.direction} {self.peer_id.short()} via {self.remote_addr}>"

    @property
    def is_closed(self) -> bool:
        """True once the muxer has shut down."""
        return self.muxer.is_closed

    @property
    def relayed(self) -> bool:
        """True for a connection carried through a circuit relay."""
        return "p2p-circuit" in self.remote_addr.protocols()

    async def new_stream(
        self, protocols: Sequence[str], *, timeout: float | None = None, lazy: bool = False
    ) -> NetStream:
        """Open a stream and agree on the first of `protocols` the peer supports.

        `lazy` (one protocol only) sends the proposal and returns at once, so the
        first request travels with it and an RPC costs one round trip, not two; a
        refusal then surfaces as NegotiationFailed on the first read.
        """
        inner = await self.muxer.open_stream()
        if lazy and len(protocols) == 1:
            proposal = multistream.LazyProposal(protocols[0])
            try:
                await inner.send_all(proposal.data)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await inner.reset()
                raise
            return NetStream(inner, proposal.protocol, self, unconfirmed=proposal)
        try:
            protocol, rest = await multistream.negotiate(
                inner,
                multistream.Role.INITIATOR,
                protocols,
                timeout=timeout or self.host.config.negotiate_timeout,
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await inner.reset()
            raise
        return NetStream(inner, protocol, self, rest)

    async def aclose(self) -> None:
        """Go away and close; running handlers are cancelled."""
        with trio.move_on_after(self.host.config.close_grace) as scope:
            scope.shield = True
            await self.muxer.aclose()
        self._cancel.cancel()


class Host:
    """A libp2p host; build it with `open_host`."""

    def __init__(
        self,
        identity: KeyPair,
        nursery: trio.Nursery,
        *,
        transports: Sequence[Transport],
        config: HostConfig,
    ) -> None:
        _check_plaintext(config, transports)
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config
        self.transports = list(transports)
        self.peerstore = PeerStore()
        self._nursery = nursery
        self._static_key = StaticKey()
        self._handlers: dict[str, StreamHandler] = {}
        self._connections: dict[PeerId, list[Connection]] = {}
        self._dials: dict[PeerId, trio.Event] = {}
        self._listen_addrs: list[Multiaddr] = []
        self._addr_sources: list[Callable[[], Iterable[Multiaddr]]] = []
        self._listener_scopes: list[trio.CancelScope] = []
        self._connection_listeners: list[ConnectionListener] = []
        self._identify_listeners: list[IdentifyListener] = []
        self._pending: dict[_PendingInbound, None] = {}  # oldest first
        self._protected: dict[PeerId, set[str]] = {}
        self._duplicates: set[Connection] = set()
        self._duplicates_changed = trio.Event()
        self._closing = False
        self.refused_inbound = 0
        self.evicted_inbound = 0

    # ---- handlers and events -------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Route inbound streams that negotiate `protocol` to `handler`."""
        self._handlers[protocol] = handler

    def remove_stream_handler(self, protocol: str) -> None:
        """Stop accepting `protocol`."""
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        """Protocols we answer, sorted (identify lists them)."""
        return sorted(self._handlers)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call `listener(connection, opened)` when a peer connects or disconnects."""
        self._connection_listeners.append(listener)

    def add_identify_listener(self, listener: IdentifyListener) -> None:
        """Call `listener(peer, info)` whenever a peer's identify answer or push arrives."""
        self._identify_listeners.append(listener)

    def notify_identified(self, peer: PeerId, info: IdentifyInfo) -> None:
        """Tell identify listeners what `peer` said (called by the identify protocol)."""
        for listener in list(self._identify_listeners):
            try:
                listener(peer, info)
            except Exception:
                log.exception("identify listener failed for %s", peer)

    def add_transport(self, transport: Transport) -> None:
        """Dial (and listen) through `transport` too; for transports that need the host."""
        self.transports.append(transport)

    def protect(self, peer: PeerId, tag: str) -> None:
        """Keep connections to `peer` open while idle (a relay reservation needs one)."""
        self._protected.setdefault(peer, set()).add(tag)

    def unprotect(self, peer: PeerId, tag: str) -> None:
        """Undo `protect(peer, tag)`; the idle sweep applies again once no tag is left."""
        tags = self._protected.get(peer)
        if tags is not None:
            tags.discard(tag)
            if not tags:
                del self._protected[peer]

    # ---- listening -----------------------------------------------------------------

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        """Bound addresses, each ending in /p2p/<our peer id>."""
        return [addr.with_peer_id(self.peer_id) for addr in self._listen_addrs]

    def add_addr_source(self, source: Callable[[], Iterable[Multiaddr]]) -> None:
        """Also advertise what `source()` returns (e.g. circuit addresses through relays)."""
        self._addr_sources.append(source)

    @property
    def advertised_addrs(self) -> list[Multiaddr]:
        """Where others may reach us, with /p2p: bound addresses, then every source's."""
        extra = [addr for source in self._addr_sources for addr in source()]
        return list(
            dict.fromkeys([*self.listen_addrs, *(a.with_peer_id(self.peer_id) for a in extra)])
        )

    def _transport_for(self, addr: Multiaddr) -> Transport:
        for transport in self.transports:
            if transport.handles(addr):
                return transport
        raise MultiaddrError(f"no transport for {addr}")

    async def listen(self, addr: Multiaddr | str) -> list[Multiaddr]:
        """Start listening; returns the bound addresses (with /p2p)."""
        if isinstance(addr, str):
            addr = Multiaddr.parse(addr)
        transport = self._transport_for(addr.without_peer_id())
        scope = trio.CancelScope()
        self._listener_scopes.append(scope)

        async def serve(task_status: trio.TaskStatus[list[Multiaddr]]) -> None:
            with scope:
                await transport.serve(
                    addr.without_peer_id(), self.serve_inbound, task_status=task_status
                )

        bound: list[Multiaddr] = await self._nursery.start(serve)
        self._listen_addrs.extend(bound)
        return [b.with_peer_id(self.peer_id) for b in bound]

    async def _upgrade(
        self, raw: RawConnection, *, initiator: bool, expected_peer: PeerId | None
    ) -> Upgraded:
        """Secure and multiplex `raw` with this host's identity and settings."""
        config = self.config
        return await upgrade(
            raw.stream,
            initiator=initiator,
            identity=self.identity,
            static_key=self._static_key,
            expected_peer=expected_peer,
            yamux_config=config.yamux,
            write_timeout=config.write_timeout,
            early_muxer=config.early_muxer_negotiation,
            plaintext=config.insecure_plaintext,
            timeout=config.upgrade_timeout,
        )

    async def serve_inbound(
        self, raw: RawConnection, *, expected_peer: PeerId | None = None
    ) -> None:
        """Upgrade a raw connection someone opened to us and serve it until it closes.

        Listeners call this; so does the relay client for a circuit a relay terminated here.
        """
        config = self.config
        source = _source_of(raw.remote_addr, expected_peer)
        if (
            self._closing
            or self.num_connections >= config.max_connections
            or not self._make_room_for(source)
        ):
            self.refused_inbound += 1
            await trio.aclose_forcefully(raw.stream)
            return
        pending = _PendingInbound(source)
        self._pending[pending] = None
        upgraded = None
        try:
            with pending.scope:
                upgraded = await self._upgrade(raw, initiator=False, expected_peer=expected_peer)
        except DIAL_ERRORS as exc:
            log.info("inbound connection from %s failed its handshake: %s", raw.remote_addr, exc)
        finally:
            self._pending.pop(pending, None)
        if upgraded is None:
            if pending.scope.cancelled_caught:
                log.info("inbound handshake from %s evicted: too many pending", raw.remote_addr)
            await trio.aclose_forcefully(raw.stream)
            return
        conn = Connection(
            self,
            peer_id=upgraded.peer_id,
            public_key=upgraded.public_key,
            muxer=upgraded.muxer,
            raw=raw,
            direction="inbound",
        )
        await self._serve_connection(conn)

    def _make_room_for(self, source: str) -> bool:
        """False if the handshake table is full and `source` already holds the most of it;
        otherwise True, after evicting the oldest handshake of the source that does (an
        honest handshake takes milliseconds: the oldest is likeliest a silent socket)."""
        if len(self._pending) < self.config.max_pending_inbound:
            return True
        per_source = Counter(p.source for p in self._pending)
        if not per_source:  # a table of size 0 takes nobody
            return False
        heaviest, most = per_source.most_common(1)[0]
        if per_source[source] + 1 > most:
            return False
        victim = next(p for p in self._pending if p.source == heaviest)
        victim.scope.cancel()
        del self._pending[victim]
        self.evicted_inbound += 1
        return True

    # ---- connections ---------------------------------------------------------------

    @property
    def num_connections(self) -> int:
        """Open connections, duplicates included."""
        return sum(len(conns) for conns in self._connections.values())

    def connected_peers(self) -> list[PeerId]:
        """Peers we hold at least one open connection to."""
        return [peer for peer, conns in self._connections.items() if conns]

    def connection(self, peer: PeerId) -> Connection | None:
        """The preferred open connection to `peer`, if any."""
        conns = [c for c in self._connections.get(peer, ()) if not c.is_closed]
        if not conns:
            return None
        return min(conns, key=self._preference)

    def _preference(self, conn: Connection) -> tuple[int, int, float]:
        # A direct connection beats a relayed one (the relay limits it, and adds a hop);
        # then both ends keep the connection dialed by the smaller peer id, so they agree.
        dialer = self.peer_id if conn.direction == "outbound" else conn.peer_id
        other = conn.peer_id if conn.direction == "outbound" else self.peer_id
        return (int(conn.relayed), 0 if dialer < other else 1, conn.opened_at)

    async def _serve_connection(
        self, conn: Connection, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        peer = conn.peer_id
        self.peerstore.set_public_key(peer, conn.public_key)
        try:
            with conn._cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._run_muxer, conn, nursery.cancel_scope)
                    self._register(conn)
                    task_status.started()
                    if self.config.identify_on_connect:
                        from ._identify import identify_connection

                        nursery.start_soon(identify_connection, self, conn)
                    while True:
                        try:
                            inner = await conn.muxer.accept_stream()
                        except (trio.ClosedResourceError, trio.BrokenResourceError):
                            break
                        nursery.start_soon(self._handle_stream, conn, inner)
                    nursery.cancel_scope.cancel()
        finally:
            self._unregister(conn)
            with trio.move_on_after(self.config.close_grace) as scope:
                scope.shield = True
                await conn.muxer.aclose()
        if conn.close_reason is not None and not self._closing:
            log.warning("connection to %s closed: %s", peer, conn.close_reason)

    async def _run_muxer(
        self, conn: Connection, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            await conn.muxer.run(task_status=task_status)
        except (*STREAM_ERRORS, OSError) as exc:
            conn.close_reason = exc
        finally:
            scope.cancel()

    def _register(self, conn: Connection) -> None:
        conns = self._connections.setdefault(conn.peer_id, [])
        conns.append(conn)
        self._mark_duplicates(conns)
        self.peerstore.add_addrs(conn.peer_id, [conn.remote_addr], PERMANENT, trio.current_time())
        event = self._dials.pop(conn.peer_id, None)
        if event is not None:
            event.set()
        if len(conns) == 1:
            self._notify(conn, True)

    def _unregister(self, conn: Connection) -> None:
        conns = self._connections.get(conn.peer_id, [])
        self._duplicates.discard(conn)
        if conn in conns:
            conns.remove(conn)
        if conns:
            self._mark_duplicates(conns)
        else:
            self._connections.pop(conn.peer_id, None)
            self.peerstore.add_addrs(
                conn.peer_id, [conn.remote_addr], self.config.addr_ttl, trio.current_time()
            )
            self._notify(conn, False)

    def _mark_duplicates(self, conns: list[Connection]) -> None:
        best = min(conns, key=self._preference)
        for conn in conns:
            conn.duplicate = conn is not best
            if conn.duplicate:
                self._duplicates.add(conn)
            else:
                self._duplicates.discard(conn)
        self._duplicates_changed.set()
        self._duplicates_changed = trio.Event()

    def _notify(self, conn: Connection, opened: bool) -> None:
        for listener in list(self._connection_listeners):
            try:
                listener(conn, opened)
            except Exception:
                log.exception("connection listener failed for %s", conn.peer_id)

    async def _sweep_idle(self) -> None:
        """Close connections that carried no stream for their idle limit.

        One task per host rather than a timer per connection: a simulation of
        thousands of hosts would otherwise spend its time waking idle timers.
        """
        config = self.config
        while True:
            interval = min(config.idle_timeout / 4, 30.0)
            if self._duplicates:
                interval = min(interval, config.duplicate_idle_timeout / 4)
            changed = self._duplicates_changed
            with trio.move_on_after(max(0.05, interval)):
                await changed.wait()
            now = trio.current_time()
            for conns in list(self._connections.values()):
                for conn in list(conns):
                    protected = not conn.duplicate and conn.peer_id in self._protected
                    if conn.muxer.num_streams or conn.is_closed or protected:
                        conn.idle_since = None
                        continue
                    limit = config.duplicate_idle_timeout if conn.duplicate else config.idle_timeout
                    if conn.idle_since is None:
                        conn.idle_since = now
                    elif now - conn.idle_since >= limit:
                        log.debug("closing idle connection to %s", conn.peer_id)
                        self._nursery.start_soon(conn.aclose)

    async def _handle_stream(self, conn: Connection, inner: YamuxStream) -> None:
        try:
            protocol, rest = await multistream.negotiate(
                inner,
                multistream.Role.RESPONDER,
                self._handlers.__contains__,
                timeout=self.config.negotiate_timeout,
            )
        except (*STREAM_ERRORS, multistream.NegotiationFailed) as exc:
            log.debug("stream from %s failed negotiation: %s", conn.peer_id, exc)
            await inner.reset()
            return
        handler = self._handlers.get(protocol)
        stream = NetStream(inner, protocol, conn, rest)
        if handler is None:
            await stream.reset()
            return
        try:
            await handler(stream)
        except STREAM_ERRORS as exc:
            if not self._closing and not conn.is_closed:
                log.info("%s stream from %s ended: %s", protocol, conn.peer_id, exc)
            await stream.reset()
        except Exception:
            log.exception("handler for %s failed on a stream from %s", protocol, conn.peer_id)
            await stream.reset()
        else:
            await stream.aclose()

    # ---- dialing -------------------------------------------------------------------

    async def connect(
        self, target: PeerId | Multiaddr | str, *, timeout: float | None = None
    ) -> Connection:
        """A connection to the peer, reusing an open one; simultaneous calls share a dial."""
        if self._closing:
            raise HostClosed("host is closing")
        peer, addrs = self._resolve(target)
        with trio.fail_after(timeout or self.config.dial_timeout * 3):
            if peer is not None:
                if peer == self.peer_id:
                    raise DialError("refusing to dial ourselves")
                while True:
                    existing = self.connection(peer)
                    if existing is not None:
                        return existing
                    pending = self._dials.get(peer)
                    if pending is None:
                        break
                    await pending.wait()
                    if self.connection(peer) is None:
                        break
                addrs = addrs or self.peerstore.addrs(peer, trio.current_time())
                if not addrs:
                    raise DialError(f"no known address for {peer}")
                self._dials[peer] = trio.Event()
            try:
                return await self._dial_any(peer, addrs)
            finally:
                if peer is not None:
                    event = self._dials.pop(peer, None)
                    if event is not None:
                        event.set()

    def _resolve(self, target: PeerId | Multiaddr | str) -> tuple[PeerId | None, list[Multiaddr]]:
        if isinstance(target, PeerId):
            return target, []
        addr = Multiaddr.parse(target) if isinstance(target, str) else target
        peer = addr.peer_id
        bare = addr.without_peer_id()
        if peer is not None:
            self.peerstore.add_addrs(peer, [bare], self.config.addr_ttl, trio.current_time())
        return peer, [bare]

    async def _dial_any(self, peer: PeerId | None, addrs: list[Multiaddr]) -> Connection:
        failures: list[str] = []
        for addr in addrs:
            try:
                return await self._dial(peer, addr)
            except DIAL_ERRORS as exc:
                failures.append(f"{addr}: {_describe(exc)}")
        target = f"{peer} at " if peer is not None else ""
        raise DialError(f"could not connect to {target}" + "; ".join(failures))

    async def _dial(self, peer: PeerId | None, addr: Multiaddr) -> Connection:
        transport = self._transport_for(addr)
        with trio.fail_after(self.config.dial_timeout):
            raw = await transport.dial(addr if peer is None else addr.with_peer_id(peer))
        return await self.adopt(raw, peer, initiator=True)

    async def adopt(
        self, raw: RawConnection, peer: PeerId | None, *, initiator: bool
    ) -> Connection:
        """Upgrade a raw connection we opened, in the given role, and serve it.

        Dials are initiators; in a hole punch (a TCP simultaneous open, where both ends
        dialed) the protocol that punched it says which end is which.
        """
        try:
            upgraded = await self._upgrade(raw, initiator=initiator, expected_peer=peer)
        except BaseException:
            await trio.aclose_forcefully(raw.stream)
            raise
        conn = Connection(
            self,
            peer_id=upgraded.peer_id,
            public_key=upgraded.public_key,
            muxer=upgraded.muxer,
            raw=raw,
            direction="outbound" if initiator else "inbound",
        )
        await self._nursery.start(self._serve_connection, conn)
        return conn

    async def dial_back(self, peer: PeerId, addr: Multiaddr) -> None:
        """Prove `peer` is reachable at `addr`: a fresh dial and handshake, then hang up.

        Never reuses or registers a connection, so an open one cannot fake the answer.
        Raises one of DIAL_ERRORS when the dial or the handshake fails.
        """
        config = self.config
        transport = self._transport_for(addr)
        with trio.fail_after(config.dial_timeout):
            raw = await transport.dial(addr.with_peer_id(peer))
        try:
            await self._upgrade(raw, initiator=True, expected_peer=peer)
        finally:
            await trio.aclose_forcefully(raw.stream)

    async def new_stream(
        self,
        peer: PeerId | Multiaddr | str,
        protocols: Sequence[str],
        *,
        timeout: float | None = None,
        lazy: bool = False,
    ) -> NetStream:
        """Connect if needed, open a stream and negotiate one of `protocols`."""
        conn = await self.connect(peer, timeout=timeout)
        return await conn.new_stream(protocols, timeout=timeout, lazy=lazy)

    async def disconnect(self, peer: PeerId) -> None:
        """Close every connection to `peer`."""
        for conn in list(self._connections.get(peer, ())):
            await conn.aclose()

    # ---- shutdown ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop listening, say GoAway on every connection, then cancel what is left."""
        if self._closing:
            return
        self._closing = True
        for scope in self._listener_scopes:
            scope.cancel()
        with trio.move_on_after(self.config.close_grace) as scope:
            scope.shield = True
            async with trio.open_nursery() as nursery:
                for conns in list(self._connections.values()):
                    for conn in list(conns):
                        nursery.start_soon(conn.aclose)


class _PendingInbound:
    """An inbound handshake in progress: where it comes from, and how to end it early."""

    __slots__ = ("scope", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.scope = trio.CancelScope()


def _source_of(addr: Multiaddr, expected_peer: PeerId | None) -> str:
    """Who is behind an inbound connection, as far as limits go: its IPv4 address, its
    IPv6 /64 (one home's share), or for a relayed one the peer the relay names."""
    if "p2p-circuit" in addr.protocols():
        return f"circuit/{expected_peer}"
    ip4 = addr.value_for("ip4")
    if ip4 is not None:
        return ip4
    ip6 = addr.value_for("ip6")
    if ip6 is not None:
        try:
            return str(ipaddress.IPv6Network(f"{ip6}/64", strict=False))
        except ValueError:
            return ip6
    return str(addr)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        # trio.open_tcp_stream: "all attempts failed", the reasons in the cause
        return "; ".join(sorted({_describe(e) for e in cause.exceptions}))
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ProtocolError) and exc.code is ErrorCode.AUTH:
        return f"authentication failed ({exc})"
    return str(exc) or type(exc).__name__


def _check_plaintext(config: HostConfig, transports: Sequence[Transport]) -> None:
    if config.insecure_plaintext and not all(isinstance(t, MemoryTransport) for t in transports):
        raise ValueError("insecure_plaintext is only allowed on the in-memory network")


@asynccontextmanager
async def open_host(
    identity: KeyPair | None = None,
    *,
    listen: Sequence[Multiaddr | str] = (),
    transports: Sequence[Transport] | None = None,
    config: HostConfig | None = None,
) -> AsyncIterator[Host]:
    """Run a host (ping and identify included) for the duration of the block."""
    from ._identify import register_identify
    from ._ping import register_ping
    from .relay import CircuitTransport

    config = config or HostConfig()
    transports = transports if transports is not None else [TcpTransport()]
    _check_plaintext(config, transports)
    async with trio.open_nursery() as nursery:
        host = Host(identity or KeyPair.generate(), nursery, transports=transports, config=config)
        host.add_transport(CircuitTransport(host))
        register_ping(host)
        register_identify(host)
        nursery.start_soon(host._sweep_idle)
        body_error: BaseException | None = None
        try:
            for addr in listen:
                await host.listen(addr)
            yield host
        except BaseException as exc:  # re-raised below, outside the nursery's group
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await host.aclose()
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
