"""A strict, minimal protobuf (proto2/proto3 wire format) codec.

libp2p's handshake payload, identify and Kademlia messages are protobuf. We need
only varint and length-delimited fields, so a page of code beats a generated
dependency, and every malformed input becomes one `DecodeError`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import DecodeError
from ._wire import decode_uvarint, encode_uvarint

VARINT = 0
I64 = 1
LEN = 2
I32 = 5

FieldValue = int | bytes
Fields = dict[int, list[FieldValue]]


def encode_message(fields: Iterable[tuple[int, int | bytes | str | None]]) -> bytes:
    """Encode (field number, value) pairs in order; None values are skipped.

    ints become varints, bytes and str become length-delimited fields.
    """
    out = bytearray()
    for number, value in fields:
        if value is None:
            continue
        if isinstance(value, bool | int):
            out += encode_uvarint(number << 3 | VARINT)
            out += encode_uvarint(int(value))
        else:
            raw = value.encode() if isinstance(value, str) else value
            out += encode_uvarint(number << 3 | LEN)
            out += encode_uvarint(len(raw))
            out += raw
    return bytes(out)


def decode_message(data: bytes, *, max_fields: int = 4096) -> Fields:
    """Parse a message into {field number: [values]}; fixed-width fields are skipped."""
    fields: Fields = {}
    pos = 0
    end = len(data)
    count = 0
    while pos < end:
        count += 1
        if count > max_fields:
            raise DecodeError("protobuf message has too many fields")
        tag = decode_uvarint(data, pos)
        if tag is None:
            raise DecodeError("truncated protobuf tag")
        key, pos = tag
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("protobuf field number 0")
        if wire_type == VARINT:
            item = decode_uvarint(data, pos)
            if item is None:
                raise DecodeError("truncated protobuf varint")
            value, pos = item
            fields.setdefault(number, []).append(value)
        elif wire_type == LEN:
            item = decode_uvarint(data, pos)
            if item is None:
                raise DecodeError("truncated protobuf length")
            length, pos = item
            if pos + length > end:
                raise DecodeError("protobuf field runs past the end")
            fields.setdefault(number, []).append(bytes(data[pos : pos + length]))
            pos += length
        elif wire_type in (I64, I32):
            pos += 8 if wire_type == I64 else 4
            if pos > end:
                raise DecodeError("truncated protobuf fixed field")
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire_type}")
    return fields


def get_bytes(fields: Fields, number: int, *, required: bool = False) -> bytes | None:
    """The last bytes value of a field (protobuf's last-one-wins rule)."""
    values = fields.get(number)
    if not values:
        if required:
            raise DecodeError(f"missing protobuf field {number}")
        return None
    value = values[-1]
    if not isinstance(value, bytes):
        raise DecodeError(f"protobuf field {number} should be length-delimited")
    return value


def get_int(fields: Fields, number: int, *, required: bool = False) -> int | None:
    """The last varint value of a field."""
    values = fields.get(number)
    if not values:
        if required:
            raise DecodeError(f"missing protobuf field {number}")
        return None
    value = values[-1]
    if not isinstance(value, int):
        raise DecodeError(f"protobuf field {number} should be a varint")
    return value


def get_repeated_bytes(fields: Fields, number: int) -> list[bytes]:
    """All bytes values of a repeated field."""
    out = []
    for value in fields.get(number, []):
        if not isinstance(value, bytes):
            raise DecodeError(f"protobuf field {number} should be length-delimited")
        out.append(value)
    return out


def get_str(fields: Fields, number: int) -> str | None:
    """A UTF-8 string field."""
    raw = get_bytes(fields, number)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise DecodeError(f"protobuf field {number} is not UTF-8") from None


def get_repeated_str(fields: Fields, number: int) -> list[str]:
    """All values of a repeated UTF-8 string field."""
    try:
        return [raw.decode() for raw in get_repeated_bytes(fields, number)]
    except UnicodeDecodeError:
        raise DecodeError(f"protobuf field {number} is not UTF-8") from None
