"""Per-currency sums: the one place amounts of many orders are added up, and how one amount is
written (`major_text`: the console's wording and the audit's notes say it alike)."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Protocol


class Priced(Protocol):
    @property
    def currency(self) -> str: ...

    @property
    def total_amount(self) -> int: ...


def totals_by_currency(orders: Iterable[Priced]) -> dict[str, int]:
    """Minor units per currency, e.g. {"USD": 12345, "JPY": 800}."""
    totals: dict[str, int] = {}
    for order in orders:
        totals[order.currency] = totals.get(order.currency, 0) + order.total_amount
    return totals


# Currencies Square writes in whole units (no minor unit).
ZERO_DECIMAL = frozenset({"JPY", "KRW", "VND", "CLP", "ISK", "UGX", "XAF", "XOF"})


def minor_units(major: Decimal, currency: str) -> int:
    """An amount in major units (10000.00) as Square's minor units for `currency`."""
    return int(major if currency in ZERO_DECIMAL else major * 100)


def major_text(amount: int, currency: str) -> str:
    """Minor units as a person reads them: 275900 GBP -> "2,759.00 GBP", 800 JPY -> "800 JPY"
    (exact: Decimal, never a float)."""
    if currency in ZERO_DECIMAL:
        return f"{amount:,} {currency}"
    return f"{Decimal(amount).scaleb(-2):,.2f} {currency}"
