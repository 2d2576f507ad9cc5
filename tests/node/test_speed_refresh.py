"""A peer keeps the speed it advertises current: self-benchmarks repeat while it is idle,
the record shows the upper median of the last three, and a benchmark never counts while a
request shares the engine.

Real peers, a real shim and the `openai` client on loopback, on a generated model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from node_helpers import MODEL, Net, Sensor, eventually, loopback

from dbloom.cli import _node
from dbloom.cli._availability import Rules
from dbloom.cli._node import SPEED_SAMPLES, PeerNode
from dbloom.inference import Engine, Speed

LOW = Speed(prefill_tps=1.0, decode_tps=1.0)
HIGH = Speed(prefill_tps=1e6, decode_tps=1e6)


def pretend(node: PeerNode, speed: Speed) -> None:
    """As if the node's benchmarks so far had all measured `speed`."""
    node.speed_samples[MODEL] = deque([speed], maxlen=SPEED_SAMPLES)
    node.offers = tuple(
        replace(o, decode_tps=speed.decode_tps, prefill_tps=speed.prefill_tps) for o in node.offers
    )


async def stream_one(net: Net, max_tokens: int) -> int:
    client = net.client()
    stream = await client.completions.create(
        model=MODEL, prompt="hello", max_tokens=max_tokens, temperature=0, stream=True
    )
    chunks = 0
    async for _ in stream:
        chunks += 1
    await client.close()
    return chunks


async def test_the_advertised_speed_follows_recent_benchmarks(node_model: Path) -> None:
    async with loopback() as net:
        node = await net.start_peer(node_model, speed_refresh=0.3)
        assert node.speeds[MODEL].decode_tps > LOW.decode_tps  # measured at start

        # A start measured while the Mac was busy: the next benchmark outvotes it, and the
        # record in the DHT says so.
        pretend(node, LOW)
        changed_ms = time.time() * 1000
        await eventually(lambda: node.speeds[MODEL] != LOW, timeout=20)
        assert node.speeds[MODEL].decode_tps > LOW.decode_tps
        with trio.fail_after(20):
            while True:
                record = await net.published_record(node)
                assert record is not None
                offer = record.offer(MODEL)
                assert offer is not None
                if record.updated_ms > changed_ms and offer.decode_tps > LOW.decode_tps:
                    break
                await trio.sleep(0.1)

        # One sample far above the rest: it stays the upper median of two, not of three.
        pretend(node, HIGH)
        await eventually(lambda: len(node.speed_samples[MODEL]) == 2, timeout=20)
        assert node.speeds[MODEL] == HIGH
        await eventually(lambda: len(node.speed_samples[MODEL]) == 3, timeout=20)
        assert node.speeds[MODEL].decode_tps < HIGH.decode_tps


async def test_no_benchmark_runs_while_a_request_is_served(node_model: Path) -> None:
    async with loopback() as net:
        node = await net.start_peer(node_model, speed_refresh=0.2)
        assert node.pool is not None
        pool = node.pool
        client = net.client()
        stream = await client.completions.create(
            model=MODEL, prompt="hello", max_tokens=200, temperature=0, stream=True
        )
        served: Speed | None = None
        chunks = 0
        async for _ in stream:
            if pool.in_flight:  # the last chunks may still be read after the node is done
                if served is None:
                    served = node.speed_samples[MODEL][-1]
                assert node.speed_samples[MODEL][-1] is served  # no benchmark added one
                chunks += 1
        await client.close()
        assert chunks > 20
        last = node.speed_samples[MODEL][-1]
        await eventually(lambda: node.speed_samples[MODEL][-1] is not last, timeout=20)


async def test_a_benchmark_a_request_joined_is_dropped(
    node_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with loopback() as net:
        node = await net.start_peer(node_model, speed_refresh=0.2)
        assert node.pool is not None
        pool = node.pool
        real = _node.measure_speed
        began, joined, ended = trio.Event(), trio.Event(), trio.Event()

        async def measure_once_joined(engine: Engine, model_id: str, **kw: bool) -> Speed:
            """The real benchmark, started only once a request is in the engine."""
            if ended.is_set():
                return await real(engine, model_id, **kw)
            began.set()
            await joined.wait()
            try:
                return await real(engine, model_id, **kw)
            finally:
                ended.set()

        monkeypatch.setattr(_node, "measure_speed", measure_once_joined)
        with trio.fail_after(30):
            await began.wait()
            before = len(node.speed_samples[MODEL])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream_one, net, 100)
                while not pool.in_flight:
                    await trio.sleep(0.01)
                joined.set()
                await ended.wait()
                assert len(node.speed_samples[MODEL]) == before  # the shared sample was dropped
        await eventually(lambda: len(node.speed_samples[MODEL]) > before, timeout=20)


async def test_the_owner_returning_cancels_a_benchmark(
    node_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sensor = Sensor()  # away for long: the node serves
    async with loopback() as net:
        node = await net.start_peer(
            node_model, probes=sensor, rules=Rules(idle_minutes=5), speed_refresh=0.2
        )
        assert node.pool is not None
        engine = node.pool.engines[MODEL]
        real = _node.measure_speed
        began = trio.Event()
        cancelled: list[bool] = []

        async def long_benchmark(engine: Engine, model_id: str, **kw: bool) -> Speed:
            """The real benchmark, made long enough to be caught running."""
            began.set()
            try:
                return await real(engine, model_id, decode_tokens=1500, **kw)
            except trio.Cancelled:
                cancelled.append(True)
                raise

        monkeypatch.setattr(_node, "measure_speed", long_benchmark)
        before = len(node.speed_samples[MODEL])
        with trio.fail_after(20):
            await began.wait()
        await eventually(lambda: engine.load().active == 1, timeout=5)
        sensor.touch()  # the owner is back: the machine is theirs at once
        await eventually(lambda: bool(cancelled), timeout=2)
        await eventually(lambda: engine.load().active == 0, timeout=2)
        assert len(node.speed_samples[MODEL]) == before
