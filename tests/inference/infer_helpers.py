"""Helpers shared by the inference tests (a uniquely named module: tests/ is no package)."""

from __future__ import annotations

from contextlib import aclosing
from functools import partial

import trio

from dbloom.inference import (
    Chunk,
    Engine,
    Final,
    GenerateRequest,
    Generation,
    infer,
    serve_infer,
)

MODEL_ID = "tiny"


async def collect(generation: Generation) -> tuple[list[Chunk], Final]:
    """Read a whole generation; returns its chunks and its final."""
    chunks: list[Chunk] = []
    async with generation:
        async for item in generation:
            if isinstance(item, Final):
                return chunks, item
            chunks.append(item)
    raise AssertionError("generation ended without a Final")


def tokens_of(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


async def infer_all(
    stream: trio.abc.HalfCloseableStream, request: GenerateRequest
) -> tuple[list[Chunk], Final]:
    """Send `request` over `stream` and read the whole answer."""
    chunks: list[Chunk] = []
    async with aclosing(infer(stream, request)) as items:
        async for item in items:
            if isinstance(item, Final):
                return chunks, item
            chunks.append(item)
    raise AssertionError("the node sent no Final")


async def start_server(nursery: trio.Nursery, engine: Engine) -> int:
    """Serve `/dbloom/infer` with `engine` on a loopback TCP port; returns the port."""

    async def handler(stream: trio.SocketStream) -> None:
        await serve_infer(stream, engine)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(partial(trio.serve_listeners, handler, listeners))
    port: int = listeners[0].socket.getsockname()[1]
    return port
