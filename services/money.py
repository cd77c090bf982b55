"""Per-currency sums: the one place amounts of many orders are added up. Numbers only; how an
amount is written for a person is the console's business (console/wording.py)."""

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
