"""Receipts: the wire format, both signatures, the client's dispute, and every refusal.

The builders at the top are shared with the other ledger tests (tests/ is no package,
so they import this module by name).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import nacl.signing
import pytest
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st

from dbloom.ledger import (
    MAX_RECEIPT,
    ForgedReceipt,
    InflatedReceipt,
    MalformedReceipt,
    NodeReceipt,
    Observed,
    Receipt,
    ReceiptBody,
    ReceiptError,
    Status,
    Terms,
    compute_amount,
    countersign,
    decode_node_receipt,
    decode_receipt,
    disagreements,
    sign_as_node,
    tokens_digest,
    verify_receipt,
)
from dbloom.ledger._money import MAX_PRICE_MICRO
from dbloom.ledger._receipt import MAX_TOKENS, NODE_DOMAIN
from dbloom.p2p import DecodeError, KeyPair, KeyType, PeerId, PublicKey

NODE = KeyPair.from_seed(b"n" * 32)
CLIENT = KeyPair.from_seed(b"c" * 32)
OTHER = KeyPair.from_seed(b"o" * 32)
MODEL = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
PRICE_IN, PRICE_OUT = 50_000, 200_000
T0 = 1_700_000_000_000
TOKENS = (17, 4242, 9, 100_000)


def body_for(
    tokens: Sequence[int] = TOKENS,
    *,
    node: KeyPair = NODE,
    client: KeyPair = CLIENT,
    prompt_tokens: int = 12,
    price_in: int = PRICE_IN,
    price_out: int = PRICE_OUT,
    finished_ms: int = T0 + 900,
    **changes: Any,
) -> ReceiptBody:
    """An honest node's body for `tokens`, with a fresh random id unless `id` is given."""
    body = ReceiptBody(
        id=os.urandom(16),
        node=node.peer_id.multihash,
        client=client.public_key.data,
        model=MODEL,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(tokens),
        price_in=price_in,
        price_out=price_out,
        amount=compute_amount(prompt_tokens, len(tokens), price_in, price_out),
        started_ms=finished_ms - 900,
        finished_ms=finished_ms,
        tokens_digest=tokens_digest(tokens),
    )
    return dataclasses.replace(body, **changes)


def terms_for(body: ReceiptBody, node: KeyPair = NODE) -> Terms:
    """What a client that asked for `body`'s request expects."""
    return Terms(
        id=body.id,
        node=node.peer_id,
        model=MODEL,
        price_in=body.price_in,
        price_out=body.price_out,
    )


def make_receipt(
    tokens: Sequence[int] = TOKENS,
    *,
    node: KeyPair = NODE,
    client: KeyPair = CLIENT,
    received: Sequence[int] | None = None,
    **changes: Any,
) -> bytes:
    """A receipt as the honest node and client produce it (disputed if `received` differs)."""
    body = body_for(tokens, node=node, client=client, **changes)
    node_receipt = decode_node_receipt(sign_as_node(body, node))
    return countersign(
        node_receipt,
        client,
        received_tokens=tokens if received is None else received,
        terms=terms_for(body, node),
    )


def sign_both(
    body: ReceiptBody,
    *,
    node: KeyPair = NODE,
    client: KeyPair = CLIENT,
    status: Status = Status.OK,
    observed: Observed | None = None,
) -> bytes:
    """A receipt both keys signed whatever it says (how a dishonest pair would make one)."""
    node_sig = node.sign(NODE_DOMAIN + body.encode())
    unsigned = Receipt(body, node_sig, status, observed, b"")
    client_sig = client.sign(unsigned.client_message())
    return Receipt(body, node_sig, status, observed, client_sig).encode()


def packed(value: Any) -> bytes:
    """Canonical msgpack as the spec says, written independently of the code under test."""

    def ordered(v: Any) -> Any:
        return {k: ordered(v[k]) for k in sorted(v)} if isinstance(v, dict) else v

    data: bytes = msgpack.packb(ordered(value), use_bin_type=True)
    return data


VALID = make_receipt()
VALID_NODE = sign_as_node(body_for(), NODE)


