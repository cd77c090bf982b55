"""How numbers and reason codes are written for people: amounts, counts, why an order is held.
The services hand over numbers and codes; the console and the CLI write them with these."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from services.money import major_text

if TYPE_CHECKING:  # types only (see console/app.py)
    from services.workspace import Hold, Preview


def format_money(amount: int, currency: str) -> str:
    return major_text(amount, currency)


def money_text(totals: Mapping[str, int]) -> str:
    """Totals per currency, e.g. "12.50 EUR, 1,204.00 USD" (currencies in order)."""
    return ", ".join(format_money(amount, currency)
                     for currency, amount in sorted(totals.items()))


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 order`, `2 orders`, `1,882 orders`."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"


def preview_lines(preview: Preview) -> list[str]:
    """One line per merchant: name (id): N orders, totals."""
    return [f"{preview.names.get(merchant_id, merchant_id)} ({merchant_id}): "
            f"{plural(count, 'order')}, {money_text(totals)}"
            for merchant_id, count, totals in preview.per_merchant()]


_HOLD_SHORT = {"TOKEN_MISSING_SCOPES": "token lacks {detail}",
               "TOKEN_EXPIRED": "token expired", "TOKEN_REVOKED": "token revoked",
               "TOKEN_INVALID": "token invalid",
               "TOKEN_MERCHANT_MISMATCH": "token is another merchant's",
               "MERCHANT_LEASED": "leased: another run", "NO_VERSION": "no version: refresh",
               "NO_CONSENT": "consent not found",
               "BATCH_LIMIT_REACHED": "waits for next batch"}


def hold_text(hold: Hold) -> str:
    """The short reason a held order shows in the queue's Reason column."""
    text = _HOLD_SHORT.get(hold.reason, hold.reason)
    return "held: " + text.format(detail=hold.detail or "scopes")


def holds_summary(holds: Mapping[str, Hold], consent_of: Mapping[str, str | None],
                  candidates: Mapping[str, int]) -> str:
    """One sentence for the orders held back: per consent with a batch limit "500 per batch:
    1,882 wait for the next batch", then the other reasons with their counts.
    `consent_of`: order id -> consent id; `candidates`: consent id -> candidates now."""
    waiting: dict[str, int] = {}
    other: dict[str, int] = {}
    for order_id, hold in holds.items():
        if hold.reason == "BATCH_LIMIT_REACHED":
            consent = consent_of.get(order_id) or ""
            waiting[consent] = waiting.get(consent, 0) + 1
        else:
            text = hold_text(hold).removeprefix("held: ")
            if hold.reason == "MERCHANT_LEASED" and hold.detail:
                text = f"leased by {hold.detail}"
            other[text] = other.get(text, 0) + 1
    parts = [f"{candidates.get(consent, 0):,} per batch: {count:,} wait for the next batch"
             for consent, count in sorted(waiting.items())]
    parts += [f"{count:,} held ({text})" for text, count in sorted(other.items())]
    return "; ".join(parts)
