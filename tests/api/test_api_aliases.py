"""Drop-in model names: an alias is served by its model and answered under its own name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest
import trio
from shim_helpers import (
    MODEL_ID,
    ScriptedEngine,
    Shim,
    async_client,
    engine_output,
    start_shim,
)

from dbloom.api import AliasEngine, parse_aliases
from dbloom.inference import GenerateRequest, MLXEngine

ALIASES = {"gpt-3": MODEL_ID, "claude-3-5-haiku-latest": MODEL_ID, "gone": "not-served"}


@pytest.fixture
async def aliased(engine: MLXEngine) -> AsyncIterator[Shim]:
    async with trio.open_nursery() as nursery:
        yield await start_shim(nursery, engine, aliases=ALIASES)
        nursery.cancel_scope.cancel()


def test_parse_aliases() -> None:
    assert parse_aliases([]) == {}
    assert parse_aliases(["gpt-3=tiny", " gpt-4o = org/model:q4 ", "gpt-3=tiny"]) == {
        "gpt-3": "tiny",
        "gpt-4o": "org/model:q4",
    }


@pytest.mark.parametrize(
    ("specs", "words"),
    [
        (["gpt-3"], "is not NAME=MODEL"),
        (["=tiny"], "is not NAME=MODEL"),
        (["gpt-3="], "is not NAME=MODEL"),
        (["gpt 3=tiny"], "without spaces"),
        (["x" * 257 + "=tiny"], "1 to 256 characters"),
        (["tiny=tiny"], "names itself"),
        (["gpt-3=tiny", "gpt-3=small"], "'gpt-3' is given twice"),
        (["a=b", "b=tiny"], "'a' points to another alias, 'b'"),
    ],
)
def test_bad_aliases_are_refused_in_one_line(specs: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words) as refused:
        parse_aliases(specs)
    assert "\n" not in str(refused.value)


async def test_models_lists_aliases_of_served_models(aliased: Shim) -> None:
    async with async_client(aliased) as client:
        listed = await client.models.list()
        by_id = {model.id: model.model_dump() for model in listed.data}
        assert sorted(by_id) == sorted([MODEL_ID, "gpt-3", "claude-3-5-haiku-latest"])
        assert "alias_of" not in by_id[MODEL_ID]["dbloom"]
        alias = by_id["gpt-3"]
        assert alias["dbloom"] == {**by_id[MODEL_ID]["dbloom"], "alias_of": MODEL_ID}
        one = await client.models.retrieve("gpt-3")
        assert one.model_dump() == alias
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gone")


async def test_an_alias_is_served_by_its_model_under_its_own_name(aliased: Shim) -> None:
    request = GenerateRequest(model=MODEL_ID, prompt="Hello", max_tokens=12, temperature=0.0)
    expected, _ = await engine_output(aliased.engine, request)
    async with async_client(aliased) as client:
        completion = await client.completions.create(
            model="gpt-3", prompt="Hello", max_tokens=12, temperature=0
        )
        assert completion.model == "gpt-3" and completion.choices[0].text == expected
        chunks = [
            chunk
            async for chunk in await client.completions.create(
                model="gpt-3", prompt="Hello", max_tokens=12, temperature=0, stream=True
            )
        ]
        assert {chunk.model for chunk in chunks} == {"gpt-3"}
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        chat = await client.chat.completions.create(
            model="gpt-3", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert chat.model == "gpt-3"
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.completions.create(model="gpt-4", prompt="Hello", max_tokens=2)
        assert unknown.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gone", prompt="Hello", max_tokens=2)
    claude = anthropic.AsyncAnthropic(base_url=aliased.url, api_key="unused", max_retries=0)
    async with claude:
        message = await claude.messages.create(
            model="claude-3-5-haiku-latest",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
        )
    assert message.model == "claude-3-5-haiku-latest"


async def test_an_alias_shadows_a_model_of_the_same_name() -> None:
    engine = AliasEngine(ScriptedEngine(None), {MODEL_ID: "elsewhere"})
    assert await engine.models() == ()


async def test_a_notice_is_shown_with_every_model(engine: MLXEngine) -> None:
    notice = "served by a shim on a relay: its operator can read prompts and outputs"
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, engine, aliases={"gpt-3": MODEL_ID}, notice=notice)
        async with async_client(shim) as client:
            listed = await client.models.list()
            assert {m.model_dump()["dbloom"]["notice"] for m in listed.data} == {notice}
            one = await client.models.retrieve(MODEL_ID)
            assert one.model_dump()["dbloom"]["notice"] == notice
        nursery.cancel_scope.cancel()
