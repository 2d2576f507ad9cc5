"""Typed errors of the inference layer.

Every refusal an engine can give has its own class and a stable wire `code`, so the node
handler can send it as an Error frame and the client can raise the same class again: a
shim fails over on `EngineBusy` without parsing messages.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable codes carried by `/dbloom/infer` Error frames."""

    INVALID_REQUEST = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    BUSY = "busy"
    SLOW_CONSUMER = "slow_consumer"
    CLOSED = "closed"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"
    INTERNAL = "internal"


class EngineError(Exception):
    """Base of every error a generation can end with; `code` goes on the wire."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(EngineError):
    """The request is malformed or impossible for this model (types, ranges, context)."""

    code = ErrorCode.INVALID_REQUEST


class UnknownModel(EngineError):
    """The engine does not serve the requested model id."""

    code = ErrorCode.UNKNOWN_MODEL


class EngineBusy(EngineError):
    """Batch and queue are full; try another node rather than waiting."""

    code = ErrorCode.BUSY


class SlowConsumer(EngineError):
    """The reader fell a whole buffer behind; the request was dropped to protect the batch."""

    code = ErrorCode.SLOW_CONSUMER


class EngineClosed(EngineError):
    """The engine is shutting down or has stopped."""

    code = ErrorCode.CLOSED


class RequestTimeout(EngineError):
    """A peer took longer than allowed to send or accept data."""

    code = ErrorCode.TIMEOUT


class ProtocolFailure(EngineError):
    """The peer broke the `/dbloom/infer` protocol."""

    code = ErrorCode.PROTOCOL


class EngineFailure(EngineError):
    """Generation failed inside the engine (a bug or a runtime error in MLX)."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[EngineError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownModel,
        EngineBusy,
        SlowConsumer,
        EngineClosed,
        RequestTimeout,
        ProtocolFailure,
        EngineFailure,
    )
}


def error_for_code(code: ErrorCode, message: str) -> EngineError:
    """Rebuild the typed error a remote node reported."""
    return _BY_CODE[code](message)


class ModelError(Exception):
    """A model cannot be found, fetched or loaded."""


class ModelNotFound(ModelError):
    """Neither a local folder nor a cached or reachable Hugging Face repository."""


class InsufficientMemory(ModelError):
    """Loading the model would not fit in the memory available now."""
