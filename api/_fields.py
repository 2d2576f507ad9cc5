"""Reading untrusted OpenAI request bodies into a `GenerateRequest`.

Every mistake is a 400 that names the offending `param` (as `messages[2].content`), the
way OpenAI reports it, so a client can tell which of its fields to fix. Types are checked
here; ranges are checked by `GenerateRequest` itself, one field at a time so the error
still names the field. A JSON null counts as absent, and unknown fields are ignored,
as OpenAI does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from dbloom.inference import (
    ChatMessage,
    GenerateRequest,
    InvalidRequest,
    ResponseFormat,
    Tool,
    ToolCall,
    schema_problem,
)

from ._errors import ApiError, invalid

SAMPLING_NUMBERS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
SAMPLING_INTEGERS = ("top_k", "seed")
ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role; chat templates know only `system`."""

Settings = dict[str, tuple[str, Any]]
"""`GenerateRequest` field name -> (the param the client used, its value)."""
Features = dict[str, Any]
"""`GenerateRequest` fields already checked as a whole (tools, tool choice, format)."""


def _kind(value: object) -> str:
    match value:
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
    return "null"


class Fields:
    """Typed access to one JSON object of a request body; `path` prefixes param names."""

    def __init__(self, body: object, path: str = "") -> None:
        if not isinstance(body, dict):
            what = path or "the request body"
            raise invalid(f"{what} must be a JSON object, got {_kind(body)}", param=path or None)
        self._body: dict[str, Any] = body
        self._path = path

    def names(self) -> list[str]:
        """The fields present, in the order sent."""
        return list(self._body)

    def param(self, name: str) -> str:
        """The client-facing name of a field, e.g. `messages[0].content`."""
        return f"{self._path}.{name}" if self._path else name

    def raw(self, name: str) -> object:
        """The field as sent, None when absent or null."""
        return self._body.get(name)

    def _typed(self, name: str, kinds: tuple[type, ...], expected: str) -> Any:
        value = self._body.get(name)
        if value is None:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.wrong_type(name, expected)
        return value

    def wrong_type(self, name: str, expected: str) -> ApiError:
        """The 400 for a field of the wrong JSON type."""
        got = _kind(self._body.get(name))
        return invalid(
            f"{self.param(name)} must be {expected}, got {got}",
            param=self.param(name),
            code="invalid_type",
        )

    def string(self, name: str) -> str | None:
        """A string field."""
        value: str | None = self._typed(name, (str,), "a string")
        return value

    def required_string(self, name: str) -> str:
        """A string field that must be present."""
        value = self.string(name)
        if value is None:
            raise invalid(f"{self.param(name)} is required", param=self.param(name))
        return value

    def boolean(self, name: str) -> bool | None:
        """A boolean field."""
        value: bool | None = self._typed(name, (bool,), "a boolean")
        return value

    def integer(self, name: str) -> int | None:
        """An integer field (not a float, not a boolean)."""
        value: int | None = self._typed(name, (int,), "an integer")
        return value

    def number(self, name: str) -> float | None:
        """A numeric field (integers allowed, booleans not)."""
        value: float | None = self._typed(name, (int, float), "a number")
        return value

    def array(self, name: str) -> list[Any] | None:
        """An array field."""
        value: list[Any] | None = self._typed(name, (list,), "an array")
        return value

    def nested(self, name: str) -> Fields | None:
        """An object field, as its own `Fields`."""
        value = self._typed(name, (dict,), "an object")
        return None if value is None else Fields(value, self.param(name))


def text_content(fields: Fields, name: str, part_types: frozenset[str]) -> str | None:
    """A message's content: a string, or text parts joined by newlines.

    Parts of any other type (images, audio, files) are refused rather than dropped:
    a model that never saw the image would answer as if it had.
    """
    value = fields.raw(name)
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise fields.wrong_type(name, "a string or an array of content parts")
    texts = []
    for index, item in enumerate(value):
        part = Fields(item, f"{fields.param(name)}[{index}]")
        kind = part.required_string("type")
        if kind not in part_types:
            raise invalid(
                f"content parts of type {kind!r} are not supported; send text",
                param=part.param("type"),
                code="unsupported_content",
            )
        texts.append(part.required_string("text"))
    return "\n".join(texts)


