"""Money as integers: micro-units (one millionth of the unit of account, e.g. USD).

Prices are micro-units per million tokens, so a price and a token count give an exact
amount with integer arithmetic only; nothing about money is ever a float.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICRO = 1_000_000
TOKENS_PER_PRICE = 1_000_000
MAX_PRICE_MICRO = 10**15


def parse_price(text: str | int | Decimal) -> int:
    """Micro-units per million tokens from a decimal string such as "0.25" (units per 1M)."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"price {text!r} is not a decimal number") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"price {text!r} must be a non-negative number")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"price {text!r} has more than 6 decimal places")
    if micro > MAX_PRICE_MICRO:
        raise ValueError(f"price {text!r} is implausibly large")
    return int(micro)


def format_price(micro: int) -> str:
    """The inverse of `parse_price`, without trailing zeros."""
    units, rest = divmod(micro, MICRO)
    return f"{units}.{rest:06d}".rstrip("0").rstrip(".") if rest else str(units)


def cost(tokens: int, price_micro_per_million: int) -> int:
    """Micro-units owed for `tokens` at a price per million tokens, rounded down."""
    return tokens * price_micro_per_million // TOKENS_PER_PRICE
