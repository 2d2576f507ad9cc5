"""Constrained decoding: JSON output and forced tool calls, enforced token by token.

A request's constraint (`response_format`, `tool_choice: required`) becomes a grammar,
compiled by llguidance into a matcher for the model's tokenizer. The matcher rides in the
request's own logits processor (`_sampling.GrammarProcessor`), so each request in a
continuous batch keeps its own parser state and requests without a constraint never pay
for one. At every step the processor feeds the matcher the token sampled last, asks for
the tokens that keep the output inside the grammar, and sets every other logit to -inf;
once the grammar is complete only end-of-sequence remains.

Why llguidance (measured on this machine with a 7-field nested schema, see the report in
`bench/structured.py`): it compiles a schema in under 1 ms and computes a mask in ~15 µs
(median) even for a 131k-token vocabulary, and the wheel has no dependencies. xgrammar's
masks are as fast but it compiles in 8–80 ms and pulls in torch; outlines-core builds an
index per schema and vocabulary, 120–580 ms per request. Its Lark front end also lets one
grammar say "a tool call in this model's own markers, with these arguments".
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from typing import Any, Final

import llguidance

from ._errors import InvalidRequest
from ._request import GenerateRequest, ResponseFormat, Tool
from ._tools import ToolSyntax

JSON_OBJECT_SCHEMA = '{"type":"object"}'
"""`json_object` mode: any JSON object."""
COMPACT = {"whitespace_flexible": False}
"""llguidance's JSON options: no whitespace between tokens (`{"a":1}`), as json.dumps with
compact separators writes it. A model free to add whitespace may add it forever."""


def _limits() -> llguidance.LLParserLimits:
    # Short errors: a verbose one repeats the whole grammar back to the client.
    return llguidance.LLParserLimits(verbose_errors=False)


def schema_problem(schema: str) -> str | None:
    """Why this JSON Schema (JSON text) cannot be enforced, or None if it can.

    No tokenizer is needed, so the shim can refuse a bad schema before choosing a node.
    """
    grammar = llguidance.LLMatcher.grammar_from_json_schema(_compact(json.loads(schema)))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, None, limits=_limits()
    )
    return messages[0] if is_error and messages else None


def _compact(schema: dict[str, Any]) -> str:
    """A schema for Lark's `%json`, with llguidance's options (they go in the schema)."""
    return json.dumps(schema | {"x-guidance": COMPACT}, separators=(",", ":"))


def _format_schema(response_format: ResponseFormat) -> str:
    schema = response_format.schema if response_format.schema is not None else JSON_OBJECT_SCHEMA
    parsed: dict[str, Any] = json.loads(schema)
    return _compact(parsed)


def _call_schema(tool: Tool) -> str:
    """A call to `tool` as the JSON a Qwen/Hermes-style model writes between its markers."""
    arguments = _rebase_refs(json.loads(tool.parameters), "#/properties/arguments")
    return _compact(
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
    )


_DATA_KEYWORDS: Final = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are JSON data, not schemas: a "$ref" inside them is a string."""


