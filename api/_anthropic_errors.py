"""Errors in Anthropic's shape, for the Messages API.

Anthropic clients read `{"type": "error", "error": {"type": ..., "message": ...}}` and
branch on the status: the SDK raises `NotFoundError` for 404, `RateLimitError` for 429,
`OverloadedError` for 529, and retries 408, 409, 429 and 5xx. The rest of the app raises
OpenAI-shaped `ApiError`s and the relay writes them as such, so responses of the Messages
routes pass through `AnthropicErrors`, which rewrites an error on its way out: one place
covers key refusals, malformed bodies, engine refusals and the last-resort 500 alike.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Send

from ._errors import ApiError
from ._sse import dumps

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
BUSY_CODE = "busy"
"""The OpenAI error code of a busy engine (every node at capacity)."""
OVERLOADED = 529
"""Anthropic's status for having no capacity right now, which is what busy means here; the
OpenAI routes answer 429, the status OpenAI gives for the same situation."""


def anthropic_error(status: int, message: str, code: str | None) -> tuple[int, dict[str, Any]]:
    """The status and body Anthropic would send for an error of `status` (OpenAI `code`)."""
    if code == BUSY_CODE:
        status = OVERLOADED
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def error_event(error: ApiError) -> dict[str, Any]:
    """The data of the `error` event that ends a stream which failed after it started."""
    return anthropic_error(error.status, error.message, error.code)[1]


def _translated(start: Message, body: bytes) -> tuple[Message, bytes]:
    """The Anthropic version of an OpenAI error response; anything else is left alone."""
    try:
        error = json.loads(body)["error"]
        message, code = error["message"], error["code"]
    except (ValueError, TypeError, KeyError):
        return start, body
    status, translated = anthropic_error(start["status"], str(message), code)
    data = dumps(translated)
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(data)).encode()))
    return {**start, "status": status, "headers": headers}, data


class AnthropicErrors:
    """An ASGI `send` that passes responses through, error responses translated.

    An error response is held until its body is complete (they are small JSON objects),
    then sent in Anthropic's shape with a status Anthropic would use.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self._start, self._body = message, bytearray()
            return
        if self._start is None or message["type"] != "http.response.body":
            await self._send(message)
            return
        self._body += message.get("body", b"")
        if message.get("more_body", False):
            return
        start, body = _translated(self._start, bytes(self._body))
        await self._send(start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
