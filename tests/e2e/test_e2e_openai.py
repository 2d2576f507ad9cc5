"""The official `openai` SDK against `dbloom shim`, backed by real peers on loopback.

Everything is real: TCP on 127.0.0.1, Noise, yamux, Kademlia, dev attestation verified by
the shim, MLX generating with a generated tiny model.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from network_helpers import MODEL, in_thread, network

from dbloom.inference import ChatMessage, Final, GenerateRequest, MLXEngine

PROMPT = "Peers find each other through the DHT"


async def local_greedy(model_dir: Path, max_tokens: int) -> str:
    async with MLXEngine(model_dir, model_id=MODEL) as engine:
        request = GenerateRequest(
            model=MODEL,
            messages=(ChatMessage(role="user", content=PROMPT),),
            max_tokens=max_tokens,
            temperature=0.0,
        )
        text = ""
        async with engine.generate(request) as gen:
            async for item in gen:
                if not isinstance(item, Final):
                    text += item.text
        return text


async def test_sdk_sync_and_async_streaming_and_not_equal_local_greedy(e2e_model: Path) -> None:
    expected = await local_greedy(e2e_model, 24)
    async with network(e2e_model) as net:
        client = net.client()
        messages = [{"role": "user", "content": PROMPT}]

        def blocking() -> tuple[str, str, str]:
            whole = client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=24,
                temperature=0,  # type: ignore[arg-type]
            )
            parts = []
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = None
            for chunk in raw.parse():
                usage = chunk.usage or usage
                parts.extend(c.delta.content or "" for c in chunk.choices)
            assert usage is not None and usage.completion_tokens == 24
            assert whole.usage is not None and whole.usage.completion_tokens == 24
            return (
                whole.choices[0].message.content or "",
                "".join(parts),
                raw.headers["x-dbloom-node"],
            )

        whole, streamed, node = await in_thread(blocking)
        assert whole == expected and streamed == expected
        assert node in {p.peer_id for p in net.peers}

        async_client = net.async_client()
        result = await async_client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,  # type: ignore[arg-type]
        )
        assert result.choices[0].message.content == expected
        stream = await async_client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        text = ""
        async for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
        assert text == expected
        models = await async_client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        await async_client.close()


async def test_failover_when_a_peer_dies(e2e_model: Path) -> None:
    async with network(e2e_model) as net:
        client = net.async_client()

        async def ask() -> str:
            r = await client.completions.with_raw_response.create(
                model=MODEL, prompt="hello", max_tokens=4, temperature=0
            )
            return r.headers["x-dbloom-node"]

        first = await ask()
        victim = next(i for i, p in enumerate(net.peers) if p.peer_id == first)
        net.kill(victim)
        await trio.sleep(0.2)
        served = [await ask() for _ in range(6)]
        assert first not in served
        assert set(served) <= {p.peer_id for p in net.peers}
        await client.close()


async def test_fifty_concurrent_streams(e2e_model: Path) -> None:
    async with network(e2e_model) as net:
        client = net.async_client(timeout=120)
        results: list[str] = []

        async def one(i: int) -> None:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"request {i}"}],
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            text = ""
            async for chunk in stream:
                text += "".join(c.delta.content or "" for c in chunk.choices)
            results.append(text)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        assert len(results) == 50
        assert sum(net.served()) == 50 and all(n > 0 for n in net.served())
        await client.close()


async def test_errors_through_the_network(e2e_model: Path) -> None:
    async with network(e2e_model, peers=1) as net:
        client = net.async_client()
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=4)
        assert "context" in str(info.value)
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=MODEL, prompt="hi", n=2)
        assert net.shim is not None
        status, body = await in_thread(lambda: post(net.shim.port, b"{not json"))
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        wrong = json.dumps({"model": MODEL, "messages": 5}).encode()
        status, body = await in_thread(lambda: post(net.shim.port, wrong))
        assert status == 400 and body["error"]["param"] == "messages"
        await client.close()


def post(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


async def test_no_peers_is_503(e2e_model: Path) -> None:
    async with network(e2e_model, peers=0) as net:
        client = net.async_client()
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503
        await client.close()


async def test_refused_attestation_never_sends_a_prompt(e2e_model: Path) -> None:
    async with network(e2e_model, allow_dev=False) as net:
        client = net.async_client()
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=MODEL, prompt="secret prompt", max_tokens=2)
        assert info.value.status_code == 503
        assert net.served() == [0, 0, 0]
        await client.close()


async def test_client_disconnect_frees_the_batch_slot(e2e_model: Path) -> None:
    async with network(e2e_model, peers=1) as net:
        assert net.shim is not None
        port = net.shim.port
        body = {"model": MODEL, "prompt": "a long story", "max_tokens": 2000, "stream": True}

        def read_a_little_then_hang_up() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request(
                "POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"}
            )
            response = conn.getresponse()
            for _ in range(3):
                response.readline()
            active = net.active()
            conn.sock.close()  # type: ignore[union-attr]
            conn.close()
            return active

        assert await in_thread(read_a_little_then_hang_up) == 1
        with trio.fail_after(5):
            while net.active():
                await trio.sleep(0.05)


async def test_a_node_dying_mid_stream_ends_it_with_an_error_event(e2e_model: Path) -> None:
    async with network(e2e_model, peers=2) as net:
        client = net.async_client(timeout=30)
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "tell me everything"}],
            max_tokens=2000,
            stream=True,
            stream_options={"include_usage": True},
        )
        node = raw.headers["x-dbloom-node"]
        stream = raw.parse()
        seen = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                seen += 1
                if seen == 3:
                    net.kill(next(i for i, p in enumerate(net.peers) if p.peer_id == node))
        assert seen >= 3
        await client.close()


async def test_a_stopping_peer_finishes_running_work_and_takes_no_more(e2e_model: Path) -> None:
    async with network(e2e_model, peers=2, drain_timeout=60) as net:
        client = net.async_client(timeout=60)
        raw = await client.completions.with_raw_response.create(
            model=MODEL, prompt="a long answer", max_tokens=100, temperature=0, stream=True
        )
        node = raw.headers["x-dbloom-node"]
        stopping = next(p for p in net.peers if p.peer_id == node)
        finish = None
        text = ""
        async for chunk in raw.parse():
            if stopping.status == "serving":
                stopping.request_stop()
            text += "".join(c.text for c in chunk.choices)
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        assert finish == "length" and stopping.pool is not None
        assert stopping.pool.draining and stopping.pool.in_flight == 0
        for _ in range(4):
            r = await client.completions.with_raw_response.create(
                model=MODEL, prompt="next", max_tokens=2
            )
            assert r.headers["x-dbloom-node"] != node
        await client.close()
