"""The transparency log of allowed software measurements, and the client's check of it.

A client that trusts a log's key accepts a node only if the node's measurement was
published there, so a build nobody announced cannot serve prompts unnoticed. The node
ships an `InclusionBundle` (a signed tree head and an audit path) inside its evidence;
the client supplies the measurement from the claims and calls `check_log_proof`.

Wire form (msgpack, at most `MAX_BUNDLE` bytes, strictly decoded):

    InclusionBundle = {"v": 1, "size": int, "root": bin[32], "timestamp_ms": int,
                       "signature": bin[64], "index": int, "path": [bin[32], ...≤64]}

The tree head signature is Ed25519 over `STH_DOMAIN + msgpack({"root", "size",
"timestamp_ms"})` with sorted keys. On disk a log is a folder holding `log.key` (the
Ed25519 key, mode 0600) and `entries.jsonl`, one JSON object per entry, appended and
fsynced, so anyone can audit it with a text editor and recompute the tree.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from dbloom.p2p import (
    DecodeError,
    KeyFileError,
    KeyPair,
    KeyType,
    LimitExceeded,
    PublicKey,
    create_identity,
    load_identity,
)

from . import _merkle
from ._errors import EvidenceDecodeError
from ._refusal import Reason, Refusal

VERSION = 1
MEASUREMENT_SIZE = 32
MEASUREMENT_DOMAIN = b"dbloom/measurement/v1\x00"
STH_DOMAIN = b"dbloom/tlog-sth/v1\x00"
MAX_BUNDLE = 8 << 10
MAX_PATH = 64
MAX_TIMESTAMP_MS = 1 << 53
MAX_NOTE = 1024
KEY_FILE = "log.key"
ENTRIES_FILE = "entries.jsonl"
_BUNDLE_FIELDS = frozenset({"v", "size", "root", "timestamp_ms", "signature", "index", "path"})
_ENTRY_FIELDS = frozenset({"index", "measurement", "note", "timestamp_ms"})

logger = logging.getLogger(__name__)


class LogError(Exception):
    """The log folder is missing, already exists, is corrupted, or lacks an entry."""


def measurement_leaf(measurement: bytes) -> bytes:
    """The leaf data logged for a measurement (domain-separated from any other use)."""
    return MEASUREMENT_DOMAIN + measurement


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """The log's signed statement "my first `size` entries have this `root`"."""

    size: int
    root: bytes
    timestamp_ms: int
    signature: bytes

    def verify(self, public_key: bytes) -> bool:
        """Whether the raw 32-byte Ed25519 `public_key` signed this tree head."""
        message = _tree_head_message(self.size, self.root, self.timestamp_ms)
        return PublicKey(KeyType.ED25519, public_key).verify(message, self.signature)


def _tree_head_message(size: int, root: bytes, timestamp_ms: int) -> bytes:
    body = {"root": root, "size": size, "timestamp_ms": timestamp_ms}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return STH_DOMAIN + packed


@dataclass(frozen=True, slots=True)
class InclusionBundle:
    """What a node ships to prove its measurement is logged; the client brings the measurement."""

    sth: SignedTreeHead
    index: int
    path: tuple[bytes, ...]

    def encode(self) -> bytes:
        """Canonical msgpack (sorted keys), at most `MAX_BUNDLE` bytes."""
        body = {
            "index": self.index,
            "path": list(self.path),
            "root": self.sth.root,
            "signature": self.sth.signature,
            "size": self.sth.size,
            "timestamp_ms": self.sth.timestamp_ms,
            "v": VERSION,
        }
        raw: bytes = msgpack.packb(body, use_bin_type=True)
        return raw


