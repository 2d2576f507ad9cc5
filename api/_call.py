"""One OpenAI call in flight: the engine request, and how its answer is written back.

The relay drives the generation and stays the same for every endpoint; a `Call` decides
the wire format. The relay feeds every chunk to `add`; for a streaming call it also sends
`events(chunk)`, and it closes with `closing(final)` or `failure(error)`. A non-streaming
call answers with one `body(final)` built from everything added.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any

from dbloom.inference import Chunk, Final, GenerateRequest, ProtocolFailure

from ._errors import ApiError


@dataclass(slots=True)
class CalledTool:
    """A tool call assembled from its streamed pieces."""

    id: str
    name: str
    arguments: str = ""


class Call(abc.ABC):
    """The per-request state shared by every endpoint: text and token counts so far."""

    def __init__(self, request: GenerateRequest, *, stream: bool) -> None:
        if request.request_id is None:
            raise ValueError("a call's request needs the id its answer is named after")
        self.request = request
        self.request_id: str = request.request_id
        self.stream = stream
        self.created = int(time.time())
        self.completion_tokens = 0
        self.tool_calls: list[CalledTool] = []
        self._texts: list[str] = []

    @property
    def text(self) -> str:
        """Everything generated so far."""
        return "".join(self._texts)

    def add(self, chunk: Chunk) -> None:
        """Account for one chunk; subclasses also keep what their format needs.

        Tool calls are assembled piece by piece; a node that sends a piece for a call it
        never opened breaks the protocol.
        """
        self.completion_tokens += len(chunk.token_ids)
        self._texts.append(chunk.text)
        for piece in chunk.tool_calls:
            if piece.id and piece.index == len(self.tool_calls):
                self.tool_calls.append(CalledTool(piece.id, piece.name, piece.arguments))
            elif not piece.id and piece.index < len(self.tool_calls):
                self.tool_calls[piece.index].arguments += piece.arguments
            else:
                raise ProtocolFailure("the node sent a tool call piece out of order")

    def usage(self, final: Final | None) -> dict[str, int]:
        """Chat and completions usage; before the final only completion tokens are known."""
        prompt = final.prompt_tokens if final is not None else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    @abc.abstractmethod
    def opening(self) -> list[bytes]:
        """The events a stream starts with, sent with the first chunk."""

    @abc.abstractmethod
    def events(self, chunk: Chunk) -> list[bytes]:
        """The events for one chunk, already `add`ed."""

    @abc.abstractmethod
    def closing(self, final: Final) -> list[bytes]:
        """The events that end a successful stream."""

    @abc.abstractmethod
    def failure(self, error: ApiError) -> list[bytes]:
        """The events that end a stream which failed after it started."""

    @abc.abstractmethod
    def body(self, final: Final) -> dict[str, Any]:
        """The whole answer of a non-streaming call."""
