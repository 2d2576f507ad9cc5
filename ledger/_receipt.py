"""Receipts: what a node says it served, countersigned by the client that got it.

A receipt is what the ledger pays from, so both sides sign it: the node signs the
accounting of a request (`ReceiptBody`) and sends it in its final inference frame; the
client checks it against what it asked for and what it actually received, and
countersigns it as `ok` or `disputed` (adding what it observed). Only `ok` receipts are
paid; a disputed one is kept as evidence. Pure functions, no I/O.

Wire form (msgpack, canonical: sorted keys, smallest int encodings, `bin` for bytes;
decoders refuse any other encoding, so a receipt has exactly one byte form):

    ReceiptBody = {"v": 1, "id": bin[16], "node": bin[38], "client": bin[32],
                   "model": str[1..256], "prompt_tokens": int, "completion_tokens": int,
                   "price_in": int, "price_out": int, "amount": int,
                   "started_ms": int, "finished_ms": int, "tokens_digest": bin[32]}
    NodeReceipt = {"body": ReceiptBody, "node_sig": bin[64]}
    Receipt     = {"body": ReceiptBody, "node_sig": bin[64], "status": "ok" | "disputed",
                   ["observed": {"completion_tokens": int, "tokens_digest": bin[32]},]
                   "client_sig": bin[64]}

Prices are micro-units per million tokens and the amount is micro-units, floored once:
`amount = (prompt_tokens * price_in + completion_tokens * price_out) // 1_000_000`.
`tokens_digest` is SHA-256 of `TOKENS_DOMAIN` and the completion's token ids, each as 4
bytes big-endian. `node` is the node's peer id, which inlines its Ed25519 key, and `node_sig`
is that key's signature over `NODE_DOMAIN + ReceiptBody`. `client` is the raw Ed25519
key of the client's account and `client_sig` its signature over `CLIENT_DOMAIN +` the
receipt without `client_sig`. `observed` is present exactly when the status is
`disputed`. Either form is at most `MAX_RECEIPT` bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

from dbloom.p2p import DecodeError, KeyPair, KeyType, PeerId, PublicKey

from ._money import MAX_PRICE_MICRO, TOKENS_PER_PRICE

VERSION = 1
MAX_RECEIPT = 2 << 10
ID_SIZE = 16
KEY_SIZE = 32
DIGEST_SIZE = 32
SIGNATURE_SIZE = 64
MAX_MODEL = 256
MAX_TOKENS = 1 << 32
MAX_TIMESTAMP_MS = 1 << 53
NODE_DOMAIN = b"dbloom/receipt/node/v1\x00"
CLIENT_DOMAIN = b"dbloom/receipt/client/v1\x00"
TOKENS_DOMAIN = b"dbloom/tokens/v1\x00"

# Every Ed25519 peer id is this prefix (identity multihash of a protobuf key) and the key.
_ED25519_PEER_PREFIX = PublicKey(KeyType.ED25519, bytes(KEY_SIZE)).peer_id.multihash[:-KEY_SIZE]
_INT_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "price_in",
    "price_out",
    "amount",
    "started_ms",
    "finished_ms",
)
_BODY_FIELDS = frozenset({"v", "id", "node", "client", "model", "tokens_digest", *_INT_FIELDS})
_NODE_RECEIPT_FIELDS = frozenset({"body", "node_sig"})
_RECEIPT_FIELDS = frozenset({"body", "node_sig", "status", "client_sig"})
_OBSERVED_FIELDS = frozenset({"completion_tokens", "tokens_digest"})


def compute_amount(
    prompt_tokens: int, completion_tokens: int, price_in: int, price_out: int
) -> int:
    """Micro-units owed: `(prompt_tokens·price_in + completion_tokens·price_out) // 10^6`.

    Prices are micro-units per million tokens; the sum is floored once, so splitting a
    request's tokens differently between prompt and completion never loses a micro-unit
    to a second rounding.
    """
    return (prompt_tokens * price_in + completion_tokens * price_out) // TOKENS_PER_PRICE


MAX_AMOUNT = compute_amount(MAX_TOKENS - 1, MAX_TOKENS - 1, MAX_PRICE_MICRO, MAX_PRICE_MICRO)


def tokens_digest(token_ids: Sequence[int], salt: bytes = b"") -> bytes:
    """SHA-256 of `TOKENS_DOMAIN`, the request's salt, and each token id (4 bytes, big-endian).

    Both sides compute it over the completion tokens, so a node cannot bill for tokens
    the client never received without the client noticing. The salt is a random value
    the client sends inside the encrypted request: receipts are gossiped to every
    ledger, and an unsalted digest would let anyone confirm a guessed short output.
    """
    try:
        packed = struct.pack(f">{len(token_ids)}I", *token_ids)
    except struct.error:
        raise ValueError("token ids must be integers in [0, 2^32)") from None
    return hashlib.sha256(TOKENS_DOMAIN + salt + packed).digest()


class ReceiptError(DecodeError):
    """A receipt the ledger refuses; `kind` names the rejection it is counted under."""

    kind: ClassVar[str] = "malformed"


class MalformedReceipt(ReceiptError):
    """Bytes that are not a receipt: wrong size, encoding, fields, types or version."""

    kind = "malformed"


class ForgedReceipt(ReceiptError):
    """A signature that does not verify with the node's peer id or the client's key."""

    kind = "forged"


class InflatedReceipt(ReceiptError):
    """Counts or prices out of range, or an amount that is not what the rule gives."""

    kind = "inflated"


class Status(StrEnum):
    """The client's verdict: `ok` receipts are paid, `disputed` ones only kept."""

    OK = "ok"
    DISPUTED = "disputed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptBody:
    """The node's accounting of one request, in integers only.

    `amount` must be `(prompt_tokens * price_in + completion_tokens * price_out) //
    1_000_000` (`compute_amount`); `id` is the 16 random bytes the client chose.
    """

    id: bytes
    node: bytes
    client: bytes
    model: str
    prompt_tokens: int
    completion_tokens: int
    price_in: int
    price_out: int
    amount: int
    started_ms: int
    finished_ms: int
    tokens_digest: bytes

    @property
    def node_peer_id(self) -> PeerId:
        """The node that served the request."""
        return PeerId(self.node)

    def encode(self) -> bytes:
        """Canonical msgpack: what the node signs (after `NODE_DOMAIN`)."""
        return _pack(self._fields())

    def _fields(self) -> dict[str, Any]:
        # Keys in sorted order: msgpack keeps insertion order, canonical means sorted.
        return {
            "amount": self.amount,
            "client": self.client,
            "completion_tokens": self.completion_tokens,
            "finished_ms": self.finished_ms,
            "id": self.id,
            "model": self.model,
            "node": self.node,
            "price_in": self.price_in,
            "price_out": self.price_out,
            "prompt_tokens": self.prompt_tokens,
            "started_ms": self.started_ms,
            "tokens_digest": self.tokens_digest,
            "v": VERSION,
        }


