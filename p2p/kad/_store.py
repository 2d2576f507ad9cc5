"""What a DHT server keeps for others: validated records and provider announcements.

Sans-IO: the service passes `now` (the monotonic clock, in seconds) into every
call. Both stores hold data from strangers, so each is bounded per sender and
in total, and every refusal is counted by reason so an operator can see who is
pushing against which limit.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, NoReturn, Protocol

from .._identity import PeerId
from ._envelope import NodeEnvelope, open_node_record
from ._envelope import RecordRejected as RecordRejected
from ._keys import NODE_RECORD_PREFIX, node_record_key
from ._messages import PeerInfo

DEFAULT_MAX_RECORD_SIZE: Final = 64 * 1024
DEFAULT_MAX_RECORDS_PER_PEER: Final = 256
DEFAULT_MAX_TOTAL_BYTES: Final = 64 * 1024 * 1024
DEFAULT_RECORD_TTL: Final = 36 * 3600.0  # go-libp2p's MaxRecordAge
DEFAULT_PROVIDER_TTL: Final = 600.0  # Macs sleep: a stale provider costs a client a failed dial
DEFAULT_MAX_PROVIDERS_PER_KEY: Final = 10_000
"""A popular model is served by thousands of Macs: each must stay findable, and a Sybil
must announce as many peers as are kept to crowd the honest ones out."""
DEFAULT_MAX_PROVIDER_KEYS: Final = 100_000
DEFAULT_MAX_TOTAL_PROVIDERS: Final = 500_000
DEFAULT_MAX_PROVIDER_KEY_SIZE: Final = 128
"""Provider keys are multihashes (34 bytes for sha2-256, 66 for sha2-512); anything far
longer is an attempt to make us store a large blob under a key."""
DEFAULT_MAX_KEYS_PER_PROVIDER: Final = 256
"""Keys one peer may be provider of at once: a dbloom peer announces a few (its models,
`dbloom:nodes`, `dbloom:relay`), so one identity cannot fill the store."""
DEFAULT_MAX_PROVIDER_BYTES: Final = 64 * 1024 * 1024
"""Keys and addresses held across all provider entries (each address counted as encoded)."""
PROVIDER_ENTRY_OVERHEAD: Final = 64


class Validator(Protocol):
    """Decides which values are acceptable under a namespace, and which of several is best.

    Both must be pure and deterministic, so every node agrees and the network
    converges on one value per key.
    """

    def validate(self, key: bytes, value: bytes) -> None:
        """Raise RecordRejected unless `value` may be stored under `key`."""

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        """Index of the best of `values` (all validated); the first of equals wins."""


def record_namespace(key: bytes) -> str | None:
    """The validator namespace of a record key: `/dbloom/node/x` → "dbloom", as libp2p splits it."""
    parts = key.split(b"/")
    if len(parts) < 3 or parts[0] != b"" or not parts[1]:
        return None
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


class NodeRecordValidator:
    """The `dbloom` namespace: `/dbloom/node/<peer-id>` holds that peer's signed node record.

    Only the peer itself can sign one, so a relaying node cannot forge or alter
    it; the highest `seq` is the newest.
    """

    __slots__ = ("max_size",)

    def __init__(self, *, max_size: int = DEFAULT_MAX_RECORD_SIZE) -> None:
        self.max_size = max_size

    def open(self, key: bytes, value: bytes) -> NodeEnvelope:
        """Validate and return the opened envelope (the service reads `data` from it)."""
        if not key.startswith(NODE_RECORD_PREFIX):
            raise RecordRejected("wrong-key", "not a node record key")
        envelope = open_node_record(value, max_size=self.max_size)
        if key != node_record_key(envelope.peer_id):
            raise RecordRejected("wrong-key", "signed by a peer other than the key names")
        return envelope

    def validate(self, key: bytes, value: bytes) -> None:
        """Raise RecordRejected unless `value` is a node record signed by the peer `key` names."""
        self.open(key, value)

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        """Highest seq; equal seqs go to the byte-wise largest value so all nodes agree.

        A value that does not validate ranks below every value that does.
        """
        if not values:
            raise ValueError("select needs at least one value")
        best_index = 0
        best_rank: tuple[int, bytes] | None = None
        for index, value in enumerate(values):
            try:
                rank = (self.open(key, value).seq, value)
            except RecordRejected:
                rank = (-1, value)
            if best_rank is None or rank > best_rank:
                best_index, best_rank = index, rank
        return best_index


@dataclass(slots=True)
class _StoredRecord:
    value: bytes
    owner: PeerId
    expires: float


class RecordStore:
    """Values other peers PUT to us, validated by namespace and bounded.

    Each record is charged to the peer that sent it (the latest one, when it is
    replaced), so one peer cannot fill the store; a record lives `record_ttl`
    after its last successful put. `now` must not go backwards between calls.
    """

    def __init__(
        self,
        validators: Mapping[str, Validator],
        *,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
        max_records_per_peer: int = DEFAULT_MAX_RECORDS_PER_PEER,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        record_ttl: float = DEFAULT_RECORD_TTL,
    ) -> None:
        self.validators = dict(validators)
        self.max_record_size = max_record_size
        self.max_records_per_peer = max_records_per_peer
        self.max_total_bytes = max_total_bytes
        self.record_ttl = record_ttl
        self.rejected: Counter[str] = Counter()
        # Insertion order is put order, so with a fixed TTL the oldest expire first.
        self._records: dict[bytes, _StoredRecord] = {}
        self._per_peer: Counter[PeerId] = Counter()
        self._total_bytes = 0

    def validator_for(self, key: bytes) -> Validator:
        """The validator for `key`'s namespace (also used on values fetched by GET_VALUE)."""
        namespace = record_namespace(key)
        validator = self.validators.get(namespace) if namespace is not None else None
        if validator is None:
            raise RecordRejected("no-validator", repr(key[:64]))
        return validator

    def put(self, key: bytes, value: bytes, *, from_peer: PeerId, now: float) -> None:
        """Store `value` if it is valid, better than what we hold, and within quota.

        Re-putting the value we hold refreshes its expiry. Raises RecordRejected,
        and counts the refusal in `rejected`.
        """
        try:
            self._put(key, value, from_peer, now)
        except RecordRejected as exc:
            self.rejected[exc.reason] += 1
            raise

    def _put(self, key: bytes, value: bytes, from_peer: PeerId, now: float) -> None:
        if len(value) > self.max_record_size:
            raise RecordRejected("too-large", f"{len(value)} bytes exceeds {self.max_record_size}")
        validator = self.validator_for(key)
        validator.validate(key, value)
        self.remove_expired(now)
        old = self._records.get(key)
        if old is not None and validator.select(key, [value, old.value]) != 0:
            raise RecordRejected("worse", "we hold a better record for this key")
        if (old is None or old.owner != from_peer) and (
            self._per_peer[from_peer] >= self.max_records_per_peer
        ):
            raise RecordRejected("quota-peer", f"{from_peer.short()} holds too many records")
        freed = len(key) + len(old.value) if old is not None else 0
        if self._total_bytes - freed + len(key) + len(value) > self.max_total_bytes:
            raise RecordRejected("quota-total", "the record store is full")
        if old is not None:
            self._forget(key)
        self._records[key] = _StoredRecord(value, from_peer, now + self.record_ttl)
        self._per_peer[from_peer] += 1
        self._total_bytes += len(key) + len(value)

    def get(self, key: bytes, now: float) -> bytes | None:
        """The value held for `key`, or None if there is none or it expired."""
        stored = self._records.get(key)
        if stored is None:
            return None
        if now >= stored.expires:
            self._forget(key)
            return None
        return stored.value

    def remove_expired(self, now: float) -> int:
        """Drop every expired record; returns how many went."""
        expired = []
        for key, stored in self._records.items():
            if now < stored.expires:
                break
            expired.append(key)
        for key in expired:
            self._forget(key)
        return len(expired)

    def _forget(self, key: bytes) -> None:
        stored = self._records.pop(key)
        self._total_bytes -= len(key) + len(stored.value)
        self._per_peer[stored.owner] -= 1
        if not self._per_peer[stored.owner]:
            del self._per_peer[stored.owner]

    def keys(self) -> list[bytes]:
        """Keys currently held (call `remove_expired` first), e.g. to republish them."""
        return list(self._records)

    @property
    def total_bytes(self) -> int:
        """Bytes of keys and values held, counted against `max_total_bytes`."""
        return self._total_bytes

    def __len__(self) -> int:
        return len(self._records)


