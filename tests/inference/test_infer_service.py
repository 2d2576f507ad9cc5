"""`serve_infer` and `infer` over loopback TCP and in-memory streams."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from infer_helpers import MODEL_ID, infer_all, start_server, text_of, tokens_of

from dbloom.inference import (
    Chunk,
    Engine,
    EngineBusy,
    EngineFailure,
    EngineLoad,
    ErrorCode,
    Final,
    FinishReason,
    GenerateRequest,
    Generation,
    InferClient,
    InvalidRequest,
    MLXEngine,
    ModelInfo,
    ProtocolFailure,
    SlowConsumer,
    UnknownModel,
    infer,
    serve_infer,
)


def greedy(prompt: str, max_tokens: int = 24, **kwargs: Any) -> GenerateRequest:
    return GenerateRequest(
        model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kwargs
    )


async def remote(port: int, request: GenerateRequest) -> tuple[list[Chunk], Final]:
    return await infer_all(await trio.open_tcp_stream("127.0.0.1", port), request)


async def test_greedy_over_tcp_equals_mlx_generate(server_port: int, reference: Any) -> None:
    from mlx_lm import generate, stream_generate

    model, tokenizer = reference
    for prompt in ("Hello world", "Peers find each other"):
        chunks, final = await remote(server_port, greedy(prompt, 48, request_id="abc"))
        expected = list(stream_generate(model, tokenizer, prompt, max_tokens=48))
        ids = [r.token for r in expected]
        if expected[-1].finish_reason == "stop":
            ids.pop()
        assert tokens_of(chunks) == ids
        assert text_of(chunks) == generate(model, tokenizer, prompt, max_tokens=48)
        assert final.request_id == "abc"
        assert final.finish_reason.value == expected[-1].finish_reason
        assert final.completion_tokens == len(ids)


async def test_concurrent_streams_over_tcp(server_port: int, engine: MLXEngine) -> None:
    prompts = [f"request number {i}" for i in range(8)]
    sequential = [tokens_of((await remote(server_port, greedy(p)))[0]) for p in prompts]
    results: dict[int, list[int]] = {}

    async def one(i: int) -> None:
        results[i] = tokens_of((await remote(server_port, greedy(prompts[i])))[0])

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert [results[i] for i in range(8)] == sequential


async def test_remote_errors_are_typed(server_port: int) -> None:
    with pytest.raises(UnknownModel):
        await remote(server_port, GenerateRequest(model="nope", prompt="x"))
    with pytest.raises(InvalidRequest, match="context"):
        await remote(server_port, greedy("hi", 5000))


async def test_client_close_cancels_the_generation(server_port: int, engine: MLXEngine) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server_port)
    async with aclosing(infer(stream, greedy("a long one", 2000))) as items:
        async for item in items:
            assert isinstance(item, Chunk)
            break
    with trio.fail_after(2):
        while engine.load().active:
            await trio.sleep(0.01)
    _, final = await remote(server_port, greedy("after", 5))
    assert final.completion_tokens == 5


async def test_flood_over_tcp_gets_busy(tiny_model: Path) -> None:
    engine = MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=1)
    async with engine, trio.open_nursery() as nursery:
        port = await start_server(nursery, engine)
        started = trio.Event()
        outcomes: list[str] = []

        async def hold() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with aclosing(infer(stream, greedy("hold", 2000))) as items:
                async for _ in items:
                    started.set()

        async def flood() -> None:
            try:
                await remote(port, greedy("flood", 2))
                outcomes.append("ok")
            except EngineBusy:
                outcomes.append("busy")

        nursery.start_soon(hold)
        nursery.start_soon(hold)
        await started.wait()
        with trio.fail_after(5):
            while engine.load().free:
                await trio.sleep(0.01)
            async with trio.open_nursery() as inner:
                for _ in range(6):
                    inner.start_soon(flood)
        assert outcomes == ["busy"] * 6
        nursery.cancel_scope.cancel()


async def test_slow_reader_gets_cancelled_with_an_error(tiny_model: Path) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, chunk_buffer=4) as engine:
        client_end, server_end = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_infer, server_end, engine)
            client = InferClient()
            await client_end.send_all(client.send_request(greedy("slow", 1000)))
            with trio.fail_after(5):
                while engine.load().active == 0:
                    await trio.sleep(0.01)
                while engine.load().active:
                    await trio.sleep(0.01)
            with pytest.raises(SlowConsumer):
                async with aclosing(infer_after_request(client_end, client)) as items:
                    async for _ in items:
                        pass


async def infer_after_request(stream: trio.abc.Stream, client: InferClient) -> Any:
    """Read the rest of a response whose request was already sent."""
    from dbloom.inference import NEED_DATA, ErrorMessage, error_for_code

    while True:
        event = client.next_event()
        if event is NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, ErrorMessage):
            raise error_for_code(event.code, event.message)
        else:
            yield event


async def raw_exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if half_close:
            await stream.send_eof()
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                out += chunk
        return out


async def test_bad_frames_get_error_frames(server_port: int) -> None:
    from dbloom.inference import decode_payload

    reply = await raw_exchange(server_port, b"\x00\x00\x00\x02\x81\xa1")
    message = decode_payload(reply[4:])
    assert message.code is ErrorCode.PROTOCOL  # type: ignore[union-attr]
    reply = await raw_exchange(server_port, b"\xff\xff\xff\xff")
    assert b"exceeds" in reply
    reply = await raw_exchange(server_port, b"", half_close=True)
    assert reply == b""


async def test_garbage_after_request_cancels(server_port: int, engine: MLXEngine) -> None:
    request = InferClient().send_request(greedy("x", 2000))
    reply = await raw_exchange(server_port, request + b"junk")
    assert len(reply) < 4000
    with trio.fail_after(2):
        while engine.load().active:
            await trio.sleep(0.01)


async def test_silent_client_times_out(engine: MLXEngine) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_infer(server_end, engine, request_timeout=0.2))
            data = b""
            while chunk := await client_end.receive_some():
                data += chunk
    assert b"timeout" in data


async def test_infer_over_memory_streams_and_broken_node(engine: MLXEngine) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_infer, server_end, engine)
        items = [i async for i in infer(client_end, greedy("memory", 5))]
    assert isinstance(items[-1], Final) and items[-1].finish_reason is FinishReason.LENGTH
    client_end, server_end = trio.testing.memory_stream_pair()
    await server_end.aclose()
    with pytest.raises(ProtocolFailure):
        async with aclosing(infer(client_end, greedy("x"))) as it:
            async for _ in it:
                pass


class ScriptedEngine(Engine):
    """A fake engine that replays fixed items: serve_infer works with any Engine."""

    def __init__(self, items: list[Chunk | Final]) -> None:
        self.items = items

    async def models(self) -> tuple[ModelInfo, ...]:
        return ()

    def load(self) -> EngineLoad:
        return EngineLoad(active=0, queued=0, max_batch=1, max_queue=0)

    def generate(self, request: GenerateRequest, *, client: str | None = None) -> Generation:
        items = iter(self.items)

        class Replay(Generation):
            async def start(self) -> None:
                await trio.lowlevel.checkpoint()

            async def __anext__(self) -> Chunk | Final:
                await trio.lowlevel.checkpoint()
                try:
                    return next(items)
                except StopIteration:
                    raise StopAsyncIteration from None

            def cancel(self) -> None:
                """Nothing runs in the background."""

        return Replay()


async def test_any_engine_and_oversized_chunks() -> None:
    final = Final(
        request_id="r", finish_reason=FinishReason.STOP, prompt_tokens=1, completion_tokens=1
    )
    script = [Chunk(text="ok", token_ids=(1,)), final]
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_infer, server_end, ScriptedEngine(script))
        assert [i async for i in infer(client_end, greedy("x"))] == script
    huge = [Chunk(text="x" * 100_000, token_ids=(1,)), final]
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_infer, server_end, ScriptedEngine(huge))
        with pytest.raises(EngineFailure, match="frame"):
            async with aclosing(infer(client_end, greedy("x"))) as it:
                async for _ in it:
                    pass
