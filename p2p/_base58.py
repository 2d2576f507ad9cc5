"""Base58btc and base32 (RFC 4648, lower case, no padding) for peer ids and CIDs."""

from __future__ import annotations

import base64

from ._errors import DecodeError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    """Encode bytes as base58btc (leading zero bytes become '1')."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, rem = divmod(number, 58)
        digits.append(_B58[rem])
    return "1" * zeros + "".join(reversed(digits))


def b58decode(text: str, *, max_len: int = 256) -> bytes:
    """Decode base58btc; raises DecodeError on a bad character or an absurd length."""
    if len(text) > max_len:
        raise DecodeError("base58 string too long")
    number = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise DecodeError(f"invalid base58 character {char!r}")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


def b32encode(data: bytes) -> str:
    """RFC 4648 base32, lower case, without padding (multibase 'b')."""
    return base64.b32encode(data).decode().rstrip("=").lower()


def b32decode(text: str) -> bytes:
    """Inverse of b32encode; raises DecodeError on bad input."""
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except (ValueError, TypeError):
        raise DecodeError("invalid base32 text") from None
