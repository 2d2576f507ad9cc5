"""multistream-select 1.0 as a sans-IO state machine.

The initiator pipelines the header with its first proposal (one round trip in
the common case); the responder sends its header at once and answers each
proposal with an echo or `na`. Bytes that follow the agreement are kept for the
next layer (`trailing_data`), like wsproto hands h11's leftovers on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from .._errors import DecodeError, ErrorCode, LimitExceeded, ProtocolError, RemoteProtocolError
from .._wire import decode_uvarint, encode_uvarint

PROTOCOL_ID: Final = "/multistream/1.0.0"
NA: Final = "na"
LS: Final = "ls"
DEFAULT_MAX_MESSAGE: Final = 1024
DEFAULT_MAX_ATTEMPTS: Final = 32


class Role(enum.Enum):
    """Who proposes (the dialer of a connection or opener of a stream) and who answers."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


class NegotiationFailed(ProtocolError):
    """No protocol both sides speak."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.UNSUPPORTED)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolSelected:
    """Both sides agreed on `protocol`; the stream now speaks it."""

    protocol: str


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
Event = ProtocolSelected | _NeedData


def encode_message(text: str) -> bytes:
    """One multistream message: varint length, the text, a newline."""
    raw = text.encode() + b"\n"
    return encode_uvarint(len(raw)) + raw


class Negotiator:
    """Negotiates one protocol on a fresh connection or stream."""

    def __init__(
        self,
        role: Role,
        protocols: Sequence[str] | Callable[[str], bool],
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.role = role
        self.max_message = max_message
        self.max_attempts = max_attempts
        self._buf = bytearray()
        self._out = bytearray(encode_message(PROTOCOL_ID))
        self._header_seen = False
        self._attempts = 0
        self._selected: str | None = None
        if role is Role.INITIATOR:
            if callable(protocols) or not protocols:
                raise ValueError("an initiator needs a non-empty list of protocols")
            self._proposals = list(protocols)
            self._out += encode_message(self._proposals[0])
            self._supports: Callable[[str], bool] = lambda _p: False
        else:
            self._proposals = []
            if callable(protocols):
                self._supports = protocols
            else:
                supported = frozenset(protocols)
                self._supports = supported.__contains__

    @property
    def selected(self) -> str | None:
        """The agreed protocol, once there is one."""
        return self._selected

    def data_to_send(self) -> bytes:
        """Bytes the shell must write."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes read from the stream."""
        self._buf += data

    def trailing_data(self) -> bytes:
        """Bytes received after the agreement: the first bytes of the chosen protocol."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_event(self) -> Event:
        """Advance as far as the buffered bytes allow."""
        while self._selected is None:
            message = self._next_message()
            if message is None:
                return NEED_DATA
            if not self._header_seen:
                if message != PROTOCOL_ID:
                    raise RemoteProtocolError(
                        f"expected {PROTOCOL_ID} header, got {message[:64]!r}"
                    )
                self._header_seen = True
            elif self.role is Role.INITIATOR:
                self._on_answer(message)
            else:
                self._on_proposal(message)
        return ProtocolSelected(protocol=self._selected)

    def _on_answer(self, message: str) -> None:
        proposed = self._proposals[0]
        if message == proposed:
            self._selected = proposed
            return
        if message != NA:
            raise RemoteProtocolError(f"unexpected multistream answer {message[:64]!r}")
        self._proposals.pop(0)
        if not self._proposals:
            raise NegotiationFailed("the remote supports none of the proposed protocols")
        self._out += encode_message(self._proposals[0])

    def _on_proposal(self, message: str) -> None:
        self._attempts += 1
        if self._attempts > self.max_attempts:
            raise LimitExceeded(f"more than {self.max_attempts} multistream proposals")
        if message != LS and self._supports(message):
            self._selected = message
            self._out += encode_message(message)
        else:
            self._out += encode_message(NA)

    def _next_message(self) -> str | None:
        header = decode_uvarint(self._buf)
        if header is None:
            if len(self._buf) >= 9:
                raise DecodeError("multistream length varint too long")
            return None
        length, start = header
        if length > self.max_message:
            raise LimitExceeded(f"multistream message of {length} bytes exceeds {self.max_message}")
        if length == 0:
            raise DecodeError("empty multistream message")
        end = start + length
        if len(self._buf) < end:
            return None
        raw = bytes(self._buf[start:end])
        del self._buf[:end]
        if raw[-1:] != b"\n":
            raise DecodeError("multistream message does not end in a newline")
        try:
            text = raw[:-1].decode()
        except UnicodeDecodeError:
            raise DecodeError("multistream message is not UTF-8") from None
        if "\n" in text:
            raise DecodeError("multistream message holds a newline")
        return text


class LazyProposal:
    """One protocol proposed without waiting for the answer (multistream "V1Lazy").

    The proposal goes out in the same write as the protocol's own first bytes, which
    saves a round trip per negotiation; `confirm` later takes the answer off the
    incoming bytes and returns what follows it. A refusal raises NegotiationFailed.
    """

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self._negotiator = Negotiator(Role.INITIATOR, [protocol])
        self.data = self._negotiator.data_to_send()
        self.confirmed = False

    def confirm(self, data: bytes | bytearray) -> bytes | None:
        """Feed received bytes: None while the answer is incomplete, else the bytes after it."""
        self._negotiator.receive_data(data)
        if isinstance(self._negotiator.next_event(), ProtocolSelected):
            self.confirmed = True
            return self._negotiator.trailing_data()
        return None