@dataclass(frozen=True, slots=True)
class Observed:
    """What a disputing client received itself, in place of the node's counts."""

    completion_tokens: int
    tokens_digest: bytes


@dataclass(frozen=True, slots=True)
class NodeReceipt:
    """A body signed by its node, waiting for the client's countersignature."""

    body: ReceiptBody
    node_sig: bytes

    def encode(self) -> bytes:
        """Canonical msgpack, the bytes of the final inference frame's `receipt`."""
        return _pack({"body": self.body._fields(), "node_sig": self.node_sig})


@dataclass(frozen=True, slots=True)
class Receipt:
    """A receipt signed by both sides: what the ledger stores, pays and gossips."""

    body: ReceiptBody
    node_sig: bytes
    status: Status
    observed: Observed | None
    client_sig: bytes

    @property
    def paid(self) -> bool:
        """Whether the ledger pays this receipt (the client did not dispute it)."""
        return self.status is Status.OK

    def encode(self) -> bytes:
        """Canonical msgpack: the one byte form, and the receipt's Merkle leaf."""
        fields = _countersigned_fields(self.body, self.node_sig, self.status, self.observed)
        return _pack({**fields, "client_sig": self.client_sig})

    def client_message(self) -> bytes:
        """The bytes the client signed."""
        fields = _countersigned_fields(self.body, self.node_sig, self.status, self.observed)
        return CLIENT_DOMAIN + _pack(fields)