def decode_inclusion_bundle(raw: bytes) -> InclusionBundle:
    """Strictly decode a bundle from untrusted bytes.

    Raises only `EvidenceDecodeError`, or `LimitExceeded` (also a `DecodeError`) when
    the bytes are over `MAX_BUNDLE`.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise EvidenceDecodeError("inclusion bundle must be bytes")
    if len(raw) > MAX_BUNDLE:
        raise LimitExceeded(f"inclusion bundle is {len(raw)} bytes, above {MAX_BUNDLE}")
    try:
        body = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise EvidenceDecodeError(f"inclusion bundle is not valid msgpack: {e}") from None
    if not isinstance(body, dict):
        raise EvidenceDecodeError("inclusion bundle must be a map")
    if missing := _BUNDLE_FIELDS - body.keys():
        raise EvidenceDecodeError(f"inclusion bundle lacks {', '.join(sorted(missing))}")
    if unknown := body.keys() - _BUNDLE_FIELDS:
        names = ", ".join(sorted(map(str, unknown)))
        raise EvidenceDecodeError(f"inclusion bundle has unknown fields {names}")
    if type(body["v"]) is not int or body["v"] != VERSION:
        raise EvidenceDecodeError(f"inclusion bundle version {body['v']!r} is not {VERSION}")
    size = _int(body, "size", 1, 1 << 64)
    index = _int(body, "index", 0, size)
    timestamp_ms = _int(body, "timestamp_ms", 0, MAX_TIMESTAMP_MS)
    path = body["path"]
    if not isinstance(path, list) or len(path) > MAX_PATH:
        raise EvidenceDecodeError(f"inclusion bundle path must be a list of ≤{MAX_PATH} hashes")
    if not all(isinstance(h, bytes) and len(h) == _merkle.HASH_SIZE for h in path):
        raise EvidenceDecodeError("inclusion bundle path must hold 32-byte hashes")
    sth = SignedTreeHead(
        size=size,
        root=_bin(body, "root", _merkle.HASH_SIZE),
        timestamp_ms=timestamp_ms,
        signature=_bin(body, "signature", 64),
    )
    return InclusionBundle(sth=sth, index=index, path=tuple(path))


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body[key]
    if type(value) is not int or not low <= value < high:
        raise EvidenceDecodeError(f"inclusion bundle {key} must be an integer in [{low}, {high})")
    return value


def _bin(body: dict[str, Any], key: str, size: int) -> bytes:
    value = body[key]
    if not isinstance(value, bytes) or len(value) != size:
        raise EvidenceDecodeError(f"inclusion bundle {key} must be {size} bytes")
    return value


def read_bundle_file(path: Path) -> bytes:
    """A proof file's bytes, read no further than a bundle can be (more is refused
    by the decoder). Raises OSError, or LogError for a folder, pipe or device, which
    would otherwise be read from forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        return handle.read(MAX_BUNDLE + 1)


def check_log_proof(raw: bytes, measurement: bytes, trusted_keys: Sequence[bytes]) -> list[Refusal]:
    """Every reason the bundle `raw` fails to prove `measurement` is in a trusted log.

    Empty when a trusted key signed the tree head and the audit path leads from the
    measurement's leaf to its root. Total: any bytes in, refusals out, never an exception.
    """
    try:
        bundle = decode_inclusion_bundle(raw)
    except DecodeError as e:
        return [Refusal(Reason.MALFORMED, f"log inclusion proof: {e}")]
    sth = bundle.sth
    refusals = []
    if not trusted_keys:
        refusals.append(Refusal(Reason.BAD_LOG_SIGNATURE, "no trusted log key to check against"))
    elif not any(sth.verify(key) for key in trusted_keys):
        refusals.append(
            Refusal(
                Reason.BAD_LOG_SIGNATURE,
                f"the tree head of size {sth.size} is not signed by a trusted log key",
            )
        )
    leaf = _merkle.leaf_hash(measurement_leaf(measurement))
    try:
        root = _merkle.root_from_inclusion_proof(leaf, bundle.index, sth.size, bundle.path)
    except _merkle.ProofError as e:
        refusals.append(Refusal(Reason.BAD_LOG_PROOF, str(e)))
    else:
        if root != sth.root:
            refusals.append(
                Refusal(
                    Reason.NOT_LOGGED,
                    f"measurement {measurement.hex()} is not in the log "
                    f"(not entry {bundle.index} of the tree of size {sth.size})",
                )
            )
    return refusals


