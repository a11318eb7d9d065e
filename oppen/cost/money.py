"""Money as integer micro-dollars: exact to add, compare and store, on SQLite as on PostgreSQL.

Prices and meter readings are estimates made of floats (seconds x rates); they become money once,
when an amount is booked, by rounding half-up to the micro-dollar. From there on every sum, in
Python or in SQL, is an integer sum, so the ledger, MLflow and the reports add up to the same
figure to the last micro-dollar.
"""

from __future__ import annotations

import math
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
_MICRO = Decimal("0.000001")

Micros = int


def to_micros(amount: float | Decimal | str | int, *, ceiling: bool = False) -> Micros:
    """USD to whole micro-dollars, rounded half-up; refuses NaN, infinity and negative amounts.

    A ceiling (a cap, a budget) rounds down instead: rounded up, it would allow a fraction of a
    micro-dollar more than its owner set.
    """
    if isinstance(amount, float) and not math.isfinite(amount):
        raise ValueError(f"not a finite amount of money: {amount!r}")
    try:
        value = Decimal(str(amount)) if not isinstance(amount, Decimal) else amount
    except InvalidOperation as error:
        raise ValueError(f"not an amount of money: {amount!r}") from error
    if not value.is_finite():
        raise ValueError(f"not a finite amount of money: {amount!r}")
    if value < 0:
        raise ValueError(f"money amounts are never negative here, got {amount!r}")
    return int((value * MICROS_PER_USD).to_integral_value(rounding=ROUND_FLOOR if ceiling else ROUND_HALF_UP))


def to_usd(micros: Micros) -> Decimal:
    """Micro-dollars as an exact Decimal of dollars (6 places)."""
    return (Decimal(int(micros)) / MICROS_PER_USD).quantize(_MICRO)


def usd_float(micros: Micros) -> float:
    """For places that need a float (MLflow metrics, plots): the nearest float to the exact amount."""
    return int(micros) / MICROS_PER_USD


def format_usd(micros: Micros | None) -> str:
    """$1,250.00, $12.4130, $0.000291: at least cents, and every micro-dollar below a dollar."""
    if micros is None:
        return "n/a"
    value = to_usd(micros)
    places = 2 if value >= 100 else 4 if value >= 1 else 6
    text = f"{value:,.{places}f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"${whole}.{fraction}"


def format_usd_amount(amount: float | None) -> str:
    """A dollar amount that is a float (a quote, a forecast) as `format_usd` shows money; "n/a" for None."""
    return format_usd(to_micros(amount)) if amount is not None else "n/a"
