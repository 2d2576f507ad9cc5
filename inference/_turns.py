"""Turns between clients: who was served longest ago, and the engine's tokenizer gate.

Tokenizing a long prompt holds the tokenizer for a while (a full context, a fraction of a
second). Taken in arrival order, a client that sends many such prompts at once makes
everyone else's wait behind all of them; taken in turns, another client waits for one.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

Client = str | None


class ServedOrder:
    """When each client was last served, so the one served longest ago can go first.

    Bounded: past `remember` clients the longest-served-ago one is forgotten, which
    only moves it to the front, where it stood anyway.
    """

    def __init__(self, *, remember: int) -> None:
        self._served = itertools.count()
        self._last: dict[Client, int] = {}
        self._remember = remember

    def last(self, client: Client) -> int:
        """A rank: lower was served longer ago; -1 for never (or forgotten)."""
        return self._last.get(client, -1)

    def note(self, client: Client) -> None:
        """`client` was served just now."""
        self._last.pop(client, None)
        self._last[client] = next(self._served)  # re-inserted: the dict runs oldest first
        if len(self._last) > self._remember:
            del self._last[next(iter(self._last))]


class Turns:
    """A lock whose waiters are served by client, least recently served client first.

    Within one client, first come first served. `turn(client)` is an async context
    manager; cancellation while waiting gives up the place in line.
    """

    def __init__(self, *, remember: int = 1024) -> None:
        self._held = False
        self._waiting: dict[Client, deque[trio.Event]] = {}
        self._order = ServedOrder(remember=remember)

    @property
    def waiting(self) -> int:
        """Callers in line (not counting the holder)."""
        return sum(len(line) for line in self._waiting.values())

    @asynccontextmanager
    async def turn(self, client: Client) -> AsyncIterator[None]:
        """Hold the gate for the body; waits for `client`'s turn if it is taken."""
        if self._held:
            ready = trio.Event()
            line = self._waiting.setdefault(client, deque())
            line.append(ready)
            try:
                await ready.wait()
            except BaseException:
                # Cancelled while parked, so not handed the turn (trio never cancels a
                # task it has already woken): just leave the line.
                line.remove(ready)
                if not line:
                    del self._waiting[client]
                raise
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._held = True  # taken before yielding, so nobody else can take it too
            await trio.lowlevel.cancel_shielded_checkpoint()
        self._order.note(client)
        try:
            yield
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        """Give the gate to the waiting client served longest ago (never served: first)."""
        if not self._waiting:
            self._held = False
            return
        client = min(self._waiting, key=self._order.last)
        line = self._waiting[client]
        ready = line.popleft()
        if not line:
            del self._waiting[client]
        ready.set()
