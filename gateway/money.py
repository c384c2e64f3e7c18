"""Money as integers: nano-USD everywhere below the HTTP layer, never accumulated floats."""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

NANO_PER_USD = 10**9


def to_nano(usd: Decimal | float | int, *, round_up: bool = False) -> int:
    """USD to nano-USD; prices round up and caps round down, so errors favour the cap."""
    rounding = ROUND_CEILING if round_up else ROUND_FLOOR
    return int((Decimal(str(usd)) * NANO_PER_USD).to_integral_value(rounding=rounding))


def to_usd(nano: int) -> float:
    """For JSON bodies and headers only."""
    return float(Decimal(nano) / NANO_PER_USD)


def cost(tokens: int, nano_per_1k: int) -> int:
    """Price of `tokens` at `nano_per_1k`, rounded up to the next nano-USD."""
    return -(-tokens * nano_per_1k // 1000)
