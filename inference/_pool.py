"""Several engines behind one `Engine`: one per model, metered, and able to drain.

A peer serves each of its models with its own engine; the `/dbloom/infer` handler sees
one `EnginePool`. The pool counts requests and tokens for the peer's status line, and
`drain()` makes it refuse new work (as busy, so shims fail over at once) while the
requests already running finish.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import trio

from ._engine import Engine, EngineLoad, Generation, ModelInfo
from ._errors import EngineBusy, EngineError, UnknownModel
from ._events import Chunk, Final
from ._request import GenerateRequest

RATE_WINDOW = 10.0


class _Refused(Generation):
    """A generation that fails on admission with a fixed error."""

    def __init__(self, error: EngineError) -> None:
        self._error = error

    async def start(self) -> None:
        raise self._error

    async def __anext__(self) -> Chunk | Final:
        raise self._error

    def cancel(self) -> None:
        pass


class _Metered(Generation):
    """Passes items through and tells the pool about admission, tokens and the end."""

    def __init__(self, inner: Generation, pool: EnginePool) -> None:
        self._inner = inner
        self._pool = pool
        self._started = False
        self._done = False

    async def start(self) -> None:
        if self._started:
            return
        await self._inner.start()
        self._started = True
        if self._pool.in_flight == 0:
            self._pool.idle = trio.Event()
        self._pool.in_flight += 1
        self._pool.requests_total += 1

    async def __anext__(self) -> Chunk | Final:
        await self.start()
        try:
            item = await self._inner.__anext__()
        except BaseException:
            self._finish()
            raise
        if isinstance(item, Chunk):
            self._pool.count_tokens(len(item.token_ids))
        else:
            self._finish()
        return item

    def _finish(self) -> None:
        if self._started and not self._done:
            self._done = True
            self._pool.in_flight -= 1
            if self._pool.in_flight == 0:
                self._pool.idle.set()

    def cancel(self) -> None:
        self._inner.cancel()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._finish()


class EnginePool(Engine):
    """Routes each request to the engine serving its model; see the module docstring."""

    def __init__(self, engines: Mapping[str, Engine]) -> None:
        self.engines = dict(engines)
        self.draining = False
        self.in_flight = 0
        self.requests_total = 0
        self.tokens_total = 0
        self.idle = trio.Event()
        self.idle.set()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    async def models(self) -> tuple[ModelInfo, ...]:
        found: list[ModelInfo] = []
        for engine in self.engines.values():
            found.extend(await engine.models())
        return tuple(found)

    def generate(self, request: GenerateRequest, *, client: str | None = None) -> Generation:
        if self.draining:
            return _Refused(EngineBusy("this node is shutting down"))
        engine = self.engines.get(request.model)
        if engine is None:
            return _Refused(UnknownModel(f"this node does not serve {request.model!r}"))
        return _Metered(engine.generate(request, client=client), self)

    def load(self) -> EngineLoad:
        loads = [e.load() for e in self.engines.values()]
        return EngineLoad(
            active=sum(x.active for x in loads),
            queued=sum(x.queued for x in loads),
            max_batch=sum(x.max_batch for x in loads),
            max_queue=sum(x.max_queue for x in loads),
        )

    def count_tokens(self, n: int) -> None:
        now = trio.current_time()
        self.tokens_total += n
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last few seconds."""
        now = trio.current_time()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW

    def drain(self) -> None:
        """Refuse new requests from now on; running ones continue."""
        self.draining = True

    def resume(self) -> None:
        """Accept new requests again after `drain()` (the owner left; the node serves again)."""
        self.draining = False

    async def wait_idle(self) -> None:
        """Return when no request is running."""
        while self.in_flight:
            await self.idle.wait()
