"""A peer withdraws when its owner comes back and returns when the Mac is idle again.

Real peers, a real shim and the `openai` client on loopback; the machine's state comes
from `Sensor` (the sensor, not the system under test). Time is trio's MockClock running
at real speed, jumped forward over the owner's absence and the policy's settle time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import openai
import pytest
import trio
from node_helpers import MODEL, Net, Sensor, eventually, loopback

from dbloom.cli._availability import Rules
from dbloom.cli._node import IDLE_POLL, MACHINE_POLL, PeerNode

RULES = Rules(idle_minutes=5, settle=30)


async def served_by(net: Net, prompt: str) -> str:
    client = net.client()
    raw = await client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0
    )
    await client.close()
    return raw.headers["x-dbloom-node"]


async def test_owner_returning_withdraws_in_a_second_and_idle_brings_it_back(
    node_model: Path, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    sensor = Sensor()
    async with loopback() as net:
        owned = await net.start_peer(
            node_model, probes=sensor, rules=RULES, price_out=1, drain_timeout=10
        )
        other = await net.start_peer(node_model, price_out=900_000)
        assert owned.status == "serving" and owned.decision.serve
        assert await served_by(net, "while the owner is away") == owned.peer_id

        # A request is streaming when the owner comes back: it finishes, nothing new starts.
        client = net.client()
        stream = await client.completions.create(
            model=MODEL, prompt="long", max_tokens=60, temperature=0, stream=True
        )
        first = await stream.__anext__()
        assert owned.pool is not None and owned.pool.in_flight == 1
        sensor.touch()
        returned = trio.current_time()
        await eventually(lambda: owned.pool is not None and owned.pool.draining, timeout=1.0)
        assert IDLE_POLL <= 0.5 and trio.current_time() - returned < 1.0  # polled at >= 2 Hz
        assert not owned.decision.serve
        assert owned.decision.reasons[0].startswith("owner active")
        chunks = [first, *[chunk async for chunk in stream]]
        assert chunks[-1].choices[0].finish_reason == "length"  # it ran to its end
        await client.close()
        await eventually(lambda: owned.status == "paused", timeout=5)
        record = await net.published_record(owned)
        assert record is not None and record.draining
        before = owned.pool.requests_total
        for i in range(3):
            assert await served_by(net, f"while the owner works {i}") == other.peer_id
        assert owned.pool.requests_total == before

        # The owner leaves: five idle minutes, then conditions must hold for `settle`.
        mock_clock.jump(5 * 60)
        await eventually(lambda: "steady" in {c.name for c in owned.decision.checks}, 2)
        assert owned.status == "paused"
        mock_clock.jump(RULES.settle)
        await eventually(lambda: owned.status == "serving", timeout=5)
        assert not owned.pool.draining
        record = await net.published_record(owned)
        assert record is not None and not record.draining
        mock_clock.jump(16)  # the shim's cached copy of the draining record expires
        assert await served_by(net, "away again") == owned.peer_id


async def test_requests_outlasting_the_deadline_are_handed_back(
    node_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbloom.cli._node")
    sensor = Sensor()
    async with loopback() as net:
        owned: PeerNode = await net.start_peer(
            node_model, probes=sensor, rules=RULES, drain_timeout=0.5
        )
        client = net.client()
        stream = await client.completions.create(
            model=MODEL, prompt="go on", max_tokens=1500, temperature=0, stream=True
        )
        received = [(await stream.__anext__()).choices[0].text]
        sensor.touch()
        returned = trio.current_time()
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received.append(chunk.choices[0].text)
        assert trio.current_time() - returned < 0.5 + 2
        assert len(received) < 1500
        await eventually(lambda: owned.status == "paused", timeout=5)
        assert owned.pool is not None
        await eventually(lambda: owned.pool is not None and owned.pool.in_flight == 0, 5)
        assert "handing back 1 requests at the pause deadline" in caplog.text
        assert "pausing: owner active" in caplog.text
        await client.close()


async def test_a_peer_paused_at_start_announces_nothing_until_conditions_hold(
    node_model: Path, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    sensor = Sensor()
    sensor.on_ac = False
    async with loopback() as net:
        owned = await net.start_peer(node_model, probes=sensor, rules=Rules(settle=0.5))
        assert owned.status == "paused" and owned.decision.reasons == ("on battery power",)
        record = await net.published_record(owned)
        assert record is not None and record.draining
        client = net.client()
        with pytest.raises(openai.APIError):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        sensor.on_ac = True
        mock_clock.jump(MACHINE_POLL)  # power is sampled every MACHINE_POLL seconds
        await eventually(lambda: owned.status == "serving", timeout=3)
        await client.close()
