"""`/dbloom/attest/1.0.0` over the real host (TCP + Noise + yamux), and its decoders."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
import trio
from attest_helpers import MEASUREMENT
from fuzzing import mutations
from hypothesis import given

from dbloom.attest import (
    PROTOCOL_ID,
    AttestationError,
    AttestationRefused,
    Attestor,
    Claims,
    DevProvider,
    Evidence,
    NodeAttester,
    Policy,
    Reason,
    serve_attest,
)
from dbloom.attest._protocol import (
    AttestRequest,
    AttestResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from dbloom.p2p import DecodeError, Host, KeyPair, NetStream, open_host


class CountingProvider(DevProvider):
    def __init__(self, key: KeyPair) -> None:
        super().__init__(key)
        self.calls = 0

    async def evidence(self, claims: Claims) -> Evidence:
        self.calls += 1
        return await super().evidence(claims)


@asynccontextmanager
async def network(attester: NodeAttester | None) -> AsyncIterator[tuple[Host, Host]]:
    async with (
        open_host(
            attester.key if attester else KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]
        ) as node,
        open_host(KeyPair.generate()) as client,
    ):
        if attester is not None:

            async def handler(stream: NetStream) -> None:
                await serve_attest(stream, attester)

            node.set_stream_handler(PROTOCOL_ID, handler)
        yield node, client


def attester_for(key: KeyPair, provider_key: KeyPair | None = None) -> NodeAttester:
    provider = CountingProvider(provider_key or key)
    return NodeAttester(key=key, provider=provider, measurement=MEASUREMENT)


async def test_client_verifies_and_caches_per_connection() -> None:
    key = KeyPair.generate()
    attester = attester_for(key)
    async with network(attester) as (node, client):
        attestor = Attestor(client, Policy().with_dev(), reattest_after=0.5)
        conn = await client.connect(node.listen_addrs[0])
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(attestor.verdict, conn)
        verdict = await attestor.verdict(conn)
        assert verdict.accepted and not verdict.trusted and verdict.claims is not None
        assert verdict.claims.peer_id == key.peer_id
        provider = attester.provider
        assert isinstance(provider, CountingProvider) and provider.calls == 1
        await trio.sleep(0.6)
        await attestor.verdict(conn)
        assert provider.calls == 2
        await conn.aclose()
        assert attestor.cached(conn) is None


async def test_dev_node_is_refused_without_allow_dev() -> None:
    async with network(attester_for(KeyPair.generate())) as (node, client):
        attestor = Attestor(client, Policy())
        conn = await client.connect(node.listen_addrs[0])
        with pytest.raises(AttestationRefused) as info:
            await attestor.verdict(conn)
        assert "--allow-dev" in str(info.value)


async def test_node_answering_for_another_identity_is_refused() -> None:
    key, impostor = KeyPair.generate(), KeyPair.generate()
    attester = NodeAttester(key=impostor, provider=DevProvider(impostor), measurement=MEASUREMENT)
    async with network(attester_for(key)) as (node, client):

        async def handler(stream: NetStream) -> None:
            await serve_attest(stream, attester)

        node.set_stream_handler(PROTOCOL_ID, handler)
        conn = await client.connect(node.listen_addrs[0])
        with pytest.raises(AttestationRefused) as info:
            await Attestor(client, Policy().with_dev()).verdict(conn)
        verdict = info.value.verdict
        assert Reason.PEER_MISMATCH in verdict.reasons  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"\x00\x00\x00\x03abc",
        b"\xff\xff\xff\xff",
        encode_response(AttestResponse(error="no TPM")),
        encode_response(AttestResponse(evidence=b"\xc1not evidence")),
    ],
)
async def test_hostile_or_broken_nodes_give_clear_errors(answer: bytes) -> None:
    async with network(None) as (node, client):

        async def handler(stream: NetStream) -> None:
            await stream.receive_some()
            await stream.send_all(answer)
            await stream.aclose()

        node.set_stream_handler(PROTOCOL_ID, handler)
        conn = await client.connect(node.listen_addrs[0])
        attestor = Attestor(client, Policy().with_dev(), timeout=2)
        with pytest.raises(AttestationError):
            await attestor.verdict(conn)


async def test_silent_node_times_out_and_unsupported_protocol_fails() -> None:
    async with network(None) as (node, client):

        async def silent(stream: NetStream) -> None:
            await trio.sleep_forever()

        conn = await client.connect(node.listen_addrs[0])
        with pytest.raises(AttestationError, match="gave no evidence"):
            await Attestor(client, Policy().with_dev(), timeout=2).verdict(conn)
        node.set_stream_handler(PROTOCOL_ID, silent)
        with pytest.raises(AttestationError, match="did not answer"):
            await Attestor(client, Policy().with_dev(), timeout=0.3).verdict(conn)


@given(mutations(encode_request(AttestRequest(b"\x01" * 32))[4:]))
def test_request_decoder_raises_only_decode_errors(payload: bytes) -> None:
    with suppress(DecodeError):
        assert len(decode_request(payload).nonce) == 32


@given(mutations(encode_response(AttestResponse(evidence=b"\x01" * 40))[4:]))
def test_response_decoder_raises_only_decode_errors(payload: bytes) -> None:
    with suppress(DecodeError):
        decode_response(payload)