def _countersigned_fields(
    body: ReceiptBody, node_sig: bytes, status: Status, observed: Observed | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"body": body._fields(), "node_sig": node_sig}
    if observed is not None:
        fields["observed"] = {
            "completion_tokens": observed.completion_tokens,
            "tokens_digest": observed.tokens_digest,
        }
    fields["status"] = status.value
    return fields


def _pack(fields: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(dict(sorted(fields.items())), use_bin_type=True)
    return packed


def sign_as_node(body: ReceiptBody, node_key: KeyPair) -> bytes:
    """The node-signed receipt a node puts in its final inference frame.

    Raises `ValueError` when the body is one an honest ledger would refuse (a bug in
    the caller): wrong sizes or types, another node's peer id, out-of-range counts or
    prices, or an amount other than `compute_amount` gives.
    """
    if body.node != node_key.peer_id.multihash:
        raise ValueError("the receipt body names another node than the signing key's")
    try:
        _check_body(body)
        _check_ranges(body)
        _check_amount(body)
    except ReceiptError as e:
        raise ValueError(str(e)) from None
    signature = node_key.sign(NODE_DOMAIN + body.encode())
    return NodeReceipt(body, signature).encode()


def decode_node_receipt(raw: bytes) -> NodeReceipt:
    """Strictly decode a node-signed receipt from untrusted bytes (signature unchecked).

    Raises only `MalformedReceipt`; `countersign` checks the node's signature.
    """
    fields = _unpack(raw, _NODE_RECEIPT_FIELDS, frozenset(), "node receipt")
    receipt = NodeReceipt(_decode_body(fields["body"]), _bin(fields, "node_sig", SIGNATURE_SIZE))
    if receipt.encode() != raw:
        raise MalformedReceipt("node receipt is not canonically encoded")
    return receipt


def decode_receipt(raw: bytes) -> Receipt:
    """Strictly decode a countersigned receipt from untrusted bytes (signatures unchecked).

    Raises only `MalformedReceipt`; `verify_receipt` checks signatures and amounts.
    """
    fields = _unpack(raw, _RECEIPT_FIELDS, frozenset({"observed"}), "receipt")
    status_text = fields["status"]
    if status_text not in (Status.OK.value, Status.DISPUTED.value):
        raise MalformedReceipt(f"receipt status must be ok or disputed, not {status_text!r}")
    status = Status(status_text)
    observed = None
    if status is Status.DISPUTED:
        if "observed" not in fields:
            raise MalformedReceipt("a disputed receipt must say what the client observed")
        observed = _decode_observed(fields["observed"])
    elif "observed" in fields:
        raise MalformedReceipt("only a disputed receipt carries observed counts")
    receipt = Receipt(
        body=_decode_body(fields["body"]),
        node_sig=_bin(fields, "node_sig", SIGNATURE_SIZE),
        status=status,
        observed=observed,
        client_sig=_bin(fields, "client_sig", SIGNATURE_SIZE),
    )
    if receipt.encode() != raw:
        raise MalformedReceipt("receipt is not canonically encoded")
    return receipt


def verify_receipt(receipt: Receipt) -> None:
    """Check both signatures, then the ranges and, for a paid receipt, the amount rule.

    Raises `ForgedReceipt` when the node's peer id key or the client's key did not sign
    what they are said to have signed, and `InflatedReceipt` when counts or prices are
    out of range or an `ok` receipt's amount is not `compute_amount` of its counts and
    prices. A disputed receipt is never paid, so its amount need only be in range.
    """
    body = receipt.body
    _check_node_signature(body, receipt.node_sig)
    if not _verifies(body.client, receipt.client_message(), receipt.client_sig):
        raise ForgedReceipt(
            f"the client signature does not verify with client key {body.client.hex()}"
        )
    _check_ranges(body)
    if receipt.paid:
        _check_amount(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class Terms:
    """What the client asked for: the request id, the node it chose, the model, the prices."""

    id: bytes
    node: PeerId
    model: str
    price_in: int
    price_out: int
    salt: bytes = b""


def disagreements(
    node_receipt: NodeReceipt, *, received_tokens: Sequence[int], terms: Terms
) -> list[str]:
    """Every way the node's receipt differs from the client's terms and what it received.

    The amount is recomputed from the node's prompt count (the client cannot count
    prompt tokens without the model's tokenizer) with the received completion count and
    the agreed prices.
    """
    body = node_receipt.body
    received = len(received_tokens)
    problems = [
        f"{name} is {got!r}, expected {want!r}"
        for name, got, want in (
            ("id", body.id.hex(), terms.id.hex()),
            ("node", str(body.node_peer_id), str(terms.node)),
            ("model", body.model, terms.model),
            ("price_in", body.price_in, terms.price_in),
            ("price_out", body.price_out, terms.price_out),
            ("completion_tokens", body.completion_tokens, received),
        )
        if got != want
    ]
    if body.tokens_digest != tokens_digest(received_tokens, terms.salt):
        problems.append("tokens_digest does not match the tokens received")
    amount = compute_amount(body.prompt_tokens, received, terms.price_in, terms.price_out)
    if body.amount != amount:
        problems.append(f"amount is {body.amount}, expected {amount}")
    return problems


def countersign(
    node_receipt: NodeReceipt,
    client_key: KeyPair,
    *,
    received_tokens: Sequence[int],
    terms: Terms,
) -> bytes:
    """The client's countersigned receipt: `ok`, or `disputed` with what it observed.

    Disputed when `disagreements` finds anything. Raises `ForgedReceipt` when the
    node's signature does not verify or the receipt bills another client's account:
    neither can become a receipt the ledger accepts.
    """
    body = node_receipt.body
    _check_node_signature(body, node_receipt.node_sig)
    if body.client != client_key.public_key.data:
        raise ForgedReceipt(f"the receipt bills client key {body.client.hex()}, not ours")
    observed = None
    status = Status.OK
    if disagreements(node_receipt, received_tokens=received_tokens, terms=terms):
        status = Status.DISPUTED
        observed = Observed(len(received_tokens), tokens_digest(received_tokens, terms.salt))
    unsigned = Receipt(body, node_receipt.node_sig, status, observed, b"")
    signature = client_key.sign(unsigned.client_message())
    return Receipt(body, node_receipt.node_sig, status, observed, signature).encode()


def _check_node_signature(body: ReceiptBody, signature: bytes) -> None:
    # The peer id inlines the node's key (`_check_body` made sure of it).
    if not _verifies(body.node[-KEY_SIZE:], NODE_DOMAIN + body.encode(), signature):
        raise ForgedReceipt(
            f"the node signature does not verify with the key of peer {body.node_peer_id}"
        )


def _verifies(key: bytes, message: bytes, signature: bytes) -> bool:
    return PublicKey(KeyType.ED25519, key).verify(message, signature)


def _unpack(
    raw: bytes, required: frozenset[str], optional: frozenset[str], what: str
) -> dict[str, Any]:
    if not isinstance(raw, bytes):
        raise MalformedReceipt(f"{what} must be bytes")
    if len(raw) > MAX_RECEIPT:
        raise MalformedReceipt(f"{what} is {len(raw)} bytes, above {MAX_RECEIPT}")
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise MalformedReceipt(f"{what} is not valid msgpack: {e}") from None
    return _map(fields, required, optional, what)


def _map(
    fields: object, required: frozenset[str], optional: frozenset[str], what: str
) -> dict[str, Any]:
    if not isinstance(fields, dict):
        raise MalformedReceipt(f"{what} must be a map")
    if missing := required - fields.keys():
        raise MalformedReceipt(f"{what} lacks {', '.join(sorted(missing))}")
    if unknown := fields.keys() - required - optional:
        names = ", ".join(sorted(map(str, unknown)))
        raise MalformedReceipt(f"{what} has unknown fields {names}")
    return fields


def _decode_body(value: object) -> ReceiptBody:
    fields = _map(value, _BODY_FIELDS, frozenset(), "receipt body")
    if type(fields["v"]) is not int or fields["v"] != VERSION:
        raise MalformedReceipt(f"receipt version {fields['v']!r} is not {VERSION}")
    del fields["v"]
    body = ReceiptBody(**fields)
    _check_body(body)
    return body


def _check_body(body: ReceiptBody) -> None:
    """Types, sizes and times: what makes a body well-formed, whoever built it."""
    for name, value, size in (
        ("id", body.id, ID_SIZE),
        ("client", body.client, KEY_SIZE),
        ("tokens_digest", body.tokens_digest, DIGEST_SIZE),
    ):
        if type(value) is not bytes or len(value) != size:
            raise MalformedReceipt(f"receipt {name} must be {size} bytes")
    if type(body.node) is not bytes or not (
        len(body.node) == len(_ED25519_PEER_PREFIX) + KEY_SIZE
        and body.node.startswith(_ED25519_PEER_PREFIX)
    ):
        raise MalformedReceipt("receipt node must be the peer id of an Ed25519 key")
    if type(body.model) is not str or not 1 <= len(body.model) <= MAX_MODEL:
        raise MalformedReceipt(f"receipt model must be 1..{MAX_MODEL} characters")
    for name in _INT_FIELDS:
        if type(getattr(body, name)) is not int:
            raise MalformedReceipt(f"receipt {name} must be an integer")
    if not 0 <= body.started_ms <= body.finished_ms < MAX_TIMESTAMP_MS:
        raise MalformedReceipt(
            f"receipt times must satisfy 0 <= started_ms <= finished_ms < {MAX_TIMESTAMP_MS}"
        )


def _decode_observed(value: object) -> Observed:
    fields = _map(value, _OBSERVED_FIELDS, frozenset(), "observed counts")
    count = fields["completion_tokens"]
    if type(count) is not int or not 0 <= count < MAX_TOKENS:
        raise MalformedReceipt(
            f"observed completion_tokens must be an integer in [0, {MAX_TOKENS})"
        )
    return Observed(count, _bin(fields, "tokens_digest", DIGEST_SIZE))


def _bin(fields: dict[str, Any], name: str, size: int) -> bytes:
    value = fields[name]
    if type(value) is not bytes or len(value) != size:
        raise MalformedReceipt(f"receipt {name} must be {size} bytes")
    return value


def _check_ranges(body: ReceiptBody) -> None:
    for name in ("prompt_tokens", "completion_tokens"):
        if not 0 <= getattr(body, name) < MAX_TOKENS:
            raise InflatedReceipt(
                f"receipt {name} {getattr(body, name)} is outside [0, {MAX_TOKENS})"
            )
    for name in ("price_in", "price_out"):
        if not 0 <= getattr(body, name) <= MAX_PRICE_MICRO:
            raise InflatedReceipt(
                f"receipt {name} {getattr(body, name)} is outside [0, {MAX_PRICE_MICRO}]"
            )
    if not 0 <= body.amount <= MAX_AMOUNT:
        raise InflatedReceipt(f"receipt amount {body.amount} is outside [0, {MAX_AMOUNT}]")


def _check_amount(body: ReceiptBody) -> None:
    expected = compute_amount(
        body.prompt_tokens, body.completion_tokens, body.price_in, body.price_out
    )
    if body.amount != expected:
        raise InflatedReceipt(
            f"receipt amount {body.amount} is not {expected}, what its counts and prices give"
        )
