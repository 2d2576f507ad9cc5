"""Timed callbacks beside trio tasks, on trio's `MockClock`.

A 10,000-peer hour is tens of millions of message hand-overs. As trio tasks each
would cost a scheduler round with cancel scopes and deadlines; as callbacks on one
heap each costs a push and a pop. The protocol traffic (Kademlia RPCs, gossip,
timers of peers' lives) runs here; the flows that read best as code (a client's
request with its fail-over) stay trio tasks sleeping in virtual time. The loop
advances the mock clock itself up to the next callback, but never past a trio
deadline, and yields whenever a callback made a task runnable, so both kinds of
work interleave in virtual-time order.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel
import trio.testing

JITTER = 1e-6
"""Seeded offset (seconds) added to every callback time: trio and the heap break ties
between equal times differently, and equal times are common (equal round trips)."""


class Scheduler:
    """A heap of (time, sequence, callback); `run` executes them in virtual-time order."""

    def __init__(self, clock: trio.testing.MockClock, rng: random.Random) -> None:
        self._clock = clock
        self._rng = rng
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._wake = trio.Event()
        self._now: float | None = None
        self.executed = 0

    def now(self) -> float:
        """Virtual time; inside a callback, its scheduled time (no clock read)."""
        return self._now if self._now is not None else trio.current_time()

    def jitter(self) -> float:
        return self._rng.random() * JITTER

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run `callback` at virtual time `when` (plus jitter)."""
        self._seq += 1
        when += self._rng.random() * JITTER
        heapq.heappush(self._heap, (when, self._seq, callback))
        if self._heap[0][1] == self._seq:
            self._wake.set()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.call_at(self.now() + max(0.0, delay), callback)

    async def run(self, until: float) -> None:
        """Execute callbacks until virtual time `until`, alongside trio's own tasks."""
        heap = self._heap
        runner = _runner()
        runq, deadlines = runner.runq, runner.deadlines
        jump = self._clock.jump
        while True:
            now = trio.current_time()
            if runq:
                await trio.lowlevel.checkpoint()
                continue
            next_trio = deadlines.next_deadline()
            # Run every callback due before trio's next deadline without a scheduler round,
            # stopping as soon as one of them makes a task runnable.
            while heap and heap[0][0] <= next_trio and heap[0][0] <= until and not runq:
                when, _, callback = heapq.heappop(heap)
                if when > now:
                    jump(when - now)
                    now = when
                self._now = when
                self.executed += 1
                try:
                    callback()
                finally:
                    self._now = None
            if runq:
                continue
            if now >= until and not (heap and heap[0][0] <= until):
                return
            target = min(heap[0][0] if heap else math.inf, until)
            with trio.move_on_at(target):
                await self._wake.wait()
            self._wake = trio.Event()


def _runner() -> Any:
    """Trio's run loop, for its run queue and deadline heap.

    `trio.lowlevel.current_statistics()` reads the same two things, but builds a
    record (and asks the I/O backend) on each call, which at millions of calls
    dominated the simulator's time.
    """
    from trio._core._run import GLOBAL_RUN_CONTEXT

    return GLOBAL_RUN_CONTEXT.runner
