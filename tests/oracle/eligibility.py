"""An eligibility oracle written from product.md ("What fully paid but not completed means") and
square-api.md §2, §3, §5 and §13, over raw dicts: Square's order JSON as the emulator stores it
and consent documents as consent.schema.json defines them.

It deliberately imports nothing from `services/` (a test parses this file's imports): a bug in
the product's `classify` must not be copied into the judge. Where several rules fail, the
oracle reports every failing reason, so a test can accept whichever the product names first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

__all__ = ["Verdict", "consent_state", "judge", "returned_order_ids"]

# product.md: "source.name is one the merchant's consent covers (by default "Square Online")".
DEFAULT_SOURCES = ("Square Online",)
# square-api.md §13: no tender whose card_details.status is AUTHORIZED/VOIDED/FAILED.
NOT_CAPTURED = {"AUTHORIZED", "VOIDED", "FAILED"}


@dataclass(frozen=True)
class Verdict:
    """`reasons` holds every rule the order fails; eligible means none."""

    reasons: frozenset[str] = field(default_factory=frozenset)
    consent_id: str | None = None

    @property
    def eligible(self) -> bool:
        return not self.reasons


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _amount(order: Mapping[str, Any], key: str) -> int:
    money = order.get(key) or {}
    return int(money.get("amount") or 0)


def consent_state(consent: Mapping[str, Any], now: datetime) -> str:
    """consent.schema.json: revoked from `revocation.revoked_at` on; not effective before
    `effective_from`; expired from `expires_at` on; otherwise active."""
    revocation = consent.get("revocation")
    if revocation and _time(revocation["revoked_at"]) <= now:
        return "CONSENT_REVOKED"
    if now < _time(consent["effective_from"]):
        return "CONSENT_NOT_YET_EFFECTIVE"
    if consent.get("expires_at") and _time(consent["expires_at"]) <= now:
        return "CONSENT_EXPIRED"
    return "ACTIVE"


def _sources(consent: Mapping[str, Any]) -> Sequence[str]:
    return (consent.get("scope") or {}).get("order_sources") or DEFAULT_SOURCES


def _covers(consent: Mapping[str, Any], location_id: str, source: str | None) -> bool:
    locations = consent["location_ids"]
    return (locations == "ALL" or location_id in locations) and source in _sources(consent)


def returned_order_ids(orders: Iterable[Mapping[str, Any]]) -> set[str]:
    """Sale orders some return order points back at (square-api.md §3: refunds and returns show
    up as a separate return order with `returns[].source_order_id`)."""
    found: set[str] = set()
    for order in orders:
        for entry in order.get("returns") or []:
            if entry.get("source_order_id"):
                found.add(entry["source_order_id"])
    return found


def judge(order: Mapping[str, Any], consents: Sequence[Mapping[str, Any]], now: datetime,
          returned: set[str] | frozenset[str] = frozenset()) -> Verdict:
    """Is `order` a completion candidate for a merchant holding `consents` at `now`?

    `returned`: ids of orders a return order points back at (see `returned_order_ids`)."""
    reasons: set[str] = set()
    if order.get("state") != "OPEN":
        reasons.add("NOT_OPEN")
    source = (order.get("source") or {}).get("name")
    covered_sources = {s for c in consents for s in _sources(c)} or set(DEFAULT_SOURCES)
    if source not in covered_sources:
        reasons.add("OUTSIDE_CONSENT_SCOPE")
    if order.get("refunds") or order.get("returns") or order.get("id") in returned:
        reasons.add("REFUNDED")
    tenders = order.get("tenders") or []
    if any((t.get("card_details") or {}).get("status") in NOT_CAPTURED for t in tenders):
        reasons.add("PAYMENT_NOT_CAPTURED")
    if not tenders or _amount(order, "net_amount_due_money") > 0:
        reasons.add("NOT_FULLY_PAID")
    if order.get("version") is None:
        reasons.add("MANUAL_ONLY")

    location_id = order.get("location_id", "")
    covering = [c for c in consents if _covers(c, location_id, source)]
    active = [c for c in covering if consent_state(c, now) == "ACTIVE"]
    if not active:
        if not consents:
            reasons.add("NO_CONSENT")
        elif not covering:
            reasons.add("OUTSIDE_CONSENT_SCOPE")
        else:
            reasons.update(consent_state(c, now) for c in covering)
        return Verdict(frozenset(reasons))
    # The newest active grant is the merchant's latest word on the limits.
    consent = max(active, key=lambda c: _time(c["effective_from"]))
    scope = consent.get("scope") or {}
    min_age = scope.get("min_order_age_hours") or 0
    if now - _time(order["created_at"]) < timedelta(hours=min_age):
        reasons.add("TOO_RECENT")
    limit = scope.get("max_amount_per_batch")
    if limit is not None:
        currency = (order.get("total_money") or {}).get("currency", "")
        if currency != limit["currency"]:
            reasons.add("OUTSIDE_CONSENT_SCOPE")
        elif _amount(order, "total_money") > limit["amount"]:
            reasons.add("OVER_AMOUNT_LIMIT")
    return Verdict(frozenset(reasons), consent.get("consent_id"))