def test_tokens_digest_follows_the_spec() -> None:
    ids = [0, 1, 255, 256, 2**32 - 1]
    expected = hashlib.sha256(
        b"dbloom/tokens/v1\x00" + b"".join(i.to_bytes(4, "big") for i in ids)
    ).digest()
    assert tokens_digest(ids) == expected
    assert tokens_digest([]) == hashlib.sha256(b"dbloom/tokens/v1\x00").digest()
    assert tokens_digest([1, 2]) != tokens_digest([2, 1])
    for bad in ([-1], [2**32]):
        with pytest.raises(ValueError, match="token ids"):
            tokens_digest(bad)


def test_amount_floors_the_sum_once() -> None:
    # Half a micro-unit on each side: floored apart it would be 0, floored once it is 1.
    assert compute_amount(1, 1, 500_000, 500_000) == 1
    assert compute_amount(1_000_000, 0, 250_000, 999) == 250_000
    assert compute_amount(12, 4, PRICE_IN, PRICE_OUT) == (12 * 50_000 + 4 * 200_000) // 10**6
    assert compute_amount(0, 0, MAX_PRICE_MICRO, MAX_PRICE_MICRO) == 0


def test_round_trip() -> None:
    receipt = decode_receipt(VALID)
    verify_receipt(receipt)
    assert receipt.status is Status.OK and receipt.paid and receipt.observed is None
    assert receipt.encode() == VALID
    body = receipt.body
    assert body.node_peer_id == NODE.peer_id
    assert body.client == CLIENT.public_key.data
    assert (body.model, body.prompt_tokens, body.completion_tokens) == (MODEL, 12, 4)
    assert body.amount == compute_amount(12, 4, PRICE_IN, PRICE_OUT)
    assert body.tokens_digest == tokens_digest(TOKENS)
    node_receipt = decode_node_receipt(VALID_NODE)
    assert node_receipt.encode() == VALID_NODE


def test_wire_format_matches_the_spec() -> None:
    fields = msgpack.unpackb(VALID, raw=False)
    assert list(fields) == ["body", "client_sig", "node_sig", "status"]
    assert fields["status"] == "ok"
    body = fields["body"]
    assert list(body) == sorted(body) and body["v"] == 1 and len(body["id"]) == 16
    assert body["node"] == NODE.peer_id.multihash and body["client"] == CLIENT.public_key.data
    node_key = nacl.signing.VerifyKey(NODE.public_key.data)
    node_key.verify(b"dbloom/receipt/node/v1\x00" + packed(body), fields["node_sig"])
    unsigned = {k: v for k, v in fields.items() if k != "client_sig"}
    client_key = nacl.signing.VerifyKey(CLIENT.public_key.data)
    client_key.verify(b"dbloom/receipt/client/v1\x00" + packed(unsigned), fields["client_sig"])
    assert packed(fields) == VALID
    assert msgpack.unpackb(VALID_NODE, raw=False).keys() == {"body", "node_sig"}


def test_the_largest_receipt_fits_the_cap() -> None:
    huge = MAX_TOKENS - 1
    body = body_for(
        model="\U0001f600" * 256,
        prompt_tokens=huge,
        price_in=MAX_PRICE_MICRO,
        price_out=MAX_PRICE_MICRO,
        completion_tokens=huge,
        amount=compute_amount(huge, huge, MAX_PRICE_MICRO, MAX_PRICE_MICRO),
        started_ms=2**53 - 2,
        finished_ms=2**53 - 1,
    )
    observed = Observed(huge, bytes(32))
    raw = sign_both(body, status=Status.DISPUTED, observed=observed)
    assert len(raw) <= MAX_RECEIPT
    verify_receipt(decode_receipt(raw))


def test_sign_as_node_refuses_what_a_ledger_would_refuse() -> None:
    honest = body_for()
    cases = [
        (dataclasses.replace(honest, node=OTHER.peer_id.multihash), "another node"),
        (dataclasses.replace(honest, amount=honest.amount + 1), "amount"),
        (dataclasses.replace(honest, id=b"short"), "id must be 16 bytes"),
        (dataclasses.replace(honest, model=""), "model"),
        (dataclasses.replace(honest, prompt_tokens=-1), "prompt_tokens"),
        (dataclasses.replace(honest, started_ms=honest.finished_ms + 1), "times"),
    ]
    for body, message in cases:
        with pytest.raises(ValueError, match=message):
            sign_as_node(body, NODE)


