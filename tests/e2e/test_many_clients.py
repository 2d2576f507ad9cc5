"""Many streaming clients at once through one shim, served by real peers on loopback.

Every request must be answered: the listen backlog takes the burst of connections, the
requests share provider lookups instead of running one each, and the shim's live count
of its own requests spreads them over the peers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from network_helpers import MODEL, network

from dbloom.api._network import PROVIDERS_TTL

CLIENTS = 200


@pytest.mark.slow  # about 15 s of CPU: the SDK, the shim and MLX, 200 times over
async def test_two_hundred_concurrent_streaming_clients_all_succeed(e2e_model: Path) -> None:
    async with network(e2e_model, peers=3, max_batch=64, max_queue=128) as net:
        client = net.async_client()
        finished: list[str] = []
        nodes: dict[str, int] = {}

        async def one(i: int) -> None:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"{i}: many clients at once"}],
                max_tokens=2,
                temperature=0,
                stream=True,
            )
            node = raw.headers["x-dbloom-node"]
            nodes[node] = nodes.get(node, 0) + 1
            reasons = [c.finish_reason async for chunk in raw.parse() for c in chunk.choices]
            finished.append(str(reasons[-1]))

        began = trio.current_time()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(CLIENTS):
                    nursery.start_soon(one, i)
        took = trio.current_time() - began
        await client.close()
        assert len(finished) == CLIENTS and set(finished) <= {"length", "stop"}
        assert set(nodes) == {p.peer_id for p in net.peers}
        assert min(nodes.values()) >= 10
        assert net.shim is not None and net.shim.engine is not None
        assert net.shim.engine.lookups <= 2 + took / PROVIDERS_TTL  # not one per request
