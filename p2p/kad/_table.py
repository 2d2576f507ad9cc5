"""The Kademlia routing table: 256 k-buckets by common prefix length with our key.

Sans-IO, like every dbloom core: no sockets, no clock, no randomness of its own.
Time comes in as `now`, randomness as an `rng`, and the trio service does the
rest (pings eviction candidates, runs bucket refreshes, persists snapshots).

Only peers that serve the kad protocol (server mode) are ever offered to the
table; the shell never adds client-mode peers, so their presence cannot pollute
anyone's routing (spec, "Client and server mode").

Full buckets follow the Kademlia paper and rust-libp2p's pending entries: a
newcomer never displaces a live peer. It waits in the bucket's bounded
replacement cache while the shell pings the bucket's least recently seen entry;
only if that entry is dead does the freshest replacement take its place. Long-
lived peers are the ones most likely to stay up, and an attacker cannot flush a
bucket by announcing fresh identities. Unlike ddht, the replacement cache is
bounded and at most one liveness check per bucket is outstanding.
"""

from __future__ import annotations

import bisect
from collections.abc import Container, Iterable
from dataclasses import dataclass, replace
from typing import Final, Protocol, TypeAlias

from .._identity import PeerId
from .._multiaddr import Multiaddr
from ._keys import KEY_BITS, common_prefix_length, peer_key

DEFAULT_K: Final = 20
"""Bucket size, the spec's replication parameter."""
DEFAULT_REPLACEMENTS: Final = 20
"""Replacement candidates remembered per full bucket."""
DEFAULT_CHECK_TIMEOUT: Final = 60.0
"""An unanswered liveness check older than this is presumed lost, so a newer one may start."""
DEFAULT_MAX_FAILURES: Final = 2
"""Queries in a row a table entry may leave unanswered before it is evicted: one lost
packet is forgiven, a sleeping Mac is not kept."""

KEY_BYTES: Final = KEY_BITS // 8


