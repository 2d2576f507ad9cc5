"""The engine interface the node handler, the shim and the simulator program against.

An engine serves one or more models and runs many generations at once. It refuses work it
cannot start soon (`EngineBusy`) instead of queueing without bound, and it reports its
load so nodes can advertise it and clients can pick the least loaded peer.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from ._events import Chunk, Final
from ._request import GenerateRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What a node says about a model it serves; `digest` pins the exact weights."""

    id: str
    digest: str
    context_length: int
    vocab_size: int
    parameters: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineLoad:
    """A snapshot of capacity and load: running requests, queued ones and the limits."""

    active: int
    queued: int
    max_batch: int
    max_queue: int

    @property
    def free(self) -> int:
        """How many more requests would be accepted right now."""
        return max(0, self.max_batch + self.max_queue - self.active - self.queued)

    @property
    def utilisation(self) -> float:
        """Fraction of batch slots in use, for ranking nodes."""
        return self.active / self.max_batch if self.max_batch else 1.0


class Generation(AsyncIterator[Chunk | Final], abc.ABC):
    """One request's stream: zero or more `Chunk`s, then exactly one `Final`.

    Use it as `async with engine.generate(req) as gen: async for item in gen: ...`.
    Entering admits the request (raising `EngineBusy`, `UnknownModel`, `InvalidRequest`);
    plain `async for` admits on the first step. Iteration raises an `EngineError` if the
    generation fails. Leaving the block, `aclose()`, or a cancelled read frees the batch
    slot within one decode step.
    """

    node: str | None = None
    """Who is generating: a remote node's peer id, or None for a local engine."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    @abc.abstractmethod
    async def start(self) -> None:
        """Admit the request; idempotent. Raises an `EngineError` if it is refused."""

    @abc.abstractmethod
    async def __anext__(self) -> Chunk | Final:
        """The next chunk, or the `Final`; `StopAsyncIteration` after the `Final`."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop generating; the next item is a `Final` with finish reason `cancelled`."""

    async def aclose(self) -> None:
        """Abandon the generation (nothing more is read) and free its slot."""
        self.cancel()


class Engine(abc.ABC):
    """Something that turns `GenerateRequest`s into token streams."""

    @abc.abstractmethod
    async def models(self) -> tuple[ModelInfo, ...]:
        """The models this engine serves."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest, *, client: str | None = None) -> Generation:
        """Start (lazily) one generation; see `Generation` for the protocol.

        `client` names who asks (a node passes the authenticated peer id), so that an
        engine with limited places can share them fairly; None is one anonymous client.
        """

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """Current capacity and load."""
