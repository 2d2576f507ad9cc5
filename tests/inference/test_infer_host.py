"""`/dbloom/infer/1.0.0` on the real libp2p host: TCP + Noise + yamux, one stream per request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from infer_helpers import MODEL_ID, infer_all, tokens_of

from dbloom.inference import (
    PROTOCOL_ID,
    Chunk,
    EngineBusy,
    Final,
    GenerateRequest,
    MLXEngine,
    serve_infer,
)
from dbloom.p2p import Host, KeyPair, NetStream, open_host


async def ask(client: Host, server: Host, request: GenerateRequest) -> tuple[list[Chunk], Final]:
    return await infer_all(await client.new_stream(server.listen_addrs[0], [PROTOCOL_ID]), request)


async def test_greedy_through_the_encrypted_host_equals_mlx(
    engine: MLXEngine, reference: Any
) -> None:
    from mlx_lm import stream_generate

    model, tokenizer = reference

    async def handler(stream: NetStream) -> None:
        await serve_infer(stream, engine)

    async with (
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as node,
        open_host(KeyPair.generate()) as client,
    ):
        node.set_stream_handler(PROTOCOL_ID, handler)
        prompts = ["Hello world", "Peers find each other", "Noise keeps it private"]
        results: dict[str, list[int]] = {}

        async def one(prompt: str) -> None:
            request = GenerateRequest(model=MODEL_ID, prompt=prompt, max_tokens=32, temperature=0.0)
            chunks, final = await ask(client, node, request)
            assert final.completion_tokens == len(tokens_of(chunks))
            results[prompt] = tokens_of(chunks)

        async with trio.open_nursery() as nursery:
            for prompt in prompts:
                nursery.start_soon(one, prompt)
        for prompt in prompts:
            expected = list(stream_generate(model, tokenizer, prompt, max_tokens=32))
            ids = [r.token for r in expected]
            if expected[-1].finish_reason == "stop":
                ids.pop()
            assert results[prompt] == ids
        assert client.num_connections == 1  # three requests, one connection, three streams


async def test_a_flooding_peer_cannot_lock_another_out(tiny_model: Path) -> None:
    engine = MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=2)

    async def handler(stream: NetStream) -> None:
        await serve_infer(stream, engine, client=str(stream.peer_id))

    def request(prompt: str, max_tokens: int, *, no_end: bool = False) -> GenerateRequest:
        # The generated model may end early; the flood's requests must run their length.
        ban = tuple((eos, -100.0) for eos in sorted(engine._tokenizer.eos_token_ids))
        return GenerateRequest(
            model=MODEL_ID,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            logit_bias=ban if no_end else (),
        )

    async with (
        engine,
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as node,
        open_host(KeyPair.generate()) as flooder,
        open_host(KeyPair.generate()) as honest,
        trio.open_nursery() as nursery,
    ):
        node.set_stream_handler(PROTOCOL_ID, handler)
        flood_outcomes: list[str] = []

        async def flood(max_tokens: int) -> None:
            try:
                await ask(flooder, node, request("flood", max_tokens, no_end=True))
                flood_outcomes.append("served")
            except EngineBusy as exc:
                flood_outcomes.append(str(exc))

        nursery.start_soon(flood, 300)  # runs first, and ends within seconds
        with trio.fail_after(10):
            while engine.load().active < 1:
                await trio.sleep(0.01)
        for _ in range(2):
            nursery.start_soon(flood, 2000)
        with trio.fail_after(10):
            while engine.load().free:
                await trio.sleep(0.01)

        with trio.fail_after(60):
            _, final = await ask(honest, node, request("my turn", 4))
        assert final.completion_tokens == 4
        with trio.fail_after(10):
            while len(flood_outcomes) < 2:
                await trio.sleep(0.01)
        # One of the flood's queued requests gave way; the one running was served.
        assert sorted(o[:9] for o in flood_outcomes) == ["displaced", "served"]
        nursery.cancel_scope.cancel()