def test_countersign_ok_when_everything_matches() -> None:
    receipt = decode_receipt(make_receipt(TOKENS))
    assert receipt.status is Status.OK
    node_receipt = decode_node_receipt(VALID_NODE)
    terms = terms_for(node_receipt.body)
    assert disagreements(node_receipt, received_tokens=TOKENS, terms=terms) == []


def _node_receipt(body: ReceiptBody) -> NodeReceipt:
    """A node receipt signed whatever its body says (`sign_as_node` refuses bad ones)."""
    return NodeReceipt(body, NODE.sign(NODE_DOMAIN + body.encode()))


DISPUTES: list[tuple[str, Callable[[ReceiptBody, Terms], tuple[ReceiptBody, Terms]]]] = [
    ("completion_tokens", lambda b, t: (dataclasses.replace(b, completion_tokens=5), t)),
    ("tokens_digest", lambda b, t: (dataclasses.replace(b, tokens_digest=bytes(32)), t)),
    ("amount", lambda b, t: (dataclasses.replace(b, amount=b.amount + 1), t)),
    ("price_in", lambda b, t: (b, dataclasses.replace(t, price_in=t.price_in - 1))),
    ("price_out", lambda b, t: (b, dataclasses.replace(t, price_out=t.price_out - 1))),
    ("model", lambda b, t: (b, dataclasses.replace(t, model="another-model"))),
    ("node", lambda b, t: (b, dataclasses.replace(t, node=OTHER.peer_id))),
    ("id", lambda b, t: (b, dataclasses.replace(t, id=os.urandom(16)))),
]


@pytest.mark.parametrize(("field", "change"), DISPUTES, ids=[d[0] for d in DISPUTES])
def test_countersign_disputes_any_mismatch(
    field: str, change: Callable[[ReceiptBody, Terms], tuple[ReceiptBody, Terms]]
) -> None:
    honest = body_for()
    body, terms = change(honest, terms_for(honest))
    node_receipt = _node_receipt(body)
    problems = disagreements(node_receipt, received_tokens=TOKENS, terms=terms)
    assert problems and any(p.startswith(field) for p in problems)
    receipt = decode_receipt(countersign(node_receipt, CLIENT, received_tokens=TOKENS, terms=terms))
    assert receipt.status is Status.DISPUTED and not receipt.paid
    assert receipt.observed == Observed(len(TOKENS), tokens_digest(TOKENS))
    verify_receipt(receipt)


def test_disputed_when_fewer_tokens_arrived() -> None:
    receipt = decode_receipt(make_receipt(TOKENS, received=TOKENS[:2]))
    assert receipt.status is Status.DISPUTED
    assert receipt.observed == Observed(2, tokens_digest(TOKENS[:2]))
    assert receipt.body.completion_tokens == len(TOKENS)
    verify_receipt(receipt)


def test_countersign_refuses_a_forged_or_misaddressed_node_receipt() -> None:
    body = body_for()
    forged = NodeReceipt(body, OTHER.sign(NODE_DOMAIN + body.encode()))
    with pytest.raises(ForgedReceipt, match="node signature"):
        countersign(forged, CLIENT, received_tokens=TOKENS, terms=terms_for(body))
    other_client = body_for(client=OTHER)
    with pytest.raises(ForgedReceipt, match="bills client key"):
        countersign(
            _node_receipt(other_client), CLIENT, received_tokens=TOKENS, terms=terms_for(body)
        )


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def _forged_node_sig() -> bytes:
    body = body_for()
    node_sig = _flip(NODE.sign(NODE_DOMAIN + body.encode()))
    unsigned = Receipt(body, node_sig, Status.OK, None, b"")
    return Receipt(body, node_sig, Status.OK, None, CLIENT.sign(unsigned.client_message())).encode()


def _forged_client_sig() -> bytes:
    fields = msgpack.unpackb(VALID, raw=False)
    fields["client_sig"] = _flip(fields["client_sig"])
    return packed(fields)


