"""Serving: models, health, metrics, disconnects, many clients, shutdown, bind rules."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import httpx2
import pytest
import trio
from openai.types import Model
from openai.types.chat import ChatCompletionMessageParam
from shim_helpers import (
    MODEL_ID,
    Shim,
    async_client,
    engine_output,
    in_thread,
    sync_client,
    wait_idle,
)

from dbloom.api import ApiKeys, InsecureBind, check_bind, create_app, is_loopback, serve_api
from dbloom.inference import GenerateRequest, MLXEngine

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello world"}]


async def test_models(shim: Shim, engine: MLXEngine) -> None:
    def call() -> tuple[list[Model], Model]:
        with sync_client(shim) as client:
            return list(client.models.list()), client.models.retrieve(MODEL_ID)

    listed, one = await in_thread(call)
    assert [m.id for m in listed] == [MODEL_ID]
    assert one.id == MODEL_ID
    assert one.object == "model"
    assert one.owned_by == "dbloom"
    extra = one.model_extra or {}
    assert extra["dbloom"] == {
        "context_length": engine.info.context_length,
        "digest": engine.info.digest,
    }


async def test_health_and_metrics(shim: Shim) -> None:
    async with async_client(shim) as client:
        await client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=7)
        stream = await client.completions.create(
            model=MODEL_ID, prompt="Hi", max_tokens=5, stream=True
        )
        async for _ in stream:
            pass
    async with httpx2.AsyncClient(base_url=shim.url) as http:
        health = await http.get("/health")
        assert health.json() == {"status": "ok", "models": 1}
        await http.get("/no/such/path")
        metrics = await http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'dbloom_shim_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'dbloom_shim_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'dbloom_shim_requests_total{route="unmatched",status="404"} 1.0' in text
    assert f'dbloom_shim_generated_tokens_total{{model="{MODEL_ID}"}} 12.0' in text
    assert "dbloom_shim_time_to_first_token_seconds_count 2.0" in text
    assert "dbloom_shim_requests_in_flight 1.0" in text


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_frees_the_batch_slot(shim: Shim, stream: bool) -> None:
    """A client that leaves mid-generation (before the status of a non-streaming answer,
    or mid-stream) frees its batch slot at once."""
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2000, "stream": stream}
    async with (
        httpx2.AsyncClient(base_url=shim.url, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(partial(http.post, "/v1/completions", json=body))
        with trio.fail_after(5):
            while not shim.engine.load().active:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await wait_idle(shim.engine, timeout=1.0)


async def test_sdk_stream_closed_mid_way_frees_the_slot(shim: Shim) -> None:
    async with async_client(shim) as client:
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=USER, max_tokens=2000, stream=True
        )
        await anext(stream.__aiter__())
        assert shim.engine.load().active == 1
        await stream.close()
    await wait_idle(shim.engine, timeout=1.0)


async def test_many_concurrent_streams(shim: Shim) -> None:
    prompts = [f"Peers find each other {i}" for i in range(32)]
    expected: dict[int, str] = {}
    texts: dict[int, str] = {}

    async def reference(index: int) -> None:
        request = GenerateRequest(
            model=MODEL_ID, prompt=prompts[index], max_tokens=16, temperature=0.0
        )
        expected[index], _ = await engine_output(shim.engine, request)

    async with trio.open_nursery() as nursery:
        for index in range(len(prompts)):
            nursery.start_soon(reference, index)
    async with async_client(shim) as client:

        async def one(index: int) -> None:
            stream = await client.completions.create(
                model=MODEL_ID, prompt=prompts[index], max_tokens=16, temperature=0, stream=True
            )
            texts[index] = "".join([c.choices[0].text async for c in stream if c.choices])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index in range(len(prompts)):
                    nursery.start_soon(one, index)
    assert texts == expected


async def test_cancelling_the_server_lets_streams_finish(engine: MLXEngine) -> None:
    """Shutdown is graceful: a stream in flight completes; new connections are refused."""
    app = create_app(engine, keys=None)
    async with trio.open_nursery() as nursery:
        server = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with server:
                await serve_api(app, host="127.0.0.1", port=0, grace=5.0, task_status=task_status)

        port = await nursery.start(run)
        body = {
            "model": MODEL_ID,
            "prompt": "Hello",
            "max_tokens": 60,
            "stream": True,
            "temperature": 0,
        }
        async with (
            httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            chunks = response.aiter_bytes()
            first = await anext(chunks)
            server.cancel()
            rest = b"".join([c async for c in chunks])
        events = (first + rest).decode().split("\n\n")
        assert events[-2] == "data: [DONE]"
        finish = json.loads(events[-3].removeprefix("data: "))
        assert finish["choices"][0]["finish_reason"] == "length"
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


def test_bind_rules(tmp_path: Path) -> None:
    keys = ApiKeys.in_home(tmp_path)
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.8.9.10"):
        assert is_loopback(host)
        check_bind(host, None)
        check_bind(host, keys)
    for host in ("0.0.0.0", "::", "192.168.1.2", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(InsecureBind, match=r"requires API keys: run `dbloom shim keys add"):
            check_bind(host, keys)
        with pytest.raises(InsecureBind):
            check_bind(host, None)
    keys.add("ops")
    check_bind("0.0.0.0", keys)


async def test_serve_on_ipv6_loopback(engine: MLXEngine) -> None:
    app = create_app(engine, keys=None)
    async with trio.open_nursery() as nursery:
        try:
            port = await nursery.start(partial(serve_api, app, host="::1", port=0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        async with httpx2.AsyncClient() as http:
            health = await http.get(f"http://[::1]:{port}/health")
        assert health.status_code == 200
        nursery.cancel_scope.cancel()
