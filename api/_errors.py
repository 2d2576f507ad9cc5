"""Errors of the HTTP shim, and how every failure becomes an OpenAI-shaped error body.

OpenAI clients branch on the status code (the SDK raises `NotFoundError` for 404,
`RateLimitError` for 429 and retries 429 and 5xx), so each engine refusal maps to the
status an OpenAI server would give for the same situation.
"""

from __future__ import annotations

from typing import Any

import trio

from dbloom.inference import (
    EngineBusy,
    EngineClosed,
    InvalidRequest,
    ProtocolFailure,
    RequestTimeout,
    SlowConsumer,
    UnknownModel,
)

CONTEXT_OVERFLOW = "exceeds the model's context"
REQUEST_TOO_LARGE = "the request is larger than a node accepts"
"""How the engine's `InvalidRequest` words a prompt that does not fit the context."""


class NoNodeAvailable(Exception):
    """No attested node can serve the model right now; the shim answers 503."""


class InsecureBind(ValueError):
    """Serving beyond loopback without API keys would open the node to anyone."""


class KeyStoreError(ValueError):
    """The API key file is unreadable, malformed or writable by other users."""


class ApiError(Exception):
    """A failure the client should see, with the fields of OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body, in OpenAI's `{"error": {...}}` shape."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400: the request itself is wrong, so retrying it unchanged cannot help."""
    return ApiError(400, message, param=param, code=code)


def known_error(exc: BaseException) -> ApiError | None:
    """The client-facing error for an expected failure; None means a bug (answer 500)."""
    match exc:
        case InvalidRequest() if CONTEXT_OVERFLOW in exc.message:
            return invalid(exc.message, code="context_length_exceeded")
        case InvalidRequest() if REQUEST_TOO_LARGE in exc.message:
            return ApiError(413, exc.message, code="request_too_large")
        case InvalidRequest():
            return invalid(exc.message)
        case UnknownModel():
            return ApiError(404, exc.message, param="model", code="model_not_found")
        case EngineBusy():
            return ApiError(
                429, exc.message, type="rate_limit_error", code="busy", headers={"retry-after": "1"}
            )
        case NoNodeAvailable():
            return ApiError(503, str(exc), type="server_error", code="no_node_available")
        case EngineClosed() | SlowConsumer():
            return ApiError(503, exc.message, type="server_error", code=exc.code.value)
        case RequestTimeout():
            return ApiError(504, exc.message, type="timeout", code="timeout")
        case trio.TooSlowError():
            return ApiError(504, "the model did not answer in time", type="timeout", code="timeout")
        case ProtocolFailure():
            return ApiError(502, exc.message, type="server_error", code=exc.code.value)
    return None


def internal_error(request_id: str) -> ApiError:
    """A 500 that names the request id, so the operator can find it in the logs."""
    return ApiError(
        500,
        f"the server failed to handle request {request_id}",
        type="server_error",
        code="internal_error",
    )