def chat_message(
    fields: Fields,
    role: str,
    content: str,
    *,
    tool_calls: tuple[ToolCall, ...] = (),
    tool_call_id: str | None = None,
) -> ChatMessage:
    """One chat turn; the role must be one the chat templates know."""
    try:
        return ChatMessage(
            role=ROLE_ALIASES.get(role, role),
            content=content,
            tool_calls=tool_calls,
            tool_call_id=tool_call_id,
        )
    except InvalidRequest as exc:
        raise invalid(exc.message, param=fields.param("role")) from None


def tool_call(fields: Fields, call_id: str, name: str, arguments: str) -> ToolCall:
    """A tool call replayed from an earlier turn; errors name the call's param."""
    try:
        return ToolCall(id=call_id, name=name, arguments=arguments)
    except InvalidRequest as exc:
        raise invalid(exc.message, param=fields.param("name")) from None


def _json_text(fields: Fields, name: str) -> str | None:
    """An object field (a JSON Schema) as compact JSON text."""
    if fields.nested(name) is None:
        return None
    return json.dumps(fields.raw(name), separators=(",", ":"), ensure_ascii=False)


def _enforceable(schema: str, param: str) -> None:
    """Refuse a schema the node could not enforce, before any node is asked."""
    try:
        problem = schema_problem(schema)
    except ValueError as exc:
        problem = str(exc)
    if problem is not None:
        raise invalid(
            f"{param} cannot be enforced: {problem}", param=param, code="unsupported_schema"
        )


def function_tool(fields: Fields) -> Tool:
    """A function tool from the object holding `name`, `description` and `parameters`
    (`tools[i].function` in Chat Completions, `tools[i]` in the Responses API)."""
    name = fields.required_string("name")
    description = fields.string("description") or ""
    fields.boolean("strict")
    parameters = _json_text(fields, "parameters")
    try:
        tool = Tool(name=name, description=description, **_given("parameters", parameters))
    except InvalidRequest as exc:  # its message names the field: "tool parameters ..."
        field = next(
            (f for f in ("description", "parameters") if exc.message.startswith(f"tool {f}")),
            "name",
        )
        raise invalid(exc.message, param=fields.param(field)) from None
    _enforceable(tool.parameters, fields.param("parameters"))
    return tool


def _given(name: str, value: object) -> dict[str, Any]:
    return {} if value is None else {name: value}


