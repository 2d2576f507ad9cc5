"""Tool calls in a model's output: finding them in the text stream and parsing them.

Each model family writes calls its own way; mlx-lm's tokenizer wrapper knows the markers
around a call (`<tool_call>`…`</tool_call>` for Qwen and Hermes) and the family's parser.
`ToolCallReader` watches the decoded text: text outside the markers is content, text
between them is one call (or, for some families, several), parsed when its end marker
arrives and handed on as `ToolCallDelta`s. A call that does not parse stays in the content,
so nothing the model wrote is lost. Pure and synchronous, so it is tested without a model.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._events import MAX_ARGUMENTS_PIECE, ToolCallDelta
from ._request import MAX_TOOL_CALLS, TOOL_NAME

Parser = Callable[[str, Any], Any]
"""mlx-lm's `parse_tool_call(text, tools)`: a dict (or list of dicts) of name and arguments."""


def new_call_id() -> str:
    """A fresh id in OpenAI's style (`call_` and 24 characters)."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolSyntax:
    """How one model family writes tool calls: the markers around a call and its parser.

    An empty `end` means a call runs to the end of the output (Mistral's `[TOOL_CALLS]`).
    `json_calls` is true when a call is `{"name": …, "arguments": {…}}` between the markers,
    the one form grammars can produce for `tool_choice: required`.
    """

    start: str
    end: str
    parser: Parser
    json_calls: bool

    @classmethod
    def of(cls, tokenizer: Any) -> ToolSyntax | None:
        """The syntax mlx-lm inferred for a loaded tokenizer, or None without tool calling."""
        if not getattr(tokenizer, "has_tool_calling", False) or tokenizer.tool_parser is None:
            return None
        from mlx_lm.tool_parsers import json_tools

        parser: Parser = tokenizer.tool_parser
        return cls(
            start=tokenizer.tool_call_start,
            end=tokenizer.tool_call_end or "",
            parser=parser,
            json_calls=parser is json_tools.parse_tool_call,
        )


def _pending_prefix(buf: str, marker: str) -> int:
    """Length of the longest suffix of `buf` that could begin `marker`."""
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


def _call(parsed: Any) -> tuple[str, str]:
    """A parsed call's name and JSON arguments; `ValueError` if it is not a usable call."""
    if not isinstance(parsed, dict):
        raise ValueError("a call must be a mapping")
    name = parsed.get("name")
    if not isinstance(name, str) or TOOL_NAME.fullmatch(name) is None:
        raise ValueError("a call needs a valid function name")
    arguments = parsed.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    return name, arguments


class ToolCallReader:
    """Feed decoded text; get back content safe to emit and the pieces of finished calls.

    `tools` are the request's tools in OpenAI's shape, which some parsers read to type
    argument values. `called` says whether any call was parsed (the finish reason is then
    `tool_calls`).
    """

    __slots__ = ("_buf", "_inside", "_make_id", "_next_index", "_syntax", "_tools")

    def __init__(
        self,
        syntax: ToolSyntax,
        tools: Sequence[Mapping[str, Any]],
        *,
        make_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._syntax = syntax
        self._tools = list(tools)
        self._make_id = make_id
        self._buf = ""
        self._inside = False
        self._next_index = 0

    @property
    def called(self) -> bool:
        """At least one call has been parsed."""
        return self._next_index > 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Content that cannot be part of a call, and the pieces of calls completed."""
        self._buf += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        start, end = self._syntax.start, self._syntax.end
        while True:
            if not self._inside:
                at = self._buf.find(start)
                if at < 0:
                    keep = _pending_prefix(self._buf, start)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._buf[:at])
                self._buf = self._buf[at + len(start) :]
                self._inside = True
            at = self._buf.find(end) if end else -1
            if at < 0:
                break
            body, self._buf = self._buf[:at], self._buf[at + len(end) :]
            self._inside = False
            content.append(self._parse(body, deltas))
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the output: what is held back, and a call left open (the whole
        rest, for families without an end marker; cut short by `max_tokens`, otherwise)."""
        held, self._buf = self._buf, ""
        deltas: list[ToolCallDelta] = []
        if not self._inside:
            return held, deltas
        self._inside = False
        return self._parse(held, deltas, closed=False), deltas

    def _parse(self, body: str, deltas: list[ToolCallDelta], *, closed: bool = True) -> str:
        """Append the pieces of the calls in `body`; returns the content to emit instead
        when it does not parse (the raw text, markers and all)."""
        raw = self._syntax.start + body + (self._syntax.end if closed else "")
        try:
            parsed = self._syntax.parser(body, self._tools)
            found = [_call(p) for p in (parsed if isinstance(parsed, list) else [parsed])]
        except Exception:
            # Parsers raise whatever their format's library raises; any failure means the
            # model wrote something that is not a call, which the client then sees as text.
            return raw
        if not found or self._next_index + len(found) > MAX_TOOL_CALLS:
            return raw
        for name, arguments in found:
            index = self._next_index
            self._next_index += 1
            deltas.append(ToolCallDelta(index=index, id=self._make_id(), name=name))
            deltas.extend(
                ToolCallDelta(index=index, arguments=arguments[at : at + MAX_ARGUMENTS_PIECE])
                for at in range(0, len(arguments), MAX_ARGUMENTS_PIECE)
            )
        return ""