class RandomBits(Protocol):
    """What we need of a random source (`random.Random` fits); the caller owns the seed."""

    def getrandbits(self, k: int, /) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One peer in the table; immutable, so callers can hold it across updates."""

    peer: PeerId
    key: bytes
    """`peer_key(peer)`: where the peer sits in the keyspace."""
    addrs: tuple[Multiaddr, ...]
    last_seen: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Inserted:
    """The peer was new and its bucket had room."""

    entry: Entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Updated:
    """The peer was known; it is now the most recently seen of its bucket."""

    entry: Entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending:
    """The bucket is full: ping `candidate` and report with `on_liveness`.

    The new peer waits in the bucket's replacement cache until then.
    """

    candidate: Entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Cached:
    """The bucket is full and already has a check outstanding: the peer waits as a
    replacement, and there is nothing for the shell to do."""

    entry: Entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Ignored:
    """Not stored: our own id, or a full bucket when replacements are disabled."""


UpdateResult: TypeAlias = Inserted | Updated | Pending | Cached | Ignored


class _Bucket:
    """One k-bucket with its replacement cache; only the table touches it."""

    __slots__ = ("cache", "check", "entries", "refreshed")

    def __init__(self) -> None:
        self.entries: dict[PeerId, Entry] = {}
        self.cache: dict[PeerId, Entry] = {}  # insertion order: oldest first
        self.check: tuple[PeerId, float] | None = None  # (candidate, when it was asked for)
        self.refreshed: float | None = None


class RoutingTable:
    """Who we know, organised so that `closest` answers FIND_NODE cheaply.

    Bucket `i` holds peers whose key shares exactly `i` leading bits with ours,
    so each bucket covers half the keyspace of the previous one and the table
    knows the network densely near us and sparsely far away.
    """

    def __init__(
        self,
        local: PeerId,
        *,
        k: int = DEFAULT_K,
        replacements: int = DEFAULT_REPLACEMENTS,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        if replacements < 0:
            raise ValueError("replacements must be >= 0")
        if check_timeout <= 0:
            raise ValueError("check_timeout must be > 0")
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        self.local: Final = local
        self.local_key: Final = peer_key(local)
        self.k: Final = k
        self.max_replacements: Final = replacements
        self.check_timeout: Final = check_timeout
        self.max_failures: Final = max_failures
        self._failures: dict[PeerId, int] = {}  # queries unanswered in a row, per entry
        # Made on first use: a table of 10,000 peers fills about 14 of the 256.
        self._buckets: dict[int, _Bucket] = {}
        # Every bucket entry (not replacements), and their keys as sorted integers for `closest`.
        self._entries: dict[PeerId, Entry] = {}
        self._keys: list[int] = []
        self._peer_at: dict[int, PeerId] = {}

    # -- membership -----------------------------------------------------------------------------

    def update(self, peer: PeerId, addrs: Iterable[Multiaddr], now: float) -> UpdateResult:
        """Record that `peer` (a kad server) was just seen, reachable at `addrs`.

        Empty `addrs` keep the addresses already known: hearing from a peer over
        a connection it opened tells us it is alive, not that it moved.
        """
        if peer == self.local:
            return Ignored()
        if self._failures:
            self._failures.pop(peer, None)
        key = peer_key(peer)
        bucket = self._bucket(common_prefix_length(self.local_key, key))
        bucket.refreshed = now
        addrs = tuple(addrs)
        old = bucket.entries.get(peer)
        if old is not None:
            entry = Entry(peer=peer, key=key, addrs=addrs or old.addrs, last_seen=now)
            self._put(bucket, entry)
            if bucket.check is not None and bucket.check[0] == peer:
                bucket.check = None  # it spoke to us, which answers the check
            return Updated(entry=entry)
        cached = bucket.cache.pop(peer, None)
        if cached is not None and not addrs:
            addrs = cached.addrs
        entry = Entry(peer=peer, key=key, addrs=addrs, last_seen=now)
        if len(bucket.entries) < self.k:
            self._put(bucket, entry)
            return Inserted(entry=entry)
        if self.max_replacements == 0:
            return Ignored()
        bucket.cache[peer] = entry
        if len(bucket.cache) > self.max_replacements:
            del bucket.cache[next(iter(bucket.cache))]
        if bucket.check is not None and now - bucket.check[1] < self.check_timeout:
            return Cached(entry=entry)
        candidate = min(bucket.entries.values(), key=_last_seen)
        bucket.check = (candidate.peer, now)
        return Pending(candidate=candidate)

    def on_liveness(self, candidate: PeerId, alive: bool, now: float) -> Entry | None:
        """Apply the outcome of pinging a `Pending` candidate.

        Alive: the candidate stays, refreshed, and the replacements stay cached.
        Dead: it is evicted and the freshest replacement takes its place; that
        entry is returned so the shell may connect to it. Reports that no longer
        match the bucket's outstanding check (answered meanwhile, or removed) are
        ignored, so a slow ping cannot evict a peer that has since spoken to us.
        """
        key = peer_key(candidate)
        index = common_prefix_length(self.local_key, key)
        bucket = self._buckets.get(index)
        if bucket is None or bucket.check is None or bucket.check[0] != candidate:
            return None
        bucket.check = None
        entry = bucket.entries.get(candidate)
        if entry is None:
            return None
        if alive:
            self._failures.pop(candidate, None)
            self._put(bucket, replace(entry, last_seen=now))
            return None
        return self._evict(bucket, candidate)

    def query_failed(self, peer: PeerId) -> Entry | None:
        """`peer` did not answer a query (timeout, refused dial, broken stream).

        After `max_failures` in a row it is replaced by the freshest replacement
        (returned, as by `on_liveness`): a Mac that went to sleep stops costing every
        later lookup a query timeout. Only a replacement takes its place, never a gap:
        when our own network is down every query fails, and evicting on that would
        drain the table. Hearing from the peer (`update`, a live ping) resets the count.
        """
        entry = self._entries.get(peer)
        if entry is None:
            return None
        failures = self._failures.get(peer, 0) + 1
        self._failures[peer] = failures
        bucket = self._buckets[common_prefix_length(self.local_key, entry.key)]
        if failures < self.max_failures or not bucket.cache:
            return None
        if bucket.check is not None and bucket.check[0] == peer:
            bucket.check = None
        return self._evict(bucket, peer)

    def remove(self, peer: PeerId) -> bool:
        """Forget `peer` (it failed repeatedly); a replacement takes its place.

        Returns True if the peer was in a bucket or in a replacement cache.
        """
        entry = self._entries.get(peer)
        if entry is None:
            cached = self._buckets.get(common_prefix_length(self.local_key, peer_key(peer)))
            return cached is not None and cached.cache.pop(peer, None) is not None
        bucket = self._buckets[common_prefix_length(self.local_key, entry.key)]
        if bucket.check is not None and bucket.check[0] == peer:
            bucket.check = None
        self._evict(bucket, peer)
        return True

    def load(self, snapshot: Iterable[tuple[PeerId, tuple[Multiaddr, ...]]], now: float) -> int:
        """Add persisted peers, e.g. after a restart; returns how many went into buckets.

        Peers already known keep their live data, overflow goes to replacement
        caches (no checks: nobody is there to ping), and buckets are not marked
        refreshed, so `stale_buckets` asks for an immediate refresh that finds
        out which of these peers are still around.
        """
        added = 0
        for peer, addrs in snapshot:
            if peer == self.local or peer in self._entries:
                continue
            key = peer_key(peer)
            bucket = self._bucket(common_prefix_length(self.local_key, key))
            entry = Entry(peer=peer, key=key, addrs=tuple(addrs), last_seen=now)
            if len(bucket.entries) < self.k:
                bucket.cache.pop(peer, None)
                self._put(bucket, entry)
                added += 1
            elif self.max_replacements > 0 and peer not in bucket.cache:
                bucket.cache[peer] = entry
                if len(bucket.cache) > self.max_replacements:
                    del bucket.cache[next(iter(bucket.cache))]
        return added

    @classmethod
    def restore(
        cls,
        local: PeerId,
        snapshot: Iterable[tuple[PeerId, tuple[Multiaddr, ...]]],
        now: float,
        *,
        k: int = DEFAULT_K,
        replacements: int = DEFAULT_REPLACEMENTS,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ) -> RoutingTable:
        """A new table filled from `snapshot()` output, so a restart rejoins at once."""
        table = cls(
            local,
            k=k,
            replacements=replacements,
            check_timeout=check_timeout,
            max_failures=max_failures,
        )
        table.load(snapshot, now)
        return table

    def snapshot(self) -> list[tuple[PeerId, tuple[Multiaddr, ...]]]:
        """Every bucket entry with its addresses, for the shell to persist.

        Least recently seen first within each bucket, so `load` keeps the order.
        """
        return [
            (entry.peer, entry.addrs)
            for _, bucket in sorted(self._buckets.items())
            for entry in sorted(bucket.entries.values(), key=_last_seen)
        ]

    # -- queries --------------------------------------------------------------------------------

    def closest(self, target: bytes, n: int, *, exclude: Container[PeerId] = ()) -> list[Entry]:
        """The `n` entries nearest `target` (a 32-byte keyspace position), nearest first.

        No scan of the table: every key sharing `p` leading bits with `target`
        is nearer than every key that does not, and those keys form one run of
        the sorted key list. A binary search over `p` finds the smallest such
        run holding `n` entries (two bisects per step), and only that run, a few
        times `n` entries, is sorted. So a call costs O(log table + n log n),
        however big the table or its buckets are.
        """
        if len(target) != KEY_BYTES:
            raise ValueError(f"target must be {KEY_BYTES} bytes")
        if n <= 0 or not self._keys:
            return []
        goal = int.from_bytes(target, "big")
        need = n
        while True:
            lo, hi = self._run_holding(goal, need)
            found = [
                (key ^ goal, peer)
                for key in self._keys[lo:hi]
                if (peer := self._peer_at[key]) not in exclude
            ]
            if len(found) >= n or hi - lo == len(self._keys):
                break
            need = hi - lo + n - len(found)  # grow past the excluded entries
        found.sort()
        return [self._entries[peer] for _, peer in found[:n]]

    def get(self, peer: PeerId) -> Entry | None:
        """The entry for `peer`, if it is in a bucket (replacements do not count)."""
        return self._entries.get(peer)

    def peers(self) -> list[PeerId]:
        """Every peer in a bucket."""
        return list(self._entries)

    def bucket(self, index: int) -> list[Entry]:
        """Bucket `index`'s entries, least recently seen first (for inspection)."""
        return sorted(self._bucket(index).entries.values(), key=_last_seen)

    def replacements(self, index: int) -> list[Entry]:
        """Bucket `index`'s replacement cache, oldest first (for inspection)."""
        return list(self._bucket(index).cache.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer: object) -> bool:
        return peer in self._entries

    # -- refresh --------------------------------------------------------------------------------

    def touch_bucket(self, index: int, now: float) -> None:
        """Mark bucket `index` as refreshed: it just saw traffic or a lookup."""
        self._bucket(index).refreshed = now

    def note_lookup(self, target: bytes, now: float) -> None:
        """A lookup for `target` ran, which refreshes the bucket `target` falls in."""
        index = common_prefix_length(self.local_key, target)
        if index < KEY_BITS:
            self._bucket(index).refreshed = now

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Buckets to refresh: every index up to the deepest non-empty bucket (empty
        ones included, as lookups there are how we discover peers near us) that
        saw no update or lookup within `interval`."""
        deepest = max((i for i, bucket in self._buckets.items() if bucket.entries), default=-1)
        stale = []
        for i in range(deepest + 1):
            bucket = self._buckets.get(i)
            if bucket is None or bucket.refreshed is None or now - bucket.refreshed >= interval:
                stale.append(i)
        return stale

    def random_key_in_bucket(self, index: int, rng: RandomBits) -> bytes:
        """A random keyspace target sharing exactly `index` leading bits with our key;
        a lookup for it refreshes bucket `index`."""
        if not 0 <= index < KEY_BITS:
            raise ValueError(f"bucket index must be in [0, {KEY_BITS})")
        local = int.from_bytes(self.local_key, "big")
        free = KEY_BITS - 1 - index  # bits below the first differing one
        differ = 1 << free
        prefix = (local >> (free + 1)) << (free + 1)
        key = prefix | (~local & differ) | rng.getrandbits(free)
        return key.to_bytes(KEY_BYTES, "big")

    # -- internals ------------------------------------------------------------------------------

    def _bucket(self, index: int) -> _Bucket:
        bucket = self._buckets.get(index)
        if bucket is None:
            if not 0 <= index < KEY_BITS:
                raise IndexError(f"bucket index must be in [0, {KEY_BITS})")
            bucket = self._buckets[index] = _Bucket()
        return bucket

    def _run_holding(self, goal: int, need: int) -> tuple[int, int]:
        """Bounds, in the sorted keys, of the longest prefix of `goal` shared by `need` keys."""
        keys = self._keys
        if need >= len(keys):
            return 0, len(keys)
        shortest, longest = 0, KEY_BITS  # `shortest` always qualifies (it spans every key)
        bounds = (0, len(keys))
        while shortest < longest:
            length = (shortest + longest + 1) // 2
            free = KEY_BITS - length
            low = (goal >> free) << free
            lo = bisect.bisect_left(keys, low)
            hi = bisect.bisect_left(keys, low + (1 << free), lo)
            if hi - lo >= need:
                shortest, bounds = length, (lo, hi)
            else:
                longest = length - 1
        return bounds

    def _put(self, bucket: _Bucket, entry: Entry) -> None:
        """Insert or replace `entry`, making it the most recent of its bucket."""
        peer = entry.peer
        bucket.entries.pop(peer, None)
        bucket.entries[peer] = entry
        if peer not in self._entries:
            key = int.from_bytes(entry.key, "big")
            bisect.insort(self._keys, key)
            self._peer_at[key] = peer
        self._entries[peer] = entry

    def _evict(self, bucket: _Bucket, peer: PeerId) -> Entry | None:
        self._failures.pop(peer, None)
        del bucket.entries[peer]
        key = int.from_bytes(self._entries.pop(peer).key, "big")
        del self._keys[bisect.bisect_left(self._keys, key)]
        del self._peer_at[key]
        if not bucket.cache:
            return None
        _, promoted = bucket.cache.popitem()  # the most recently seen replacement
        self._put(bucket, promoted)
        return promoted


def _last_seen(entry: Entry) -> float:
    return entry.last_seen
