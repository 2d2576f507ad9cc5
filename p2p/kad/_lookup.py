"""The iterative Kademlia lookup as a sans-IO state machine.

The shape is rust-libp2p's `ClosestPeersIter`: the shell calls `next(now)` in a
loop and sends one FIND_NODE (or GET_VALUE, GET_PROVIDERS: the lookup does not
care) per `Query`, reports each outcome with `on_success`/`on_failure`, and on
`Waiting` sleeps until a reply arrives or `until`. Time only enters as `now`,
so timeouts, hostile replies and whole networks are testable without trio.

With `disjoint_paths = d > 1` it is S/Kademlia's disjoint lookup (Baumgart and
Mies 2007; rust-libp2p's `ClosestDisjointPeersIter`): the seeds are dealt
round-robin to `d` paths, each with its own candidates and its own α, and a
peer is queried by the first path to claim it only. A path that meets a peer
another path claimed sees that path's outcome but never its closer peers, so
peers an adversary feeds into one path cannot spread to the others, and one
honest path suffices to reach the honest closest peers.
"""

from __future__ import annotations

import bisect
import enum
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from .._identity import PeerId
from ._keys import KEY_BITS, peer_key

DEFAULT_ALPHA: Final = 3
"""Queries in flight per path."""
DEFAULT_K: Final = 20
"""Results wanted, and closer peers taken from any one reply."""
DEFAULT_PEER_TIMEOUT: Final = 10.0
DEFAULT_SLOW_AFTER: Final = 3.0
"""A query unanswered this long stops holding up the lookup (a sleeping Mac never
answers, and dropped packets look the same until `peer_timeout`)."""
DEFAULT_LOOKUP_TIMEOUT: Final = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """Send the lookup's request to `peer`, then report with `on_success`/`on_failure`."""

    peer: PeerId


@dataclass(frozen=True, slots=True, kw_only=True)
class Waiting:
    """Nothing to send now: wait for a reply, or until `until`, then call `next` again.

    `until` is the earliest moment a query turns slow or times out, or the lookup's
    deadline, whichever is sooner, so it is always set.
    """

    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """The lookup is over; read `closest()` and the counters. Cancel queries still out."""


Step: TypeAlias = Query | Waiting | Finished

_FINISHED: Final = Finished()


class _State(enum.Enum):
    NEW = 0
    WAITING = 1
    SUCCEEDED = 2
    FAILED = 3  # errored, timed out, or answered too late


class _Peer:
    """One peer the lookup has heard of, shared by every path that knows it."""

    __slots__ = ("deadline", "distance", "hop", "path", "peer", "slow", "slow_at", "state")

    def __init__(self, peer: PeerId, distance: int, hop: int) -> None:
        self.peer = peer
        self.distance = distance
        self.hop = hop
        self.state = _State.NEW
        self.path = -1  # the path that queried it
        self.deadline = 0.0
        self.slow_at = 0.0
        self.slow = False  # out past `slow_after`: no longer counted in α or awaited


def _distance(record: _Peer) -> int:
    return record.distance


class _Path:
    """One disjoint path: its candidates (nearest first) and its queries in flight."""

    __slots__ = ("candidates", "finished", "in_flight", "known")

    def __init__(self) -> None:
        self.candidates: list[_Peer] = []
        self.known: set[PeerId] = set()
        self.in_flight = 0
        self.finished = False

    def add(self, record: _Peer) -> None:
        self.known.add(record.peer)
        bisect.insort(self.candidates, record, key=_distance)


class _Busy:
    """A path is waiting on queries in flight (its own, or another path's)."""


_BUSY: Final = _Busy()


