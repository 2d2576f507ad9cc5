"""What a generation yields: `Chunk`s of text and tokens, then one `Final`.

The same objects flow from the engine, through the `/dbloom/infer` wire format, to the
client, so a remote generation looks exactly like a local one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_ARGUMENTS_PIECE = 8192
"""Characters of argument text in one `ToolCallDelta`: even as 4-byte UTF-8, a piece fits a
chunk frame with room to spare, however long the whole call is."""


class FinishReason(StrEnum):
    """Why a generation ended."""

    STOP = "stop"
    """The model produced an end-of-sequence token or a stop string matched."""
    LENGTH = "length"
    """`max_tokens` tokens were generated."""
    CANCELLED = "cancelled"
    """The consumer gave up before the end."""
    TOOL_CALLS = "tool_calls"
    """The model ended its turn after calling one or more tools."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLogprob:
    """The log-probability of a sampled token and, on request, its strongest rivals.

    `text` and `top_text` are the tokens decoded alone, because an OpenAI client shows
    token strings and only the node has the tokenizer. `token_bytes` and `top_bytes` are
    their exact bytes: a token may hold part of a UTF-8 character, which its text can only
    show as U+FFFD. They are empty when the node cannot tell.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    text: str = ""
    top_text: tuple[str, ...] = ()
    token_bytes: bytes = b""
    top_bytes: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallDelta:
    """A piece of a tool call, shaped like one entry of OpenAI's streamed `delta.tool_calls`.

    The first piece of a call (by `index`, counted from 0 per generation) names it with
    `id` and `name` and empty `arguments`; the pieces after it carry only argument text,
    which joined is the call's JSON arguments. Streams can then pass pieces on unchanged,
    and long arguments never have to fit one frame.
    """

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One decode step's output for one request.

    `text` never contains a stop string, nor the start of one that may still complete:
    such text is held back until it is safe. `token_ids` are every sampled token (a
    stop string's tokens included, end-of-sequence tokens excluded), so `text` may be
    empty while tokens arrive. `logprobs`, when requested, has one entry per token.
    `tool_calls` are the pieces of tool calls the node has parsed out of the output; the
    text of a tool call never appears in `text`.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Final:
    """The last item of every successful generation: accounting and the reason it ended.

    `completion_tokens` counts the token ids delivered in chunks. `receipt` is empty
    until signed receipts exist; the node will fill it before sending.
    """

    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    receipt: bytes | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens, as billed."""
        return self.prompt_tokens + self.completion_tokens
