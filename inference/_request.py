"""The typed, self-validating generation request.

A `GenerateRequest` is built from untrusted input (the wire decoder, the HTTP shim), so it
checks every field's type and range in `__post_init__` and raises `InvalidRequest` naming
the field. Checks that need the model (context length, vocabulary) happen in the engine.
"""

from __future__ import annotations

import math
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
MAX_SEED = (1 << 63) - 1
MAX_TOKEN_ID = (1 << 31) - 1


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One turn of a chat; the model's chat template turns these into a prompt."""

    role: str
    content: str

    def __post_init__(self) -> None:
        _check_str("role", self.role)
        if self.role not in ROLES:
            raise InvalidRequest(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        _check_str("content", self.content)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateRequest:
    """What to generate and how to sample it; exactly one of `prompt` and `messages`.

    Defaults follow the OpenAI API (temperature 1, top_p 1, no penalties). `logit_bias`
    may be given as a mapping and is stored as sorted `(token_id, bias)` pairs so the
    request stays immutable and hashable. `request_id` is set by the client when it
    wants to name the request (receipts quote it); the engine assigns one otherwise.
    `account` is the client's 32-byte Ed25519 account key, named in the node's receipt.
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

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax decoding: seeds and top-p/k/min-p do not apply."""
        return self.temperature == 0.0
