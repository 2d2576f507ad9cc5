"""Unsigned varints and varint-length-prefixed frames, as libp2p uses them.

Every reader is strict: overlong encodings, values past their cap and frames past
`max_size` raise `DecodeError`/`LimitExceeded` instead of buffering forever.
"""

from __future__ import annotations

from ._errors import DecodeError, LimitExceeded

MAX_UVARINT_BYTES = 9  # multiformats unsigned-varint: at most 63 bits, 9 bytes
DEFAULT_MAX_FRAME = 1 << 20


def encode_uvarint(value: int) -> bytes:
    """Encode a non-negative int as a minimal unsigned LEB128 varint."""
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"uvarint out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode a varint at `offset`; return (value, new_offset), or None if incomplete.

    Raises DecodeError for non-minimal or over-long encodings.
    """
    value = 0
    shift = 0
    end = len(data)
    pos = offset
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and pos - offset > 1:
                raise DecodeError("non-minimal varint")
            return value, pos
        shift += 7
        if pos - offset >= MAX_UVARINT_BYTES:
            raise DecodeError("varint too long")
    return None


def decode_uvarint_exact(data: bytes) -> int:
    """Decode bytes that must hold exactly one varint."""
    result = decode_uvarint(data)
    if result is None or result[1] != len(data):
        raise DecodeError("expected exactly one varint")
    return result[0]


def encode_frame(payload: bytes) -> bytes:
    """Prefix `payload` with its varint length."""
    return encode_uvarint(len(payload)) + payload


class FrameReader:
    """Sans-IO reader of varint-length-prefixed frames with a size cap."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, *, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes read from the network."""
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next whole frame, or None when more bytes are needed."""
        header = decode_uvarint(self._buf)
        if header is None:
            if len(self._buf) >= MAX_UVARINT_BYTES:
                raise DecodeError("varint too long")
            return None
        length, start = header
        if length > self.max_size:
            raise LimitExceeded(f"frame of {length} bytes exceeds the limit of {self.max_size}")
        end = start + length
        if len(self._buf) < end:
            return None
        frame = bytes(self._buf[start:end])
        del self._buf[:end]
        return frame

    def trailing_data(self) -> bytes:
        """Bytes buffered past the last returned frame (handed to the next layer)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    @property
    def buffered(self) -> int:
        """How many bytes are waiting."""
        return len(self._buf)
