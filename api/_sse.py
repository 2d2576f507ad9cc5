"""Server-sent events framing, as OpenAI streams use it.

Chat and completions streams send bare `data:` lines and end with `data: [DONE]`; the
Responses API names each event with an `event:` line and sends no terminator.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

DONE = b"data: [DONE]\n\n"
"""The sentinel that tells a chat or completions client the stream ended normally."""


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding of every body and event the shim sends."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def sse(data: Mapping[str, Any], event: str | None = None) -> bytes:
    """One event; JSON never contains a raw newline, so `data` fits on one line."""
    head = f"event: {event}\n".encode() if event is not None else b""
    return head + b"data: " + dumps(data) + b"\n\n"
