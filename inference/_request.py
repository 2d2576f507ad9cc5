"""The typed, self-validating generation request.

A `GenerateRequest` is built from untrusted input (the wire decoder, the HTTP shim), so it
checks every field's type and range in `__post_init__` and raises `InvalidRequest` naming
the field. Checks that need the model (context length, vocabulary) happen in the engine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import InvalidRequest

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_TOKENS_LIMIT = 1 << 17
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 4096
MAX_ID_LENGTH = 128
ACCOUNT_KEY_SIZE = 32
SALT_SIZE = 16
MAX_SEED = (1 << 63) - 1
MAX_TOKEN_ID = (1 << 31) - 1
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_TOOL_NAME = 64
MAX_DESCRIPTION = 8192
MAX_SCHEMA = 128 << 10
MAX_ARGUMENTS = 256 << 10
TOOL_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TOOL_NAME}}}")
"""OpenAI's rule for function names; chat templates and parsers can rely on it."""
TOOL_CHOICES = frozenset({"auto", "none", "required"})
FORMAT_KINDS = frozenset({"json_object", "json_schema"})
EMPTY_PARAMETERS = '{"type":"object","properties":{}}'


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:
        raise InvalidRequest(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_float(
    name: str, value: object, low: float, high: float, *, open_low: bool = False
) -> float:
    if type(value) not in (int, float):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise InvalidRequest(f"{name} is out of range") from None
    too_low = number <= low if open_low else number < low
    if not math.isfinite(number) or too_low or number > high:
        bracket = "(" if open_low else "["
        raise InvalidRequest(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return number


def _check_str(name: str, value: object, *, min_len: int = 0, max_len: int | None = None) -> str:
    if type(value) is not str:
        raise InvalidRequest(f"{name} must be a string, got {type(value).__name__}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise InvalidRequest(f"{name} must be {min_len}..{max_len} characters long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} is not valid Unicode (a lone surrogate)") from None
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_json_object(name: str, value: object, max_len: int) -> dict[str, Any]:
    """JSON text that must hold an object (a schema); NaN and Infinity are not JSON."""
    text = _check_str(name, value, min_len=2, max_len=max_len)
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest(f"{name} is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"{name} must be a JSON object")
    return parsed


def _check_tool_name(name: str, value: object) -> str:
    text = _check_str(name, value)
    if TOOL_NAME.fullmatch(text) is None:
        raise InvalidRequest(
            f"{name} must be 1..{MAX_TOOL_NAME} letters, digits, underscores or dashes"
        )
    return text


def _check_tuple(name: str, value: object, kind: type, limit: int) -> tuple[Any, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, kind) for v in value):
        raise InvalidRequest(f"{name} must be a sequence of {kind.__name__}")
    if len(value) > limit:
        raise InvalidRequest(f"{name} may hold at most {limit} entries")
    return tuple(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    """A function the model may call: its name, what it does, and a JSON Schema (as JSON
    text, so the request stays immutable) for its arguments."""

    name: str
    description: str = ""
    parameters: str = EMPTY_PARAMETERS

    def __post_init__(self) -> None:
        _check_tool_name("tool name", self.name)
        _check_str("tool description", self.description, max_len=MAX_DESCRIPTION)
        _check_json_object("tool parameters", self.parameters, MAX_SCHEMA)

    def template_entry(self) -> dict[str, Any]:
        """The tool as chat templates expect it: OpenAI's `{"type": "function", ...}`."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = json.loads(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """A call the assistant made in an earlier turn, replayed so the template can show it.

    `arguments` is JSON text as the model wrote it (OpenAI passes it as a string).
    """

    id: str
    name: str
    arguments: str = "{}"

    def __post_init__(self) -> None:
        _check_str("tool call id", self.id, min_len=1, max_len=MAX_ID_LENGTH)
        _check_tool_name("tool call name", self.name)
        _check_str("tool call arguments", self.arguments, max_len=MAX_ARGUMENTS)

    def template_entry(self) -> dict[str, Any]:
        """The call as chat templates expect it; arguments that are a JSON object are given
        parsed, since templates render them with `tojson`."""
        try:
            arguments: Any = json.loads(self.arguments, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            arguments = self.arguments
        if not isinstance(arguments, dict):
            arguments = self.arguments
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseFormat:
    """Structured output: any JSON object (`json_object`), or JSON valid against `schema`
    (`json_schema`, the schema as JSON text). The node enforces it while decoding."""

    kind: str
    schema: str | None = None

    def __post_init__(self) -> None:
        _check_str("response format", self.kind)
        if self.kind not in FORMAT_KINDS:
            raise InvalidRequest(f"response format must be one of {sorted(FORMAT_KINDS)}")
        if (self.kind == "json_schema") != (self.schema is not None):
            raise InvalidRequest("a json_schema response format needs a schema, and only it")
        if self.schema is not None:
            _check_json_object("response format schema", self.schema, MAX_SCHEMA)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One turn of a chat; the model's chat template turns these into a prompt.

    An assistant turn may carry the `tool_calls` it made; a `tool` turn answers one of
    them and names it with `tool_call_id`.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        _check_str("role", self.role)
        if self.role not in ROLES:
            raise InvalidRequest(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        _check_str("content", self.content)
        calls = _check_tuple("tool_calls", self.tool_calls, ToolCall, MAX_TOOL_CALLS)
        object.__setattr__(self, "tool_calls", calls)
        if calls and self.role != "assistant":
            raise InvalidRequest("only assistant messages carry tool_calls")
        if self.tool_call_id is not None:
            if self.role != "tool":
                raise InvalidRequest("only tool messages carry a tool_call_id")
            _check_str("tool_call_id", self.tool_call_id, min_len=1, max_len=MAX_ID_LENGTH)

    def template_entry(self) -> dict[str, Any]:
        """The message as chat templates expect it (OpenAI's shape)."""
        entry: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            entry["tool_calls"] = [call.template_entry() for call in self.tool_calls]
        if self.tool_call_id is not None:
            entry["tool_call_id"] = self.tool_call_id
        return entry


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateRequest:
    """What to generate and how to sample it; exactly one of `prompt` and `messages`.

    Defaults follow the OpenAI API (temperature 1, top_p 1, no penalties). `logit_bias`
    may be given as a mapping and is stored as sorted `(token_id, bias)` pairs so the
    request stays immutable and hashable. `request_id` is set by the client when it
    wants to name the request (receipts quote it); the engine assigns one otherwise.
    `account` is the client's 32-byte Ed25519 account key, named in the node's receipt;
    `salt` keys the receipt's digest of the tokens so that only the two parties can check it.

    `tools` are passed to the chat template; `tool_choice` is `auto` (the model decides),
    `none` (no tools are offered) or `required` (decoding is constrained to tool calls, to
    `tool_name` alone when it is set); `parallel_tool_calls` false allows one call.
    `response_format` constrains decoding to JSON.
    """

    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    logprobs: bool = False
    top_logprobs: int = 0
    request_id: str | None = None
    account: bytes | None = None
    salt: bytes | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        _check_str("model", self.model, min_len=1, max_len=256)
        self._validate_input()
        _check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT)
        self._set("temperature", _check_float("temperature", self.temperature, 0.0, 2.0))
        self._set("top_p", _check_float("top_p", self.top_p, 0.0, 1.0, open_low=True))
        _check_int("top_k", self.top_k, 0, MAX_TOKEN_ID)
        self._set("min_p", _check_float("min_p", self.min_p, 0.0, 1.0))
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        self._validate_stop()
        for name in ("presence_penalty", "frequency_penalty"):
            self._set(name, _check_float(name, getattr(self, name), -2.0, 2.0))
        self._set(
            "repetition_penalty",
            _check_float("repetition_penalty", self.repetition_penalty, 0.0, 10.0, open_low=True),
        )
        self._validate_logit_bias()
        if type(self.logprobs) is not bool:
            raise InvalidRequest("logprobs must be a boolean")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=True")
        if self.request_id is not None:
            _check_str("request_id", self.request_id, min_len=1, max_len=MAX_ID_LENGTH)
        if self.account is not None and (
            not isinstance(self.account, bytes) or len(self.account) != ACCOUNT_KEY_SIZE
        ):
            raise InvalidRequest(f"account must be a {ACCOUNT_KEY_SIZE}-byte public key")
        if self.salt is not None and (
            not isinstance(self.salt, bytes) or len(self.salt) != SALT_SIZE
        ):
            raise InvalidRequest(f"salt must be {SALT_SIZE} bytes")
        self._validate_tools()
        if self.response_format is not None and not isinstance(
            self.response_format, ResponseFormat
        ):
            raise InvalidRequest("response_format must be a ResponseFormat")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _validate_input(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of prompt and messages")
        if self.prompt is not None:
            _check_str("prompt", self.prompt, min_len=1)
            return
        if not isinstance(self.messages, tuple | list):
            raise InvalidRequest("messages must be a sequence of ChatMessage")
        messages = tuple(self.messages)
        if not 1 <= len(messages) <= MAX_MESSAGES:
            raise InvalidRequest(f"messages must hold 1..{MAX_MESSAGES} entries")
        if not all(isinstance(m, ChatMessage) for m in messages):
            raise InvalidRequest("messages must be a sequence of ChatMessage")
        self._set("messages", messages)

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple | list):
            raise InvalidRequest("stop must be a sequence of strings")
        stop = tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings")
        for s in stop:
            _check_str("stop string", s, min_len=1, max_len=MAX_STOP_LENGTH)
        self._set("stop", stop)

    def _validate_logit_bias(self) -> None:
        bias: object = self.logit_bias
        if isinstance(bias, Mapping):
            bias = tuple(bias.items())
        if not isinstance(bias, tuple | list):
            raise InvalidRequest("logit_bias must map token ids to numbers")
        pairs: dict[int, float] = {}
        for item in bias:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise InvalidRequest("logit_bias must map token ids to numbers")
            token = _check_int("logit_bias token id", item[0], 0, MAX_TOKEN_ID)
            pairs[token] = _check_float("logit_bias value", item[1], -100.0, 100.0)
        if len(pairs) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
        self._set("logit_bias", tuple(sorted(pairs.items())))

    def _validate_tools(self) -> None:
        tools = _check_tuple("tools", self.tools, Tool, MAX_TOOLS)
        self._set("tools", tools)
        names = {tool.name for tool in tools}
        if len(names) != len(tools):
            raise InvalidRequest("tool names must be unique")
        if tools and self.messages is None:
            raise InvalidRequest("tools need messages: only a chat template can offer them")
        _check_str("tool_choice", self.tool_choice)
        if self.tool_choice not in TOOL_CHOICES:
            raise InvalidRequest(f"tool_choice must be one of {sorted(TOOL_CHOICES)}")
        if self.tool_choice == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs tools")
        if self.tool_name is not None:
            _check_tool_name("tool_name", self.tool_name)
            if self.tool_choice != "required" or self.tool_name not in names:
                raise InvalidRequest("tool_name must name one of the tools, with 'required'")
        if type(self.parallel_tool_calls) is not bool:
            raise InvalidRequest("parallel_tool_calls must be a boolean")

    @property
    def offers_tools(self) -> bool:
        """Tools are passed to the template and calls are parsed from the output."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax decoding: seeds and top-p/k/min-p do not apply."""
        return self.temperature == 0.0