@dataclass(slots=True)
class _Provider:
    info: PeerInfo
    expires: float
    size: int  # bytes counted against `max_total_bytes`


def _expiry(entry: _Provider) -> float:
    return entry.expires


class ProviderStore:
    """Who announced (ADD_PROVIDER) that they provide a key, for `ttl` seconds each.

    Per key, providers are kept in refresh order, newest last; past
    `max_providers_per_key` the least recently refreshed is dropped. A key with more
    live providers than a reply holds is answered with a fresh random sample of them,
    so every provider gets found and served, not only the last few to announce (the
    simulator showed 88% of 10,000 peers idle with most-recent-first replies). Keys are
    kept in last-touched order too, which makes expiring whole keys cheap. `now` must
    not go backwards between calls. `rng` draws the samples (seeded in the simulator).
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_PROVIDER_TTL,
        max_providers_per_key: int = DEFAULT_MAX_PROVIDERS_PER_KEY,
        max_keys: int = DEFAULT_MAX_PROVIDER_KEYS,
        max_total_providers: int = DEFAULT_MAX_TOTAL_PROVIDERS,
        max_key_size: int = DEFAULT_MAX_PROVIDER_KEY_SIZE,
        max_keys_per_provider: int = DEFAULT_MAX_KEYS_PER_PROVIDER,
        max_total_bytes: int = DEFAULT_MAX_PROVIDER_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self.ttl = ttl
        self._rng = rng if rng is not None else random.Random()
        self.max_providers_per_key = max_providers_per_key
        self.max_keys = max_keys
        self.max_total_providers = max_total_providers
        self.max_key_size = max_key_size
        self.max_keys_per_provider = max_keys_per_provider
        self.max_total_bytes = max_total_bytes
        self.rejected: Counter[str] = Counter()
        self._keys: dict[bytes, dict[PeerId, _Provider]] = {}
        self._total = 0
        self._bytes = 0
        self._per_provider: Counter[PeerId] = Counter()

    def add(self, key: bytes, provider: PeerInfo, now: float) -> None:
        """Record (or refresh) `provider` for `key` (the service checks it is the sender).

        A refresh with no addresses keeps the addresses we had. Raises RecordRejected:
        "key-size" for a key over `max_key_size`; "quota-provider" when the peer already
        provides `max_keys_per_provider` keys; "quota-keys", "quota-total", "quota-bytes"
        when the store is full.
        """
        if len(key) > self.max_key_size:
            self._reject("key-size", f"provider key of {len(key)} bytes")
        self._expire_stale_keys(now)
        peer = provider.peer_id
        providers = self._keys.get(key)
        old = providers.get(peer) if providers is not None else None
        if old is not None and not provider.addrs:
            provider = replace(provider, addrs=old.info.addrs)
        size = PROVIDER_ENTRY_OVERHEAD + len(key) + sum(len(a.to_bytes()) for a in provider.addrs)
        if old is None and self._per_provider[peer] >= self.max_keys_per_provider:
            self._reject("quota-provider", f"{peer} already provides too many keys")
        if providers is None and len(self._keys) >= self.max_keys:
            self._reject("quota-keys", "too many provider keys")
        key_full = providers is not None and len(providers) >= self.max_providers_per_key
        if old is None and not key_full and self._total >= self.max_total_providers:
            self._reject("quota-total", "too many provider records")
        if self._bytes - (old.size if old is not None else 0) + size > self.max_total_bytes:
            self._reject("quota-bytes", "provider records use too much memory")
        providers = self._keys.pop(key, {})
        self._keys[key] = providers  # last touched goes last
        if old is not None:
            del providers[peer]
            self._bytes -= old.size
        else:
            if key_full:  # the least recently refreshed makes room
                self._dropped(providers.pop(next(iter(providers))))
            self._total += 1
            self._per_provider[peer] += 1
        self._bytes += size
        providers[peer] = _Provider(provider, now + self.ttl, size)

    def _dropped(self, entry: _Provider) -> None:
        """Account for an entry that left the store."""
        self._total -= 1
        self._bytes -= entry.size
        peer = entry.info.peer_id
        left = self._per_provider[peer] - 1
        if left:
            self._per_provider[peer] = left
        else:
            del self._per_provider[peer]

    def _reject(self, reason: str, detail: str) -> NoReturn:
        self.rejected[reason] += 1
        raise RecordRejected(reason, detail)

    def get(self, key: bytes, now: float, limit: int = 20) -> list[PeerInfo]:
        """Up to `limit` unexpired providers of `key`: all of them, most recently
        refreshed first, or a random sample when there are more."""
        entries = list(self._keys.get(key, {}).values())
        # Refresh order is expiry order: the live ones are a suffix.
        live = entries[bisect.bisect_right(entries, now, key=_expiry) :]
        if len(live) > limit:
            return [entry.info for entry in self._rng.sample(live, limit)]
        return [entry.info for entry in reversed(live)]

    def remove_expired(self, now: float) -> int:
        """Drop every expired provider (and keys left empty); returns how many went."""
        removed = 0
        for key in list(self._keys):
            providers = self._keys[key]
            expired = []
            for peer_id, entry in providers.items():
                if now < entry.expires:
                    break
                expired.append(peer_id)
            for peer_id in expired:
                self._dropped(providers.pop(peer_id))
            removed += len(expired)
            if not providers:
                del self._keys[key]
        return removed

    def _expire_stale_keys(self, now: float) -> None:
        """Drop keys whose newest provider expired; cheap, as they sit at the front."""
        while self._keys:
            key, providers = next(iter(self._keys.items()))
            newest = next(reversed(providers.values()))
            if now < newest.expires:
                return
            del self._keys[key]
            for entry in providers.values():
                self._dropped(entry)

    @property
    def total_providers(self) -> int:
        """Provider entries held across all keys (expired ones until they are dropped)."""
        return self._total

    @property
    def total_bytes(self) -> int:
        """Bytes of keys and addresses held, counted against `max_total_bytes`."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._keys)