def _other_peer_id() -> bytes:
    # The body names OTHER's peer id; NODE signs it.
    return sign_both(body_for(node=OTHER), node=NODE)


def _sha256_peer_id() -> bytes:
    rsa_like = PublicKey(KeyType.RSA, os.urandom(300))
    return sign_both(
        dataclasses.replace(body_for(), node=PeerId.from_public_key(rsa_like).multihash)
    )


def _body_field(name: str, value: Any) -> bytes:
    """VALID with one body field replaced at the msgpack level (signatures now stale)."""
    fields = msgpack.unpackb(VALID, raw=False)
    if value is None:
        del fields["body"][name]
    else:
        fields["body"][name] = value
    return packed(fields)


def _disputed(observed: bool, status: str) -> bytes:
    fields = msgpack.unpackb(VALID, raw=False)
    fields["status"] = status
    if observed:
        fields["observed"] = {"completion_tokens": 1, "tokens_digest": bytes(32)}
    return packed(fields)


def _unsorted() -> bytes:
    fields = msgpack.unpackb(VALID, raw=False)
    data: bytes = msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True)
    return data


def _big_int_encoding() -> bytes:
    # 12 as a uint64 (0xcf) instead of a positive fixint: same value, another byte form.
    fields = msgpack.unpackb(VALID, raw=False)
    small = packed(fields)
    needle = b"\xadprompt_tokens\x0c"
    assert needle in small
    return small.replace(needle, b"\xadprompt_tokens\xcf" + (12).to_bytes(8, "big"))


