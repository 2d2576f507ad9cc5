"""The server side of kad-dht as a pure core: a request and `now` in, a reply out.

The trio service answers the network with it and the simulator answers its
virtual peers with the same object, so both refuse, store and route alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from .._errors import DecodeError
from .._identity import PeerId
from .._multiaddr import Multiaddr
from ._keys import kad_key
from ._messages import ConnectionType, KadMessage, MessageType, PeerInfo, Record
from ._store import ProviderStore, RecordRejected, RecordStore
from ._table import RoutingTable

log = logging.getLogger("dbloom.p2p.kad")

AddrsOf = Callable[[PeerId], tuple[Multiaddr, ...]]
"""The addresses we know for a peer (empty if none)."""
IsConnected = Callable[[PeerId], bool]

_PING: Final = KadMessage(type=MessageType.PING)
MAX_CACHED_INFOS: Final = 4096


class KadResponder:
    """Answers FIND_NODE, GET/PUT_VALUE, ADD/GET_PROVIDERS and PING from one peer's state."""

    def __init__(
        self,
        table: RoutingTable,
        records: RecordStore,
        providers: ProviderStore,
        *,
        k: int,
        addrs_of: AddrsOf,
        is_connected: IsConnected,
    ) -> None:
        self.table = table
        self.records = records
        self.providers = providers
        self.k = k
        self._addrs_of = addrs_of
        self._is_connected = is_connected
        self._infos: dict[PeerId, PeerInfo] = {}

    def answer(self, sender: PeerId, request: KadMessage, now: float) -> KadMessage | None:
        """The reply to `request` (None for ADD_PROVIDER); DecodeError for what we refuse."""
        kind = request.type
        if kind is MessageType.PING:
            return _PING
        if kind is MessageType.FIND_NODE:
            return KadMessage(
                type=kind, key=request.key, closer_peers=self.closer(request.key, sender, now)
            )
        if kind is MessageType.GET_VALUE:
            value = self.records.get(request.key, now)
            record = Record(key=request.key, value=value) if value is not None else None
            return KadMessage(
                type=kind,
                key=request.key,
                record=record,
                closer_peers=self.closer(request.key, sender, now),
            )
        if kind is MessageType.PUT_VALUE:
            assert request.record is not None  # the decoder insists on it
            try:
                self.records.put(request.key, request.record.value, from_peer=sender, now=now)
            except RecordRejected as exc:
                log.info("refused a record from %s: %s", sender, exc.reason)
                raise DecodeError(f"record refused: {exc.reason}") from None
            return request
        if kind is MessageType.ADD_PROVIDER:
            for provider in request.provider_peers:
                if provider.peer_id != sender:
                    continue
                addrs = provider.addrs or self._addrs_of(sender)
                try:
                    self.providers.add(request.key, PeerInfo(peer_id=sender, addrs=addrs), now)
                except RecordRejected as exc:
                    log.info("refused a provider record from %s: %s", sender, exc.reason)
            return None
        if kind is MessageType.GET_PROVIDERS:
            return KadMessage(
                type=kind,
                key=request.key,
                provider_peers=tuple(self.providers.get(request.key, now, limit=self.k)),
                closer_peers=self.closer(request.key, sender, now),
            )
        raise DecodeError(f"unsupported kad message type {kind}")

    def closer(self, key: bytes, asker: PeerId, now: float) -> tuple[PeerInfo, ...]:
        """The `k` peers of our table nearest `key`, never the asker itself."""
        return tuple(
            self._info(entry.peer, self._addrs_of(entry.peer) or entry.addrs)
            for entry in self.table.closest(kad_key(key), self.k, exclude={asker})
        )

    def _info(self, peer: PeerId, addrs: tuple[Multiaddr, ...]) -> PeerInfo:
        """A reply entry, reused while nothing about the peer changed (replies repeat peers)."""
        connection = (
            ConnectionType.CONNECTED if self._is_connected(peer) else ConnectionType.CAN_CONNECT
        )
        info = self._infos.get(peer)
        if info is None or info.addrs != addrs or info.connection is not connection:
            if len(self._infos) >= MAX_CACHED_INFOS:
                self._infos.clear()
            info = self._infos[peer] = PeerInfo(peer_id=peer, addrs=addrs, connection=connection)
        return info