def tool_features(
    fields: Fields,
    tools: tuple[Tool, ...],
    named: Callable[[Fields], str],
) -> Features:
    """`tools`, `tool_choice` and `parallel_tool_calls` as request fields.

    `tool_choice` is `none`, `auto`, `required` or an object naming one function, which
    `named` reads (its place differs between the two APIs).
    """
    features: Features = {"tools": tools}
    parallel = fields.boolean("parallel_tool_calls")
    if parallel is not None:
        features["parallel_tool_calls"] = parallel
    choice = fields.raw("tool_choice")
    if choice is None or (choice in ("none", "auto") and not tools):
        return features
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise invalid(
                "tool_choice must be none, auto, required or a function",
                param="tool_choice",
            )
        if not tools:
            raise invalid("tool_choice 'required' needs tools", param="tool_choice")
        return features | {"tool_choice": choice}
    name = named(Fields(choice, "tool_choice"))
    if name not in {tool.name for tool in tools}:
        raise invalid(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return features | {"tool_choice": "required", "tool_name": name}


def response_format(
    fields: Fields, kind: str, schema_holder: Fields | None
) -> ResponseFormat | None:
    """The structured-output setting of type `kind`; for `json_schema`, `schema_holder` is
    the object holding `name` and `schema` (they sit in different places in the two APIs).
    """
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(kind="json_object")
    if kind != "json_schema":
        raise invalid(
            f"response format type {kind!r} is not supported; use text, json_object or json_schema",
            param=fields.param("type"),
            code="unsupported_parameter",
        )
    if schema_holder is None:
        raise invalid(f"{fields.param('json_schema')} is required", fields.param("json_schema"))
    schema_holder.required_string("name")
    schema_holder.boolean("strict")
    schema = _json_text(schema_holder, "schema")
    if schema is None:
        return ResponseFormat(kind="json_object")
    try:
        result = ResponseFormat(kind="json_schema", schema=schema)
    except InvalidRequest as exc:
        raise invalid(exc.message, param=schema_holder.param("schema")) from None
    _enforceable(schema, schema_holder.param("schema"))
    return result


def reject_unsupported(fields: Fields, *names: str) -> None:
    """Refuse features we cannot honour (tools, `previous_response_id`…) instead of ignoring
    them: a client relying on one would silently get a different kind of answer."""
    for name in names:
        if fields.raw(name) not in (None, [], False):
            raise invalid(
                f"{fields.param(name)} is not supported by this server",
                param=fields.param(name),
                code="unsupported_parameter",
            )


def single_choice(fields: Fields) -> None:
    """Refuse `n` other than 1: the engine produces one answer per request."""
    n = fields.integer("n")
    if n is not None and n != 1:
        raise invalid("n must be 1: one choice per request is supported", param="n")


def sampling(fields: Fields, max_tokens_params: tuple[str, ...]) -> Settings:
    """The sampling settings all three endpoints accept, OpenAI's and the common extras.

    `max_tokens_params` lists the names of the length limit, preferred first (chat takes
    `max_completion_tokens` over the deprecated `max_tokens`).
    """
    settings: Settings = {}
    for param in max_tokens_params:
        limit = fields.integer(param)
        if limit is not None:
            settings["max_tokens"] = (param, limit)
            break
    for name in SAMPLING_NUMBERS:
        if (number := fields.number(name)) is not None:
            settings[name] = (name, number)
    for name in SAMPLING_INTEGERS:
        if (integer := fields.integer(name)) is not None:
            settings[name] = (name, integer)
    if (stop := _stop(fields)) is not None:
        settings["stop"] = ("stop", stop)
    if (bias := _logit_bias(fields)) is not None:
        settings["logit_bias"] = ("logit_bias", bias)
    return settings


def _stop(fields: Fields) -> tuple[str, ...] | None:
    value = fields.raw("stop")
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise fields.wrong_type("stop", "a string or an array of strings")


def _logit_bias(fields: Fields) -> dict[int, Any] | None:
    bias = fields.nested("logit_bias")
    if bias is None:
        return None
    out: dict[int, Any] = {}
    for key in bias.names():
        if not (key.isascii() and key.isdigit()):
            raise invalid(
                f"logit_bias keys must be token ids, got {key[:32]!r}", param="logit_bias"
            )
        value = bias.number(key)
        if value is None:
            raise bias.wrong_type(key, "a number")
        out[int(key)] = value
    return out


def build_request(
    *,
    model: str,
    request_id: str,
    settings: Settings,
    prompt: str | None = None,
    messages: tuple[ChatMessage, ...] | None = None,
    features: Features | None = None,
) -> GenerateRequest:
    """The engine request; a range error names the param the client used for it.

    `features` (tools, format) were checked field by field when they were read.
    """
    for name, (param, value) in {"model": ("model", model), **settings}.items():
        try:
            GenerateRequest(**{"model": "probe", "prompt": "probe", "logprobs": True, name: value})
        except InvalidRequest as exc:
            raise invalid(exc.message, param=param) from None
    values = {name: value for name, (_, value) in settings.items()} | (features or {})
    try:
        return GenerateRequest(
            model=model, prompt=prompt, messages=messages, request_id=request_id, **values
        )
    except InvalidRequest as exc:
        raise invalid(exc.message) from None


def function_tools(fields: Fields) -> Iterator[Fields]:
    """Each entry of `tools`; any type but `function` is refused (a node only runs functions)."""
    for index, item in enumerate(fields.array("tools") or []):
        tool = Fields(item, f"tools[{index}]")
        kind = tool.required_string("type")
        if kind != "function":
            raise invalid(
                f"tools of type {kind!r} are not supported; send functions",
                param=tool.param("type"),
                code="unsupported_parameter",
            )
        yield tool
