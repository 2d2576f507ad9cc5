"""Typed protocol errors shared by every sans-IO core.

A decoder of untrusted bytes raises `RemoteProtocolError` and nothing else, so a
shell can close exactly the connection or stream that misbehaved.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Why a protocol failed; a yamux GoAway or a log line carries it."""

    NORMAL = 0
    PROTOCOL = 1
    INTERNAL = 2
    LIMIT = 3
    TIMEOUT = 4
    UNSUPPORTED = 5
    AUTH = 6


class ProtocolError(Exception):
    """Base of all dbloom protocol errors; `code` says what kind."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The remote sent something the protocol forbids or that breaks a limit."""


class DecodeError(RemoteProtocolError):
    """Bytes from the network that do not parse."""


class LimitExceeded(DecodeError):
    """The remote went past a configured limit (size, count, rate)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.LIMIT)
