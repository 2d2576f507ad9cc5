"""A peer keeps the speed it advertises current: self-benchmarks repeat while it is idle,
the record shows the best recent one, and none runs while a request is being served.

Real peers, a real shim and the `openai` client on loopback, on a generated model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from pathlib import Path

import trio
from node_helpers import MODEL, eventually, loopback

from dbloom.cli._node import SPEED_SAMPLES
from dbloom.inference import Speed

LOW = Speed(prefill_tps=1.0, decode_tps=1.0)


async def test_a_slow_first_benchmark_is_outgrown_and_published(node_model: Path) -> None:
    async with loopback() as net:
        node = await net.start_peer(node_model, speed_refresh=0.5)
        measured = node.speeds[MODEL]
        assert measured.decode_tps > LOW.decode_tps and measured.prefill_tps > 0
        # As if the start had been measured while the Mac was busy with something else.
        node._speed_samples[MODEL] = deque([LOW], maxlen=SPEED_SAMPLES)
        node.speeds[MODEL] = LOW
        node.offers = tuple(replace(o, decode_tps=1.0, prefill_tps=1.0) for o in node.offers)
        await eventually(lambda: node.speeds[MODEL].decode_tps > LOW.decode_tps, timeout=20)
        assert node._speed_samples[MODEL][0] is LOW  # still in the window: the best one counts

        async def published() -> float:
            record = await net.published_record(node)
            assert record is not None
            offer = record.offer(MODEL)
            assert offer is not None
            return offer.decode_tps

        with trio.fail_after(20):
            while await published() <= LOW.decode_tps:
                await trio.sleep(0.1)


async def test_no_benchmark_runs_while_a_request_is_served(node_model: Path) -> None:
    async with loopback() as net:
        node = await net.start_peer(node_model, speed_refresh=0.2)
        assert node.pool is not None
        pool = node.pool
        client = net.client()
        stream = await client.completions.create(
            model=MODEL, prompt="hello", max_tokens=200, temperature=0, stream=True
        )
        served = None
        chunks = 0
        async for _ in stream:
            if pool.in_flight:  # the last chunks may still be read after the node is done
                served = served or node._speed_samples[MODEL][-1]
                assert node._speed_samples[MODEL][-1] is served  # no benchmark added one
                chunks += 1
        await client.close()
        assert chunks > 20
        last = node._speed_samples[MODEL][-1]
        await eventually(lambda: node._speed_samples[MODEL][-1] is not last, timeout=20)