def _rebase_refs(schema: Any, base: str) -> Any:
    """`schema` with its local references (`#`, `#/$defs/X`, ...) pointing into `base`,
    where it is about to be nested: Pydantic-style parameters refer to their own
    `$defs`, which would otherwise be looked up at the root of the wrapping schema."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            node["$ref"] = base + ref[1:]
        stack.extend(value for key, value in node.items() if key not in _DATA_KEYWORDS)
    return schema


def _marker(text: str, token: int | None) -> str:
    """A Lark terminal for a call marker: the exact token when it is a single one (often a
    special token, which text could never produce), the literal text otherwise."""
    return f"<[{token}]>" if token is not None else json.dumps(text)


def request_grammar(
    request: GenerateRequest,
    syntax: ToolSyntax | None,
    marker_token: Callable[[str], int | None] = lambda _: None,
) -> str | None:
    """The Lark grammar (llguidance's dialect) that constrains this request, or None.

    `tool_choice: required` allows only calls (one when a tool is named or parallel calls
    are off); `response_format` allows only JSON, or either JSON or calls when the model
    may also call tools. Calls can be forced only in the JSON form; for other families a
    request that needs them is refused.
    """
    forced = request.tool_choice == "required"
    fmt = request.response_format
    if not forced and fmt is None:
        return None
    wants_calls = forced or request.offers_tools
    if wants_calls and (syntax is None or not syntax.json_calls):
        raise InvalidRequest(
            "this model writes tool calls in a form that cannot be enforced, so it supports "
            "neither tool_choice 'required' nor a response format alongside tools"
        )
    rules: list[str] = []
    if forced:
        rules.append("start: calls")
    elif wants_calls:
        rules.append("start: answer | calls")
    else:
        rules.append("start: answer")
    if fmt is not None and not forced:
        rules.append(f"answer: %json {_format_schema(fmt)}")
    if wants_calls:
        assert syntax is not None
        tools = [t for t in request.tools if request.tool_name in (None, t.name)]
        single = request.tool_name is not None or not request.parallel_tool_calls
        rules.append("calls: call" if single else 'calls: call ("\\n" call)*')
        start = _marker(syntax.start, marker_token(syntax.start))
        end = _marker(syntax.end, marker_token(syntax.end))
        rules.append(f'call: {start} "\\n" body "\\n" {end}')
        rules.append("body: " + " | ".join(f"tool{i}" for i in range(len(tools))))
        rules.extend(f"tool{i}: %json {_call_schema(t)}" for i, t in enumerate(tools))
    return "\n".join(rules) + "\n"


class Grammars:
    """One model's constraint compiler: its tokenizer as llguidance sees it (built on first
    use: about a second for a 150k vocabulary) and how it writes tool calls.

    The llguidance tokenizer also knows every token's exact bytes, which logprobs report.
    """

    def __init__(self, tokenizer: Any, syntax: ToolSyntax | None) -> None:
        self._tokenizer = tokenizer
        self._syntax = syntax
        self._eos = sorted(tokenizer.eos_token_ids)
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._unsupported: str | None = None

    def _ll(self) -> llguidance.LLTokenizer:
        if self._unsupported is not None:
            raise InvalidRequest(self._unsupported)
        if self._lltokenizer is None:
            try:
                backend = copy.copy(self._tokenizer.backend_tokenizer)
                backend.no_padding()
                backend.no_truncation()
                self._lltokenizer = llguidance.LLTokenizer(backend.to_str(), eos_token=self._eos)
            except Exception as exc:
                # Slow (non-`tokenizers`) tokenizers have no backend to hand over.
                self._unsupported = (
                    f"this model's tokenizer does not support constrained output: {exc}"
                )
                raise InvalidRequest(self._unsupported) from None
        return self._lltokenizer

    def prepare_bytes(self) -> None:
        """Build the tokenizer `token_bytes` needs, if it can be (call before decoding)."""
        with contextlib.suppress(InvalidRequest):
            self._ll()

    def token_bytes(self, token: int) -> bytes:
        """The token's exact bytes, or empty when this tokenizer cannot tell (or the
        tokenizer was not prepared: the decode loop never builds it)."""
        ll = self._lltokenizer
        if ll is None or not 0 <= token < ll.vocab_size:
            return b""
        return ll.decode_bytes([token])

    def _marker_token(self, text: str) -> int | None:
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    def matcher(self, request: GenerateRequest) -> llguidance.LLMatcher | None:
        """The request's matcher, fresh at the start of its grammar, or None when it has
        no constraint.

        Raises `InvalidRequest` with llguidance's reason when the grammar cannot be built
        (a schema feature it does not support, a grammar past its limits).
        """
        grammar = request_grammar(request, self._syntax, self._marker_token)
        if grammar is None:
            return None
        matcher = llguidance.LLMatcher(self._ll(), grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            raise InvalidRequest(f"the output constraint cannot be enforced: {matcher.get_error()}")
        return matcher
