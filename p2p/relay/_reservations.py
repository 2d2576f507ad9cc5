"""What a relay promises and to whom: reservations and circuits, each under a cap.

Sans-IO: every call that cares about time takes `now` (trio's monotonic clock).
A relay serves strangers, so everything is bounded: reservations in total and per
IP address (one peer holds one slot; a refresh renews it), circuits in total and per
peer at either end, and each circuit in seconds and in bytes per direction. Every
refusal is counted by reason, so an operator sees which limit is being pushed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final

from .._identity import PeerId
from ._messages import Limit, Status

DEFAULT_RESERVATION_TTL: Final = 3600.0  # go-libp2p's; the holder refreshes well before
DEFAULT_MAX_RESERVATIONS: Final = 128
DEFAULT_MAX_RESERVATIONS_PER_IP: Final = 8
DEFAULT_MAX_CIRCUITS: Final = 64
DEFAULT_MAX_CIRCUITS_PER_PEER: Final = 8
DEFAULT_CIRCUIT_SECONDS: Final = 600  # a long generation fits; hole punching should replace it
DEFAULT_CIRCUIT_BYTES: Final = 16 << 20  # tokens are small: 16 MiB is hours of streaming


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayLimits:
    """A relay's caps; the defaults suit a small always-on machine helping home Macs."""

    reservation_ttl: float = DEFAULT_RESERVATION_TTL
    max_reservations: int = DEFAULT_MAX_RESERVATIONS
    max_reservations_per_ip: int = DEFAULT_MAX_RESERVATIONS_PER_IP
    max_circuits: int = DEFAULT_MAX_CIRCUITS
    max_circuits_per_peer: int = DEFAULT_MAX_CIRCUITS_PER_PEER
    circuit_seconds: int = DEFAULT_CIRCUIT_SECONDS
    circuit_bytes: int = DEFAULT_CIRCUIT_BYTES

    def __post_init__(self) -> None:
        if min(self.reservation_ttl, self.circuit_seconds, self.circuit_bytes) <= 0:
            raise ValueError("a relay bounds every reservation and circuit: limits must be > 0")
        counts = (self.max_reservations, self.max_reservations_per_ip, self.max_circuits)
        if min(*counts, self.max_circuits_per_peer) < 0:
            raise ValueError("relay counts must not be negative")

    @property
    def circuit_limit(self) -> Limit:
        """What the relay tells both ends of a circuit."""
        return Limit(duration=self.circuit_seconds, data=self.circuit_bytes)


@dataclass(slots=True)
class Slot:
    """One peer's reservation; `expires` is on the monotonic clock."""

    peer: PeerId
    ip: str | None
    expires: float


class RelayState:
    """Reservations and open circuits of one relay."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.limits = limits or RelayLimits()
        self._slots: dict[PeerId, Slot] = {}
        self._circuits: Counter[PeerId] = Counter()
        self.circuits = 0
        self.refused: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._slots)

    def reserve(self, peer: PeerId, ip: str | None, now: float) -> Slot | Status:
        """Grant or renew `peer`'s slot, or say why not."""
        limits = self.limits
        slot = self._slots.get(peer)
        if slot is None:
            live = [s for s in self._slots.values() if s.expires > now]
            if len(live) >= limits.max_reservations:
                return self._refuse("reservations-total", Status.RESERVATION_REFUSED)
            same_ip = sum(1 for s in live if ip is not None and s.ip == ip)
            if same_ip >= limits.max_reservations_per_ip:
                return self._refuse("reservations-ip", Status.RESERVATION_REFUSED)
            slot = self._slots[peer] = Slot(peer, ip, now)
        slot.ip = ip
        slot.expires = now + limits.reservation_ttl
        return slot

    def has_reservation(self, peer: PeerId, now: float) -> bool:
        """True while `peer` holds an unexpired slot."""
        slot = self._slots.get(peer)
        return slot is not None and slot.expires > now

    def cancel(self, peer: PeerId) -> None:
        """Forget `peer`'s slot (it disconnected: the spec voids the reservation)."""
        self._slots.pop(peer, None)

    def prune(self, now: float) -> list[PeerId]:
        """Drop expired slots; returns whose."""
        expired = [peer for peer, slot in self._slots.items() if slot.expires <= now]
        for peer in expired:
            del self._slots[peer]
        return expired

    def open_circuit(self, src: PeerId, dst: PeerId, now: float) -> Status:
        """Admit a circuit from `src` to `dst` (OK), or say why not; pair with `close_circuit`."""
        limits = self.limits
        if not self.has_reservation(dst, now):
            return self._refuse("no-reservation", Status.NO_RESERVATION)
        if self.circuits >= limits.max_circuits:
            return self._refuse("circuits-total", Status.RESOURCE_LIMIT_EXCEEDED)
        if max(self._circuits[src], self._circuits[dst]) >= limits.max_circuits_per_peer:
            return self._refuse("circuits-peer", Status.RESOURCE_LIMIT_EXCEEDED)
        self.circuits += 1
        self._circuits[src] += 1
        self._circuits[dst] += 1
        return Status.OK

    def close_circuit(self, src: PeerId, dst: PeerId) -> None:
        """A circuit admitted by `open_circuit` ended."""
        self.circuits -= 1
        for peer in (src, dst):
            self._circuits[peer] -= 1
            if self._circuits[peer] <= 0:
                del self._circuits[peer]

    def _refuse(self, reason: str, status: Status) -> Status:
        self.refused[reason] += 1
        return status


class CircuitBudget:
    """Bytes a circuit may still carry in each direction (0 in the limit: unlimited)."""

    __slots__ = ("_left",)

    def __init__(self, limit: Limit) -> None:
        cap = limit.data or None
        self._left: list[int | None] = [cap, cap]

    def take(self, direction: int, size: int) -> int:
        """How many of `size` bytes may pass in `direction` (0 or 1); the rest breaks the limit."""
        left = self._left[direction]
        if left is None:
            return size
        allowed = min(left, size)
        self._left[direction] = left - allowed
        return allowed
