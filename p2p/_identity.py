"""Identity keys and peer ids, encoded as the libp2p peer-id spec says.

A peer id is the multihash of the protobuf `PublicKey`: the identity multihash
for keys of at most 42 bytes (so Ed25519 ids read `12D3KooW…`), SHA-256 beyond.
Our own keys are Ed25519; we verify RSA, Secp256k1 and ECDSA keys of other
libp2p nodes too, so stock peers with older keys can still talk to us.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import nacl.exceptions
import nacl.signing

from . import _protobuf as pb
from ._base58 import b32decode, b32encode, b58decode, b58encode
from ._errors import DecodeError
from ._wire import decode_uvarint

VERIFIED_CACHE_SIZE: Final = 1 << 16
"""Valid signatures remembered, so the same signed bytes are checked once: a lookup
receives one node record from several peers, and the simulator runs 10,000 peers in one
process (a signature check is about 55 µs; the digest of what was checked, 1 µs)."""

IDENTITY_MULTIHASH: Final = 0x00
SHA256_MULTIHASH: Final = 0x12
LIBP2P_KEY_CODEC: Final = 0x72
CIDV1: Final = 0x01
MAX_INLINE_KEY: Final = 42
MAX_PUBLIC_KEY_BYTES: Final = 2048


class KeyType(IntEnum):
    """libp2p key types (crypto.proto)."""

    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A libp2p public key as it travels: a type and its type-specific bytes."""

    key_type: KeyType
    data: bytes

    def to_bytes(self) -> bytes:
        """Deterministic protobuf `PublicKey` encoding."""
        return pb.encode_message([(1, int(self.key_type)), (2, self.data)])

    @classmethod
    def from_bytes(cls, raw: bytes) -> PublicKey:
        """Strictly decode a protobuf `PublicKey` from untrusted bytes."""
        if len(raw) > MAX_PUBLIC_KEY_BYTES:
            raise DecodeError("public key too large")
        fields = pb.decode_message(raw)
        type_number = pb.get_int(fields, 1, required=True)
        data = pb.get_bytes(fields, 2, required=True)
        assert type_number is not None and data is not None
        try:
            key_type = KeyType(type_number)
        except ValueError:
            raise DecodeError(f"unknown key type {type_number}") from None
        if key_type is KeyType.ED25519 and len(data) != 32:
            raise DecodeError("Ed25519 public key must be 32 bytes")
        return cls(key_type, data)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True if `signature` is this key's valid signature over `message`.

        Signatures already found valid are remembered (see `VERIFIED_CACHE_SIZE`).
        """
        try:
            proof = _proof(int(self.key_type), self.data, message, signature)
            if proof in _verified:
                return True
            if self.key_type is KeyType.ED25519:
                nacl.signing.VerifyKey(self.data).verify(message, signature)
            elif not _verify_with_cryptography(self.key_type, self.data, message, signature):
                return False
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        _remember(proof)
        return True

    @property
    def peer_id(self) -> PeerId:
        """The peer id this key stands for."""
        return PeerId.from_public_key(self)


_verified: dict[bytes, None] = {}  # digests of (key, message, signature) found valid
_verified_lock = threading.Lock()


def _proof(key_type: int, key: bytes, message: bytes, signature: bytes) -> bytes:
    """A collision-resistant digest of one check, lengths included so fields cannot shift."""
    digest = hashlib.blake2b(digest_size=32)
    for part in (key, signature, message):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(bytes((key_type,)))
    return digest.digest()


def _remember(proof: bytes) -> None:
    with _verified_lock:
        _verified[proof] = None
        if len(_verified) > VERIFIED_CACHE_SIZE:
            del _verified[next(iter(_verified))]


def _verify_with_cryptography(
    key_type: KeyType, data: bytes, message: bytes, signature: bytes
) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        if key_type is KeyType.SECP256K1:
            ec_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), data)
            ec_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return True
        loaded = serialization.load_der_public_key(data)
        if key_type is KeyType.RSA and isinstance(loaded, rsa.RSAPublicKey):
            loaded.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            return True
        if key_type is KeyType.ECDSA and isinstance(loaded, ec.EllipticCurvePublicKey):
            loaded.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    return False


@dataclass(frozen=True, slots=True, order=True)
class PeerId:
    """A peer's identity: the multihash of its public key."""

    multihash: bytes

    # Peer ids key every table and set; the generated methods build a tuple per call.
    def __hash__(self) -> int:
        return hash(self.multihash)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PeerId):
            return self.multihash == other.multihash
        return NotImplemented

    @classmethod
    def from_public_key(cls, key: PublicKey) -> PeerId:
        """Derive the peer id of a public key (identity multihash when small enough)."""
        raw = key.to_bytes()
        if len(raw) <= MAX_INLINE_KEY:
            return cls(bytes((IDENTITY_MULTIHASH, len(raw))) + raw)
        return cls(bytes((SHA256_MULTIHASH, 32)) + hashlib.sha256(raw).digest())

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerId:
        """Strictly decode a binary peer id (a multihash); repeats come from a cache."""
        return _peer_id_from_bytes(bytes(raw))

    @classmethod
    def _decode(cls, raw: bytes) -> PeerId:
        code = decode_uvarint(raw)
        if code is None:
            raise DecodeError("empty peer id")
        hash_code, pos = code
        length = decode_uvarint(raw, pos)
        if length is None:
            raise DecodeError("truncated peer id")
        size, pos = length
        if len(raw) - pos != size:
            raise DecodeError("peer id digest length does not match its header")
        if hash_code == IDENTITY_MULTIHASH:
            if size > MAX_INLINE_KEY:
                raise DecodeError("identity peer id too long")
            PublicKey.from_bytes(raw[pos:])
        elif hash_code == SHA256_MULTIHASH:
            if size != 32:
                raise DecodeError("sha2-256 peer id must hold 32 bytes")
        else:
            raise DecodeError(f"unsupported peer id multihash 0x{hash_code:x}")
        return cls(bytes(raw))

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse `12D3KooW…`/`Qm…` (base58btc) or a CIDv1 (`bafz…`) peer id."""
        text = text.strip()
        if not text:
            raise DecodeError("empty peer id")
        if text[0] in "1Q":
            return cls.from_bytes(b58decode(text))
        if text[0] == "b":
            cid = b32decode(text[1:])
            version = decode_uvarint(cid)
            if version is None or version[0] != CIDV1:
                raise DecodeError("peer id CID must be CIDv1")
            codec = decode_uvarint(cid, version[1])
            if codec is None or codec[0] != LIBP2P_KEY_CODEC:
                raise DecodeError("peer id CID must use the libp2p-key codec")
            return cls.from_bytes(cid[codec[1] :])
        if text[0] == "z":
            return cls.from_string(b58encode(b58decode(text[1:])))
        raise DecodeError(f"not a peer id: {text[:60]!r}")

    def to_base58(self) -> str:
        """The canonical text form (`12D3KooW…`)."""
        return b58encode(self.multihash)

    def to_cid(self) -> str:
        """The CIDv1 text form (base32, `bafz…`)."""
        return "b" + b32encode(bytes((CIDV1, LIBP2P_KEY_CODEC)) + self.multihash)

    def extract_public_key(self) -> PublicKey | None:
        """The public key inlined in an identity peer id, if any."""
        if self.multihash[0] == IDENTITY_MULTIHASH:
            return PublicKey.from_bytes(self.multihash[2:])
        return None

    def matches(self, key: PublicKey) -> bool:
        """True if `key` is the key this peer id was derived from."""
        return PeerId.from_public_key(key) == self

    def short(self) -> str:
        """A readable abbreviation for logs and tables."""
        text = self.to_base58()
        return f"{text[:8]}…{text[-6:]}"

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()})"


@functools.lru_cache(maxsize=1 << 16)
def _peer_id_from_bytes(raw: bytes) -> PeerId:
    # A DHT decodes the same few thousand peer ids over and over; they are immutable.
    return PeerId._decode(raw)


class KeyPair:
    """An Ed25519 identity key pair: signs for this peer."""

    __slots__ = ("_signing", "peer_id", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing = signing_key
        self.public_key = PublicKey(KeyType.ED25519, bytes(signing_key.verify_key))
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random identity."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """A deterministic identity from a 32-byte seed (tests and simulations)."""
        return cls(nacl.signing.SigningKey(seed))

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature."""
        return self._signing.sign(message).signature

    def private_bytes(self) -> bytes:
        """The protobuf `PrivateKey` (seed ‖ public key), as libp2p stores keys."""
        return pb.encode_message(
            [(1, int(KeyType.ED25519)), (2, bytes(self._signing) + self.public_key.data)]
        )

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Load a protobuf `PrivateKey` holding an Ed25519 key."""
        fields = pb.decode_message(raw)
        key_type = pb.get_int(fields, 1, required=True)
        data = pb.get_bytes(fields, 2, required=True)
        assert data is not None
        if key_type != KeyType.ED25519:
            raise DecodeError("only Ed25519 identity keys are supported")
        if len(data) not in (64, 96):
            raise DecodeError("Ed25519 private key must be 64 (or legacy 96) bytes")
        pair = cls(nacl.signing.SigningKey(data[:32]))
        if pair.public_key.data != data[32:64]:
            raise DecodeError("Ed25519 private key does not match its public half")
        return pair
