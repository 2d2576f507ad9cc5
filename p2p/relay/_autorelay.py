"""Become reachable from behind NAT: check with dial-backs, and if private, hold relay slots.

Each round finds relays in the DHT (providers of `dbloom:relay`), asks some of them to
dial us back (AutoNAT), and, while we are private, keeps reservations on `relays` of
them. The circuit addresses of those reservations are advertised (identify, and
whatever reads `Host.advertised_addrs`). A public verdict releases the relays.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from .._host import DIAL_ERRORS, DialError
from ..kad._keys import provider_key
from ..multistream import NegotiationFailed
from ._client import RelayClient
from ._dialback import probe
from ._reachability import Reachability, ReachabilityTracker

if TYPE_CHECKING:
    from .._host import Host
    from .._identity import PeerId
    from ..kad import KademliaDHT

log = logging.getLogger("dbloom.p2p.relay")

RELAY_KEY: Final = "dbloom:relay"
"""DHT provider name under which relays announce themselves (see `kad.provider_key`)."""
LOOKUP_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoRelayConfig:
    """How many relays to hold, how often to look again, how sure to be before acting."""

    relays: int = 2
    candidates: int = 8
    max_probes: int = 3
    confidence: int = 2
    recheck_interval: float = 600.0
    retry_interval: float = 30.0
    give_up_after: int = 3


class AutoRelay:
    """Runs reachability checks and relay reservations for `host`."""

    def __init__(
        self,
        host: Host,
        dht: KademliaDHT,
        client: RelayClient | None = None,
        config: AutoRelayConfig | None = None,
    ) -> None:
        self.host = host
        self.dht = dht
        self.client = client or RelayClient(host)
        self.config = config or AutoRelayConfig()
        self.tracker = ReachabilityTracker(confidence=self.config.confidence)
        self._held: dict[PeerId, trio.CancelScope] = {}
        self._lost = trio.Event()
        self.changed = trio.Event()

    @property
    def reachability(self) -> Reachability:
        """The current verdict."""
        return self.tracker.status

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check, reserve and re-check until cancelled."""
        config = self.config
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                with trio.move_on_after(LOOKUP_TIMEOUT):
                    await self._round(nursery)
                settled = self.reachability is Reachability.PUBLIC or (
                    self.reachability is Reachability.PRIVATE and len(self._held) >= config.relays
                )
                # settled: look again after recheck_interval, or soon after losing a relay
                self._lost = trio.Event()
                if settled:
                    with trio.move_on_after(config.recheck_interval):
                        await self._lost.wait()
                await trio.sleep(config.retry_interval)

    async def _round(self, nursery: trio.Nursery) -> None:
        relays = await self._find_relays()
        before = (self.reachability, len(self._held))
        if not self.host.listen_addrs:
            self.tracker.unlistened()
        else:
            await self._check(relays)
        if self.reachability is Reachability.PRIVATE:
            for relay in relays:
                if len(self._held) >= self.config.relays:
                    break
                if relay not in self._held:
                    await self._try_reserve(nursery, relay)
        elif self.reachability is Reachability.PUBLIC:
            for scope in self._held.values():
                scope.cancel()
        if (self.reachability, len(self._held)) != before:
            self._notify()

    async def _find_relays(self) -> list[PeerId]:
        """Relays from the DHT, in random order, with their addresses in the peerstore."""
        infos = await self.dht.find_providers_list(
            provider_key(RELAY_KEY), count=self.config.candidates
        )
        now = trio.current_time()
        found = []
        for info in infos:
            if info.peer_id == self.host.peer_id:
                continue
            self.host.peerstore.add_addrs(
                info.peer_id, list(info.addrs), self.host.config.addr_ttl, now
            )
            found.append(info.peer_id)
        random.shuffle(found)
        return found

    async def _check(self, servers: list[PeerId]) -> None:
        """Ask up to `max_probes` servers to dial us back, until one reaches us."""
        for server in servers[: self.config.max_probes]:
            try:
                response = await probe(self.host, server)
            except (DialError, NegotiationFailed, *DIAL_ERRORS) as exc:
                log.debug("no dial-back answer from %s: %s", server, exc)
                continue
            if self.tracker.record(server, response) is Reachability.PUBLIC:
                return

    async def _try_reserve(self, nursery: trio.Nursery, relay: PeerId) -> None:
        scope = trio.CancelScope()
        try:
            await nursery.start(self._hold, relay, scope)
        except (DialError, *DIAL_ERRORS) as exc:
            log.info("relay %s would not take a reservation: %s", relay, exc)

    async def _hold(
        self, relay: PeerId, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Reserve (failing the caller's start if refused), then renew until cancelled."""
        held = await self.client.reserve(relay)
        self._held[relay] = scope
        task_status.started()
        try:
            with scope:
                await self.client.renew(relay, held, give_up_after=self.config.give_up_after)
        finally:
            self._held.pop(relay, None)
            self._lost.set()
            self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
