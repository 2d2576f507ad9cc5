"""`Turns`, the tokenizer gate: one holder at a time, clients served in turns."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from dbloom.inference._turns import Turns


async def test_one_holder_at_a_time_and_clients_take_turns() -> None:
    gate = Turns()
    order: list[str] = []
    holding = 0
    release = trio.Event()

    async def use(name: str, client: str, *, wait_for: trio.Event | None = None) -> None:
        nonlocal holding
        async with gate.turn(client):
            holding += 1
            assert holding == 1
            order.append(name)
            if wait_for is not None:
                await wait_for.wait()
            await trio.lowlevel.checkpoint()
            holding -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(use, "first", "flood", wait_for=release))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(4):  # the flood's prompts line up first...
            nursery.start_soon(use, f"flood {i}", "flood")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(use, "fair", "fair")  # ...and another client's arrives last
        await trio.testing.wait_all_tasks_blocked()
        assert gate.waiting == 5
        release.set()
    # The newcomer waits for one of the flood's, not all four; each client keeps its order.
    assert order == ["first", "fair", "flood 0", "flood 1", "flood 2", "flood 3"]
    assert gate.waiting == 0


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    gate = Turns()
    release = trio.Event()
    served: list[str] = []

    async def hold() -> None:
        async with gate.turn("a"):
            await release.wait()

    async def use(client: str) -> None:
        async with gate.turn(client):
            served.append(client)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await use("cancelled")
        nursery.start_soon(use, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert gate.waiting == 1
        release.set()
    assert served == ["b"]
    async with gate.turn("c"):  # free again
        served.append("c")
    assert served == ["b", "c"]
