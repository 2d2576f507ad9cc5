"""Apps written for other APIs, unchanged but for the URL, against `dbloom shim` backed by
real peers on loopback: the official `anthropic` SDK, and the `requests` example of a drop-in
model name, with API keys required although the shim listens on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from anthropic.types import Message
from network_helpers import MODEL, in_thread, network

from dbloom.api import ApiKeys
from dbloom.cli._shim import ShimNode, ShimSettings
from dbloom.inference import ChatMessage, Final, GenerateRequest, MLXEngine

SYSTEM = "Be brief."
PROMPT = "Peers find each other through the DHT"
GREEDY = {"temperature": 0}
"""Sampling settings ride in `extra_body`: this SDK's `create` no longer names them."""


async def local_greedy(model_dir: Path, max_tokens: int) -> str:
    request = GenerateRequest(
        model=MODEL,
        messages=(
            ChatMessage(role="system", content=SYSTEM),
            ChatMessage(role="user", content=PROMPT),
        ),
        max_tokens=max_tokens,
        temperature=0.0,
    )
    text = ""
    async with MLXEngine(model_dir, model_id=MODEL) as engine, engine.generate(request) as gen:
        async for item in gen:
            if not isinstance(item, Final):
                text += item.text
    return text


@asynccontextmanager
async def keyed_shim(model_dir: Path, home: Path) -> AsyncIterator[tuple[ShimNode, str]]:
    """Three serving peers and a shim on 127.0.0.1 that requires a key and knows `gpt-3`."""
    keys = ApiKeys.in_home(home)
    key = keys.add("app")
    async with network(model_dir, shim=False) as net:
        shim = ShimNode(
            ShimSettings(
                port=0,
                bootstrap=[str(net.bootstrap.listen_addrs[0])],
                allow_dev=True,
                keys=keys,
                aliases={"gpt-3": MODEL},
            )
        )
        await net.nursery.start(shim.run)
        yield shim, key


async def test_anthropic_sdk_through_real_peers(e2e_model: Path, tmp_path: Path) -> None:
    expected = await local_greedy(e2e_model, 24)
    async with keyed_shim(e2e_model, tmp_path) as (shim, key):
        client = anthropic.Anthropic(base_url=shim.url, api_key=key, max_retries=0)
        messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": PROMPT}]

        def blocking() -> tuple[Message, list[str], Message]:
            whole = client.messages.create(
                model=MODEL, system=SYSTEM, messages=messages, max_tokens=24, extra_body=GREEDY
            )
            with client.messages.stream(
                model=MODEL, system=SYSTEM, messages=messages, max_tokens=24, extra_body=GREEDY
            ) as stream:
                return whole, list(stream.text_stream), stream.get_final_message()

        whole, texts, streamed = await in_thread(blocking)
        for message in (whole, streamed):
            assert message.content[0].type == "text" and message.content[0].text == expected
            assert message.stop_reason == "max_tokens"
            assert message.usage.output_tokens == 24 and message.usage.input_tokens > 0
        assert "".join(texts) == expected
        async with anthropic.AsyncAnthropic(base_url=shim.url, api_key=key, max_retries=0) as aio:
            answer = await aio.messages.create(
                model="gpt-3", system=SYSTEM, messages=messages, max_tokens=24, extra_body=GREEDY
            )
            assert answer.model == "gpt-3"
            assert answer.content[0].type == "text" and answer.content[0].text == expected
        wrong = anthropic.AsyncAnthropic(base_url=shim.url, api_key="dbk-no", max_retries=0)
        async with wrong:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await wrong.messages.create(model=MODEL, messages=messages, max_tokens=2)
        assert refused.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "incorrect API key"},
        }
        client.close()


async def test_drop_in_model_name_example(e2e_model: Path, tmp_path: Path) -> None:
    async with keyed_shim(e2e_model, tmp_path) as (shim, key):
        URL, KEY = shim.url, key  # the names the example uses

        def example() -> str:
            text: str = requests.post(
                URL + "/v1/completions",
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                json={
                    "model": "gpt-3",
                    "prompt": "Explain how decentralized AI inference improves privacy.",
                    "max_tokens": 128,
                },
            ).json()["choices"][0]["text"]
            return text

        assert isinstance(await in_thread(example), str)

        def listed() -> tuple[int, list[dict[str, Any]]]:
            refused = requests.get(URL + "/v1/models")
            models = requests.get(URL + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            return refused.status_code, models.json()["data"]

        refused, models = await in_thread(listed)
        assert refused == 401
        aliases = [(m["id"], m["dbloom"].get("alias_of")) for m in models]
        assert aliases == [(MODEL, None), ("gpt-3", MODEL)]
