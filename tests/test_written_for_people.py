"""Amounts and the backlog chart as people read them: the same on screen and in the audit."""

from __future__ import annotations

from types import SimpleNamespace

from console.wording import format_money
from services.money import major_text
from services.workspace import _preview_record


def test_minor_units_are_written_in_major_units_exactly() -> None:
    assert major_text(275900, "GBP") == "2,759.00 GBP"
    assert major_text(5, "USD") == "0.05 USD"
    assert major_text(800, "JPY") == "800 JPY"  # no minor unit
    assert major_text(10**20 + 1, "USD") == "1,000,000,000,000,000,000.01 USD"  # no float
    assert format_money(275900, "GBP") == major_text(275900, "GBP")


def test_the_audit_note_of_a_preview_says_the_amounts_as_the_confirmation_does() -> None:
    """Minor units in the note ("17 orders, 275900 GBP") read as £275,900 on the audit screen,
    beside a confirmation that had said 2,759.00 GBP."""
    preview = SimpleNamespace(per_merchant=lambda: [
        ("M1", 17, {"GBP": 275900}), ("M2", 2, {"JPY": 800, "USD": 1250})])
    assert _preview_record(preview) == (  # type: ignore[arg-type]
        "M1: 17 orders, 2,759.00 GBP; M2: 2 orders, 800 JPY, 12.50 USD")


def test_a_sparkline_band_with_orders_is_never_blank() -> None:
    from console.screens.merchants import sparkline
    line = sparkline([1, 1, 3, 40])
    assert " " not in line and line[0] == line[1] == "▁" and line[-1] == "█"
    assert sparkline([0, 2, 0]) == "·█·"


def test_a_merchants_candidate_count_is_written_with_thousands_separators() -> None:
    from datetime import UTC, datetime

    from console.screens.merchants import overview_cells
    from services.workspace import MerchantOverview
    row = MerchantOverview(
        merchant_id="M1", business_name="Shop", consent_status="active",
        consent_expires_at=None, token_health="valid", error=None, candidates=12_345,
        totals={"USD": 100}, oldest_candidate_at=None, age_buckets=(0, 0, 0, 0, 12_345),
        next_sync_in=None, waiting_without_consent=0)
    cells = overview_cells(row, datetime(2026, 12, 3, tzinfo=UTC), {})
    assert cells[3].plain == "12,345"