class Lookup:
    """Find the `k` peers nearest `target` that answer, by asking ever closer peers.

    Terminates as Kademlia does: a path is done once the `k` nearest peers it
    knows that have not failed have all answered (queries still in flight to
    farther peers are abandoned), or when it runs out of candidates. The lookup
    is done when every path is, or at `lookup_timeout`.

    Replies are untrusted: from one reply only the `k` listed peers nearest the
    target are used, our own id (`local`) and the responder itself are skipped,
    and replies from peers we did not query, duplicates and replies arriving
    after `peer_timeout` are ignored. For disjoint lookups, seed with about
    `k * disjoint_paths` peers so that every path starts with enough.

    A query out longer than `slow_after` turns slow (rust-libp2p's "unresponsive"): it
    frees its α slot for another peer, and termination no longer waits for it unless
    the path has nobody else left to ask; a reply before `peer_timeout` still counts.
    Without this one silent peer among the nearest holds the whole lookup for
    `peer_timeout`, and with Macs going to sleep that is most lookups (the simulator
    measured `put` and `provide` at 20-30 s).
    """

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[PeerId],
        *,
        alpha: int = DEFAULT_ALPHA,
        k: int = DEFAULT_K,
        peer_timeout: float = DEFAULT_PEER_TIMEOUT,
        slow_after: float = DEFAULT_SLOW_AFTER,
        lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT,
        disjoint_paths: int = 1,
        local: PeerId | None = None,
        now: float,
    ) -> None:
        if len(target) != KEY_BITS // 8:
            raise ValueError(f"target must be {KEY_BITS // 8} bytes")
        if alpha < 1 or k < 1 or disjoint_paths < 1:
            raise ValueError("alpha, k and disjoint_paths must be >= 1")
        if peer_timeout <= 0 or lookup_timeout <= 0 or slow_after <= 0:
            raise ValueError("timeouts must be > 0")
        self.target: Final = target
        self.alpha: Final = alpha
        self.k: Final = k
        self.peer_timeout: Final = peer_timeout
        self.slow_after: Final = min(slow_after, peer_timeout)
        self.local: Final = local
        self._goal = int.from_bytes(target, "big")
        self._deadline = now + lookup_timeout
        self._records: dict[PeerId, _Peer] = {}
        self._in_flight: dict[PeerId, _Peer] = {}
        self._paths = [_Path() for _ in range(disjoint_paths)]
        self._finished = False
        self._timed_out = False
        self._contacted = 0
        self._succeeded = 0
        self._failed = 0
        unique = {peer for peer in seeds if peer != local}
        ordered = sorted((self._new_record(peer, hop=1) for peer in unique), key=_distance)
        for i, record in enumerate(ordered):
            self._paths[i % disjoint_paths].add(record)

    # -- driving --------------------------------------------------------------------------------

    def next(self, now: float) -> Step:
        """What the shell should do now; queries past `peer_timeout` count as failed here."""
        if self._finished:
            return _FINISHED
        if now >= self._deadline:
            self._finish(timed_out=True)
            return _FINISHED
        for record in [r for r in self._in_flight.values() if now >= r.deadline]:
            self._fail(record)
        for record in self._in_flight.values():
            if not record.slow and now >= record.slow_at:
                record.slow = True
                self._paths[record.path].in_flight -= 1
        all_done = True
        for index, path in enumerate(self._paths):
            if path.finished:
                continue
            step = self._step(index, now)
            if isinstance(step, Query):
                return step
            if step is _FINISHED:
                path.finished = True
            else:
                all_done = False
        if all_done:
            self._finish(timed_out=False)
            return _FINISHED
        earliest = min(
            (r.deadline if r.slow else r.slow_at for r in self._in_flight.values()),
            default=self._deadline,
        )
        return Waiting(until=min(earliest, self._deadline))

    def on_success(self, peer: PeerId, closer: Sequence[PeerId], now: float) -> bool:
        """`peer` answered, naming `closer` peers; False if the reply was ignored.

        A reply at or past the query's timeout counts as a failure, whatever the
        order in which the shell reports it and calls `next`.
        """
        record = self._in_flight.get(peer)
        if record is None or self._finished:
            return False
        if now >= record.deadline:
            self._fail(record)
            return False
        del self._in_flight[peer]
        if not record.slow:
            self._paths[record.path].in_flight -= 1
        record.state = _State.SUCCEEDED
        self._succeeded += 1
        path = self._paths[record.path]
        for distance, new in self._nearest(peer, closer):
            if new in path.known:
                continue
            found = self._records.get(new)
            if found is None:
                found = self._new_record(new, hop=record.hop + 1, distance=distance)
            path.add(found)
        return True

    def on_failure(self, peer: PeerId, now: float) -> bool:
        """The query to `peer` failed (error, refused, bad reply); False if ignored.

        `now` only mirrors `on_success`: a failure counts the same whenever it comes.
        """
        record = self._in_flight.get(peer)
        if record is None or self._finished:
            return False
        self._fail(record)
        return True

    # -- results --------------------------------------------------------------------------------

    def closest(self) -> list[PeerId]:
        """The `k` peers nearest the target that answered, nearest first."""
        return [r.peer for r in self._closest_records()]

    @property
    def finished(self) -> bool:
        """True once `next` has returned `Finished`."""
        return self._finished

    @property
    def timed_out(self) -> bool:
        """True if the lookup stopped at `lookup_timeout` rather than converging."""
        return self._timed_out

    @property
    def hops(self) -> int:
        """Hop at which the nearest result was found (seeds are hop 1); 0 if none."""
        best = self._closest_records()
        return best[0].hop if best else 0

    @property
    def contacted(self) -> int:
        """Queries sent."""
        return self._contacted

    @property
    def succeeded(self) -> int:
        """Queries answered in time."""
        return self._succeeded

    @property
    def failed(self) -> int:
        """Queries that errored or timed out."""
        return self._failed

    @property
    def outstanding(self) -> int:
        """Queries sent and not yet answered or failed, slow ones included."""
        return len(self._in_flight)

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Queries outstanding and not yet slow on each path (each at most `alpha`)."""
        return tuple(path.in_flight for path in self._paths)

    # -- internals ------------------------------------------------------------------------------

    def _step(self, index: int, now: float) -> Query | Finished | _Busy:
        """Rust-libp2p's scan: walk candidates nearest first, count answers until one
        is still undecided, and query the first uncontacted peer if α allows."""
        path = self._paths[index]
        successes = 0
        undecided = False
        slow = False
        for record in path.candidates:
            state = record.state
            if state is _State.SUCCEEDED:
                if not undecided:
                    successes += 1
                    if successes >= self.k:
                        return _FINISHED
            elif state is _State.WAITING:
                if record.slow:
                    slow = True
                else:
                    undecided = True
            elif state is _State.NEW:
                if path.in_flight >= self.alpha:
                    return _BUSY
                record.state = _State.WAITING
                record.path = index
                record.deadline = now + self.peer_timeout
                record.slow_at = now + self.slow_after
                path.in_flight += 1
                self._in_flight[record.peer] = record
                self._contacted += 1
                return Query(peer=record.peer)
        # Out of candidates: a slow query is all that might still bring peers.
        return _BUSY if undecided or slow else _FINISHED

    def _nearest(self, responder: PeerId, closer: Sequence[PeerId]) -> list[tuple[int, PeerId]]:
        """The `k` distinct peers of a reply nearest the target, skipping us and the responder."""
        scored: dict[PeerId, int] = {}
        for peer in closer:
            if peer in scored or peer == responder or peer == self.local:
                continue
            known = self._records.get(peer)
            scored[peer] = (
                known.distance
                if known is not None
                else int.from_bytes(peer_key(peer), "big") ^ self._goal
            )
        if len(scored) <= self.k:
            return [(d, p) for p, d in scored.items()]
        return heapq.nsmallest(self.k, ((d, p) for p, d in scored.items()))

    def _new_record(self, peer: PeerId, *, hop: int, distance: int | None = None) -> _Peer:
        if distance is None:
            distance = int.from_bytes(peer_key(peer), "big") ^ self._goal
        record = _Peer(peer, distance, hop)
        self._records[peer] = record
        return record

    def _fail(self, record: _Peer) -> None:
        del self._in_flight[record.peer]
        if not record.slow:
            self._paths[record.path].in_flight -= 1
        record.state = _State.FAILED
        self._failed += 1

    def _finish(self, *, timed_out: bool) -> None:
        self._finished = True
        self._timed_out = timed_out

    def _closest_records(self) -> list[_Peer]:
        answered = (r for r in self._records.values() if r.state is _State.SUCCEEDED)
        return heapq.nsmallest(self.k, answered, key=_distance)
