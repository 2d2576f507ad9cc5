"""Helpers shared by the shim tests (a uniquely named module: tests/ is no package)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import openai
import trio

from dbloom.api import ApiKeys, create_app, serve_api
from dbloom.inference import (
    Chunk,
    Engine,
    EngineLoad,
    Final,
    FinishReason,
    GenerateRequest,
    Generation,
    ModelInfo,
)

MODEL_ID = "tiny"
T = TypeVar("T")


@dataclass(frozen=True)
class Shim:
    """A shim served on loopback for one test."""

    port: int
    engine: Engine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


async def start_shim(
    nursery: trio.Nursery, engine: Engine, *, keys: ApiKeys | None = None, **options: Any
) -> Shim:
    """Serve `create_app(engine)` on 127.0.0.1 with a free port."""
    app = create_app(engine, keys=keys, **options)
    port = await nursery.start(partial(serve_api, app, host="127.0.0.1", port=0, grace=1.0))
    return Shim(port=port, engine=engine)


def sync_client(shim: Shim, api_key: str = "unused", **options: Any) -> openai.OpenAI:
    """The blocking SDK client; call it inside `in_thread`. No retries: tests see each error."""
    return openai.OpenAI(base_url=shim.base_url, api_key=api_key, max_retries=0, **options)


def async_client(shim: Shim, api_key: str = "unused", **options: Any) -> openai.AsyncOpenAI:
    """The async SDK client (httpx on anyio, so it runs under trio)."""
    return openai.AsyncOpenAI(base_url=shim.base_url, api_key=api_key, max_retries=0, **options)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking client code in a trio worker thread while the server keeps serving."""
    return await trio.to_thread.run_sync(fn, *args)


async def engine_output(engine: Engine, request: GenerateRequest) -> tuple[str, Final]:
    """What the engine itself generates for `request`: the text and the final."""
    texts: list[str] = []
    async with engine.generate(request) as generation:
        async for item in generation:
            if isinstance(item, Final):
                return "".join(texts), item
            texts.append(item.text)
    raise AssertionError("no final")


async def wait_idle(engine: Engine, timeout: float = 2.0) -> None:
    """Wait until the engine has no running or queued request."""
    with trio.fail_after(timeout):
        while engine.load().active or engine.load().queued:
            await trio.sleep(0.01)


TINY_INFO = ModelInfo(
    id=MODEL_ID, digest="00" * 32, context_length=2048, vocab_size=630, parameters=1
)


class _ScriptedGeneration(Generation):
    """Yields the chunks it was given, then raises `error` (or ends with a final)."""

    def __init__(self, chunks: list[Chunk], error: Exception | None, refuse: bool) -> None:
        self._items: list[Chunk | Final] = list(chunks)
        if error is None:
            final = Final(
                request_id="scripted",
                finish_reason=FinishReason.STOP,
                prompt_tokens=3,
                completion_tokens=sum(len(c.token_ids) for c in chunks),
            )
            self._items.append(final)
        self._error = error
        self._refuse = refuse
        self.node = "12D3KooWScriptedNode"

    async def start(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._refuse and self._error is not None:
            raise self._error

    async def __anext__(self) -> Chunk | Final:
        await trio.lowlevel.checkpoint()
        if self._items:
            return self._items.pop(0)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self._items.clear()


class ScriptedEngine(Engine):
    """A test double for what only a network router produces: no node available,
    timeouts, and failures after the first token. It is never used where the real
    engine can produce the condition."""

    def __init__(
        self,
        error: Exception | None,
        *,
        chunks: list[Chunk] | None = None,
        refuse: bool = True,
    ) -> None:
        self._error = error
        self._chunks = chunks or []
        self._refuse = refuse

    async def models(self) -> tuple[ModelInfo, ...]:
        await trio.lowlevel.checkpoint()
        return (TINY_INFO,)

    def generate(self, request: GenerateRequest, *, client: str | None = None) -> Generation:
        return _ScriptedGeneration(self._chunks, self._error, self._refuse)

    def load(self) -> EngineLoad:
        return EngineLoad(active=0, queued=0, max_batch=1, max_queue=0)
