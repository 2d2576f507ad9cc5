"""The Kademlia keyspace: 256-bit keys, XOR distance, and the keys dbloom stores under.

Every key is placed at SHA-256 of its bytes (a peer at SHA-256 of its binary
peer id), as the libp2p kad-dht spec says, so our DHT and a stock one agree on
who is close to what.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final

from .._identity import PeerId

KEY_BITS: Final = 256
SHA256_MULTIHASH_PREFIX: Final = b"\x12\x20"
NODE_RECORD_PREFIX: Final = b"/dbloom/node/"


def kad_key(raw: bytes) -> bytes:
    """Where `raw` sits in the keyspace."""
    return hashlib.sha256(raw).digest()


@functools.lru_cache(maxsize=1 << 16)
def peer_key(peer: PeerId) -> bytes:
    """Where a peer sits in the keyspace (cached: tables and lookups ask again and again)."""
    return hashlib.sha256(peer.multihash).digest()


def distance(a: bytes, b: bytes) -> int:
    """XOR distance between two keyspace positions."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def common_prefix_length(a: bytes, b: bytes) -> int:
    """Leading bits `a` and `b` share (256 for equal keys); the k-bucket index."""
    return KEY_BITS - distance(a, b).bit_length()


def provider_key(name: str) -> bytes:
    """The wire key for providers of `name` (e.g. `dbloom:model:<id>`).

    A sha2-256 multihash, as libp2p provider keys are, so a stock node can look it
    up as the CIDv1 (raw codec) of the name's bytes.
    """
    return SHA256_MULTIHASH_PREFIX + hashlib.sha256(name.encode()).digest()


def node_record_key(peer: PeerId) -> bytes:
    """The value key under which `peer` publishes its signed node record."""
    return NODE_RECORD_PREFIX + peer.to_base58().encode()