def verify_consistency(
    first: SignedTreeHead, second: SignedTreeHead, proof: Sequence[bytes], key: bytes
) -> list[Refusal]:
    """Every reason `proof` fails to show the log only appended between two tree heads.

    A monitor calls this on each new tree head it sees; a refusal means the log
    operator rewrote history, forked, or signed something it should not have.
    """
    refusals = [
        Refusal(
            Reason.BAD_LOG_SIGNATURE,
            f"the {name} tree head (size {sth.size}) is not signed by the log key",
        )
        for name, sth in (("first", first), ("second", second))
        if not sth.verify(key)
    ]
    if not _merkle.verify_consistency(first.size, second.size, first.root, second.root, proof):
        refusals.append(
            Refusal(
                Reason.BAD_LOG_PROOF,
                f"no proof that the tree of size {first.size} is a prefix "
                f"of the tree of size {second.size}",
            )
        )
    return refusals


class TransparencyLog:
    """A file-backed, append-only log of measurements with a signing key.

    Many processes may open one folder: appends hold an exclusive lock on the entries
    file and first read what others appended; readers call `refresh` to catch up.
    """

    def __init__(self, folder: Path, key: KeyPair) -> None:
        """Use `TransparencyLog.init` or `TransparencyLog.open`."""
        self._key = key
        self._entries = folder / ENTRIES_FILE
        self._tree = _merkle.MerkleTree()
        self._index: dict[bytes, int] = {}
        self._offset = 0
        self._unterminated = False

    @classmethod
    def init(cls, folder: Path) -> TransparencyLog:
        """Create a log with a new key in `folder`; refuses to touch an existing log."""
        key_path, entries = folder / KEY_FILE, folder / ENTRIES_FILE
        exists = LogError(f"a transparency log already exists in {folder}")
        if key_path.exists() or entries.exists():
            raise exists
        try:
            create_identity(key_path)
            fd = os.open(entries, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except (KeyFileError, FileExistsError):
            raise exists from None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return cls.open(folder)

    @classmethod
    def open(cls, folder: Path) -> TransparencyLog:
        """Load the log in `folder`, ignoring (with a warning) a last entry torn by a crash."""
        key_path = folder / KEY_FILE
        if not key_path.exists():
            raise LogError(f"no transparency log in {folder} (no {KEY_FILE})")
        try:
            key = load_identity(key_path)
        except KeyFileError as e:
            raise LogError(f"log key unusable: {e}") from None
        log = cls(folder, key)
        with log._locked(fcntl.LOCK_SH) as handle:
            torn = log._read_new(handle)
        if torn:
            logger.warning(
                "%s: ignoring a torn last entry (%d bytes) left by a crash; "
                "the next add removes it",
                log._entries,
                torn,
            )
        return log

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 key clients put in their policy."""
        return self._key.public_key.data

    def __len__(self) -> int:
        return len(self._tree)

    def index_of(self, measurement: bytes) -> int | None:
        """The entry number of `measurement`, or None if it was never logged."""
        return self._index.get(measurement)

    def refresh(self) -> None:
        """Catch up with entries other processes appended since this one last read."""
        with self._locked(fcntl.LOCK_SH) as handle:
            self._read_new(handle)

    def add(self, measurement: bytes, note: str = "") -> int:
        """Append `measurement` durably and return its index (its old one if already logged)."""
        if len(measurement) != MEASUREMENT_SIZE:
            raise ValueError(f"a measurement is {MEASUREMENT_SIZE} bytes, not {len(measurement)}")
        if len(note) > MAX_NOTE:
            raise ValueError(f"note is {len(note)} characters, above {MAX_NOTE}")
        with self._locked(fcntl.LOCK_EX) as handle:
            torn = self._read_new(handle)
            if torn:
                logger.warning("%s: removing a torn last entry (%d bytes)", self._entries, torn)
                handle.truncate(self._offset)
            existing = self._index.get(measurement)
            if existing is not None:
                return existing
            index = len(self._tree)
            line = _encode_entry(index, measurement, note, time.time_ns() // 1_000_000)
            if self._unterminated:
                line = b"\n" + line
                self._unterminated = False
            handle.seek(self._offset)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
            self._offset += len(line)
            self._remember(measurement)
            return index

    def head(self) -> SignedTreeHead:
        """A tree head over every entry, signed now."""
        size, root = len(self._tree), self._tree.root()
        timestamp_ms = time.time_ns() // 1_000_000
        signature = self._key.sign(_tree_head_message(size, root, timestamp_ms))
        return SignedTreeHead(size, root, timestamp_ms, signature)

    def inclusion_bundle(self, measurement: bytes) -> InclusionBundle:
        """The proof a node ships that `measurement` is in this log."""
        index = self.index_of(measurement)
        if index is None:
            raise LogError(f"measurement {measurement.hex()} is not in the log")
        sth = self.head()
        return InclusionBundle(sth, index, tuple(self._tree.inclusion_proof(index, sth.size)))

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The proof that the tree of size `first` is a prefix of the one of size `second`."""
        return self._tree.consistency_proof(first, second)

    @contextmanager
    def _locked(self, operation: int) -> Iterator[BinaryIO]:
        with self._open_entries(writable=operation == fcntl.LOCK_EX) as handle:
            fcntl.flock(handle.fileno(), operation)
            yield handle

    def _open_entries(self, *, writable: bool) -> BinaryIO:
        try:
            return open(self._entries, "r+b") if writable else open(self._entries, "rb")
        except FileNotFoundError:
            raise LogError(f"{self._entries} is missing; the log is incomplete") from None

    def _read_new(self, handle: BinaryIO) -> int:
        """Read the entries past `_offset`; returns the size of a torn tail, if any.

        A last line without its newline is kept when it is a valid entry (an editor or a
        copy may drop a final newline; `add` puts it back): only a crash mid-write leaves
        a tail that is not one, and that tail was never part of the log.
        """
        handle.seek(self._offset)
        data = handle.read()
        if self._unterminated and data.startswith(b"\n"):
            data = data[1:]
            self._offset += 1
            self._unterminated = False
        *lines, tail = data.split(b"\n")
        for line in lines:
            self._accept(line)
            self._offset += len(line) + 1
        if tail:
            try:
                self._accept(tail)
            except LogError:
                return len(tail)
            self._offset += len(tail)
            self._unterminated = True
        return 0

    def _accept(self, line: bytes) -> None:
        """Add the entry `line` to the tree, or raise `LogError` if it is not the next one."""
        measurement = self._decode_entry(line)
        if measurement in self._index:
            raise LogError(
                f"{self._entries}: entry {len(self)} repeats entry "
                f"{self._index[measurement]}; the log is corrupted"
            )
        self._remember(measurement)

    def _decode_entry(self, line: bytes) -> bytes:
        index = len(self._tree)
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or entry.keys() != _ENTRY_FIELDS:
                raise ValueError(f"fields must be {', '.join(sorted(_ENTRY_FIELDS))}")
            if type(entry["index"]) is not int or entry["index"] != index:
                raise ValueError(f"it says index {entry['index']!r}")
            if not isinstance(entry["note"], str) or type(entry["timestamp_ms"]) is not int:
                raise ValueError("note must be a string and timestamp_ms an integer")
            measurement = bytes.fromhex(entry["measurement"])
            if len(measurement) != MEASUREMENT_SIZE or measurement.hex() != entry["measurement"]:
                raise ValueError("measurement must be 64 lowercase hex digits")
        except (ValueError, TypeError, RecursionError) as e:
            raise LogError(
                f"{self._entries}: entry {index} is unreadable ({e}); the log is corrupted"
            ) from None
        return measurement

    def _remember(self, measurement: bytes) -> None:
        self._index[measurement] = self._tree.append(measurement_leaf(measurement))


def _encode_entry(index: int, measurement: bytes, note: str, timestamp_ms: int) -> bytes:
    entry = {
        "index": index,
        "measurement": measurement.hex(),
        "note": note,
        "timestamp_ms": timestamp_ms,
    }
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"