TAMPERED: list[tuple[str, Callable[[], bytes], type[ReceiptError], str]] = [
    ("forged node signature", _forged_node_sig, ForgedReceipt, "node signature"),
    ("forged client signature", _forged_client_sig, ForgedReceipt, "client signature"),
    ("node key is not the peer id's", _other_peer_id, ForgedReceipt, "node signature"),
    (
        "client signs as another account",
        lambda: sign_both(body_for(client=OTHER), client=CLIENT),
        ForgedReceipt,
        "client signature",
    ),
    (
        "inflated amount",
        lambda: sign_both(dataclasses.replace(body_for(), amount=body_for().amount + 1)),
        InflatedReceipt,
        "amount",
    ),
    (
        "negative prompt count",
        lambda: sign_both(body_for(prompt_tokens=-5, amount=0)),
        InflatedReceipt,
        "prompt_tokens",
    ),
    (
        "huge completion count",
        lambda: sign_both(
            dataclasses.replace(body_for(), completion_tokens=2**40, amount=2**40 // 5)
        ),
        InflatedReceipt,
        "completion_tokens",
    ),
    (
        "price above the maximum",
        lambda: sign_both(body_for(price_out=MAX_PRICE_MICRO + 1)),
        InflatedReceipt,
        "price_out",
    ),
    (
        "negative price",
        lambda: sign_both(body_for(price_in=-1)),
        InflatedReceipt,
        "price_in",
    ),
    ("float price", lambda: _body_field("price_in", 0.05), MalformedReceipt, "price_in"),
    ("bool count", lambda: _body_field("prompt_tokens", True), MalformedReceipt, "integer"),
    ("missing field", lambda: _body_field("model", None), MalformedReceipt, "lacks model"),
    ("unknown field", lambda: _body_field("tip", 5), MalformedReceipt, "unknown fields tip"),
    ("version 2", lambda: _body_field("v", 2), MalformedReceipt, "version"),
    ("short id", lambda: _body_field("id", b"1234"), MalformedReceipt, "id must be 16"),
    ("text digest", lambda: _body_field("tokens_digest", "x" * 32), MalformedReceipt, "digest"),
    ("long model", lambda: _body_field("model", "m" * 257), MalformedReceipt, "model"),
    ("sha-256 peer id", _sha256_peer_id, MalformedReceipt, "Ed25519"),
    (
        "finished before started",
        lambda: sign_both(body_for(started_ms=T0 + 901)),
        MalformedReceipt,
        "times",
    ),
    ("truncated", lambda: VALID[:-1], MalformedReceipt, "msgpack"),
    ("garbage", lambda: b"\xc1garbage", MalformedReceipt, "msgpack"),
    ("trailing bytes", lambda: VALID + b"\x00", MalformedReceipt, "msgpack"),
    ("not a map", lambda: packed([1, 2]), MalformedReceipt, "map"),
    ("oversized", lambda: VALID + bytes(MAX_RECEIPT), MalformedReceipt, "above"),
    ("unsorted keys", _unsorted, MalformedReceipt, "canonical"),
    ("non-minimal int", _big_int_encoding, MalformedReceipt, "canonical"),
    ("unknown status", lambda: _disputed(False, "maybe"), MalformedReceipt, "status"),
    (
        "disputed, nothing observed",
        lambda: _disputed(False, "disputed"),
        MalformedReceipt,
        "observed",
    ),
    ("ok with observed counts", lambda: _disputed(True, "ok"), MalformedReceipt, "observed"),
]


@pytest.mark.parametrize(
    ("make", "error", "message"), [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED]
)
def test_every_tamper_is_refused_with_its_kind(
    make: Callable[[], bytes], error: type[ReceiptError], message: str
) -> None:
    raw = make()
    with pytest.raises(error, match=message) as caught:
        verify_receipt(decode_receipt(raw))
    assert (
        caught.value.kind
        == {
            MalformedReceipt: "malformed",
            ForgedReceipt: "forged",
            InflatedReceipt: "inflated",
        }[error]
    )
    assert isinstance(caught.value, DecodeError)


def test_a_disputed_receipt_need_not_follow_the_amount_rule() -> None:
    body = dataclasses.replace(body_for(), amount=body_for().amount + 7)
    observed = Observed(len(TOKENS), tokens_digest(TOKENS))
    receipt = decode_receipt(sign_both(body, status=Status.DISPUTED, observed=observed))
    verify_receipt(receipt)
    assert not receipt.paid
    out_of_range = dataclasses.replace(body, amount=-1)
    with pytest.raises(InflatedReceipt, match="amount"):
        verify_receipt(
            decode_receipt(sign_both(out_of_range, status=Status.DISPUTED, observed=observed))
        )


def test_node_receipt_decoder_refusals() -> None:
    for raw, message in [
        (VALID, "unknown fields"),
        (VALID_NODE[:-3], "msgpack"),
        (packed({"body": {}, "node_sig": bytes(64)}), "lacks"),
        (packed({**msgpack.unpackb(VALID_NODE), "node_sig": b"x"}), "node_sig"),
        (bytes(MAX_RECEIPT + 1), "above"),
    ]:
        with pytest.raises(MalformedReceipt, match=message):
            decode_node_receipt(raw)


@given(st.binary(max_size=600))
def test_decoders_raise_only_receipt_errors_on_random_bytes(raw: bytes) -> None:
    for decode in (decode_receipt, decode_node_receipt):
        with contextlib.suppress(ReceiptError):
            decode(raw)


@given(mutations(VALID))
def test_mutated_receipts_are_refused_or_unchanged(raw: bytes) -> None:
    try:
        receipt = decode_receipt(raw)
        verify_receipt(receipt)
    except ReceiptError:
        return
    assert raw == VALID


@given(mutations(VALID_NODE))
def test_mutated_node_receipts_are_refused_or_unchanged(raw: bytes) -> None:
    body = decode_node_receipt(VALID_NODE).body
    try:
        node_receipt = decode_node_receipt(raw)
        countersign(node_receipt, CLIENT, received_tokens=TOKENS, terms=terms_for(body))
    except ReceiptError:
        return
    assert raw == VALID_NODE


def test_the_tokens_digest_is_keyed_by_the_request_salt() -> None:
    salted = tokens_digest(TOKENS, b"\x01" * 16)
    assert salted != tokens_digest(TOKENS) and salted != tokens_digest(TOKENS, b"\x02" * 16)
    body = body_for(tokens_digest=salted)
    node_receipt = decode_node_receipt(sign_as_node(body, NODE))
    terms = dataclasses.replace(terms_for(body), salt=b"\x01" * 16)
    assert disagreements(node_receipt, received_tokens=TOKENS, terms=terms) == []
    assert disagreements(node_receipt, received_tokens=TOKENS, terms=terms_for(body))
