"""Which open orders are completion candidates, and why every other one is not.

`classify` is a pure function of the order, the merchant's consents and the moment; the queue,
the preview and the engine's send-time re-check all call it, so they cannot disagree.
The checks run in the order below; the first that fails gives the reason code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import msgspec

from services.consent import DEFAULT_ORDER_SOURCES, ConsentRecord, ConsentStatus
from services.square_models import Classifiable
from services.timestamps import parse_time

__all__ = ["Classification", "ConsentView", "EligibilityReason", "apply_batch_limits",
           "classify", "dashboard_url"]


class EligibilityReason(StrEnum):
    NOT_OPEN = "NOT_OPEN"
    OUTSIDE_CONSENT_SCOPE = "OUTSIDE_CONSENT_SCOPE"   # source, location or currency not covered
    REFUNDED = "REFUNDED"                             # refunds or returns: needs a human
    PAYMENT_NOT_CAPTURED = "PAYMENT_NOT_CAPTURED"     # card AUTHORIZED, VOIDED or FAILED
    NOT_FULLY_PAID = "NOT_FULLY_PAID"                 # money still due, or no tender at all
    MANUAL_ONLY = "MANUAL_ONLY"                       # no version: the API cannot update it
    NO_CONSENT = "NO_CONSENT"
    CONSENT_NOT_YET_EFFECTIVE = "CONSENT_NOT_YET_EFFECTIVE"
    CONSENT_EXPIRED = "CONSENT_EXPIRED"
    CONSENT_REVOKED = "CONSENT_REVOKED"
    TOO_RECENT = "TOO_RECENT"                         # younger than min_order_age_hours
    OVER_AMOUNT_LIMIT = "OVER_AMOUNT_LIMIT"           # alone exceeds max_amount_per_batch
    BATCH_LIMIT_REACHED = "BATCH_LIMIT_REACHED"       # set by apply_batch_limits


_UNCAPTURED = frozenset({"AUTHORIZED", "VOIDED", "FAILED"})
_CONSENT_REASON = {
    ConsentStatus.NOT_YET_EFFECTIVE: EligibilityReason.CONSENT_NOT_YET_EFFECTIVE,
    ConsentStatus.EXPIRED: EligibilityReason.CONSENT_EXPIRED,
    ConsentStatus.REVOKED: EligibilityReason.CONSENT_REVOKED,
}
# When several consents fail to cover an order, report the most final state first: a
# revocation (never coming back), then an expiry, then a consent not yet effective.
_CONSENT_PRIORITY = [ConsentStatus.REVOKED, ConsentStatus.EXPIRED,
                     ConsentStatus.NOT_YET_EFFECTIVE]


@dataclass(frozen=True)
class Classification:
    eligible: bool
    reason: EligibilityReason | None
    detail: str
    consent: ConsentRecord | None = None


def _consent_detail(status: ConsentStatus, consent: ConsentRecord) -> str:
    """Why the consent does not cover the order now, with the date that decides it."""
    def day(moment: datetime) -> str:
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if status is ConsentStatus.NOT_YET_EFFECTIVE:
        return f"Consent is not yet effective: it starts {day(consent.effective_from)}."
    if status is ConsentStatus.EXPIRED and consent.expires_at is not None:
        return f"Consent expired {day(consent.expires_at)}."
    if status is ConsentStatus.REVOKED and consent.revocation is not None:
        return f"Consent was revoked {day(consent.revocation.revoked_at)}."
    return f"Consent is {status.value}."


@dataclass(frozen=True)
class ConsentView:
    """A merchant's consents evaluated once at `now`, for classifying many orders."""

    consents: tuple[ConsentRecord, ...]
    statuses: tuple[ConsentStatus, ...]
    sources: frozenset[str]
    now: datetime
    # (location_id, source) -> the consent that covers such an order now, or why none does:
    # the same for every order of a page, so worked out once (issue 11).
    chosen: dict[tuple[str, str | None], _Covered | Classification] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, consents: Sequence[ConsentRecord], now: datetime) -> ConsentView:
        sources = frozenset(s for c in consents for s in c.scope.sources)
        return cls(tuple(consents), tuple(c.status_at(now) for c in consents),
                   sources or frozenset(DEFAULT_ORDER_SOURCES), now)


@dataclass(frozen=True)
class _Covered:
    """The consent in force for some orders, with what every one of them is compared with
    (worked out once per `ConsentView`: classify runs 100,000 times per discovery)."""
    consent: ConsentRecord
    min_age: timedelta | None
    too_young_after: datetime   # with a min_age: created after this (now - min_age) is too recent
    too_recent: Classification
    eligible: Classification

    @classmethod
    def of(cls, consent: ConsentRecord, now: datetime) -> _Covered:
        hours = consent.scope.min_order_age_hours
        min_age = timedelta(hours=hours) if hours else None
        return cls(consent, min_age, now - min_age if min_age is not None else now,
                   Classification(False, EligibilityReason.TOO_RECENT,
                                  f"Younger than {hours} h.", consent),
                   Classification(True, None, "Fully paid, open, consented.", consent))


def _choose_consent(view: ConsentView, location_id: str, source: str | None
                    ) -> _Covered | Classification:
    """The consent in force for an order at this location from this source (the latest to
    take effect), or the refusal when none is."""
    covering = [(c, status) for c, status in zip(view.consents, view.statuses, strict=True)
                if c.covers_location(location_id) and c.covers_source(source)]
    active = [c for c, status in covering if status is ConsentStatus.ACTIVE]
    if active:
        return _Covered.of(max(active, key=lambda c: c.effective_from), view.now)
    if not view.consents:
        return Classification(False, EligibilityReason.NO_CONSENT,
                              "The merchant has not consented.")
    if not covering:
        return Classification(False, EligibilityReason.OUTSIDE_CONSENT_SCOPE,
                              f"Location {location_id} is not covered by the consent.")
    statuses = {status: c for c, status in covering}
    status = next(s for s in _CONSENT_PRIORITY if s in statuses)
    return Classification(False, _CONSENT_REASON[status],
                          _consent_detail(status, statuses[status]), statuses[status])


def classify(order: Classifiable, consents: Sequence[ConsentRecord], now: datetime,
             view: ConsentView | None = None) -> Classification:
    """Pass `view` (built once from the same consents and `now`) when classifying many."""
    state = order.state
    if state != "OPEN":
        return Classification(False, EligibilityReason.NOT_OPEN, f"Order is {state}.")
    if view is None:
        view = ConsentView.build(consents, now)
    source = order.source_name
    if source not in view.sources:
        return Classification(False, EligibilityReason.OUTSIDE_CONSENT_SCOPE,
                              f"Source {source or 'unknown'!r} is not covered.")
    if order.refunds or order.returns:
        return Classification(False, EligibilityReason.REFUNDED,
                              "Has refunds or returns: needs a person.")
    tenders = order.tenders
    for tender in tenders:
        status = tender.card_status
        if status in _UNCAPTURED:
            return Classification(False, EligibilityReason.PAYMENT_NOT_CAPTURED,
                                  f"Card payment is {status}, not captured.")
    if not tenders:
        return Classification(False, EligibilityReason.NOT_FULLY_PAID,
                              "No payment has been taken.")
    due = order.amount_due
    if due > 0:
        # Minor units, labelled: the detail panel shows "due 1.50 USD" beside this sentence.
        return Classification(False, EligibilityReason.NOT_FULLY_PAID,
                              f"Still due: {due} in minor units of {order.currency}.")
    if order.version is None:
        return Classification(False, EligibilityReason.MANUAL_ONLY,
                              "No version: complete it in the Square Dashboard.")
    key = (order.location_id, source)
    chosen = view.chosen.get(key)
    if chosen is None:
        chosen = view.chosen[key] = _choose_consent(view, *key)
    if isinstance(chosen, Classification):
        return chosen
    if chosen.min_age is not None:
        # now - created < min_age, as created > now - min_age (worked out once per view).
        after = chosen.too_young_after if now == view.now else now - chosen.min_age
        if parse_time(order.created_at) > after:
            return chosen.too_recent
    consent = chosen.consent
    limit = consent.scope.max_amount_per_batch
    if limit is not None:
        currency = order.currency
        if limit.currency != currency:
            return Classification(False, EligibilityReason.OUTSIDE_CONSENT_SCOPE,
                                  f"Consent's amount limit is in {limit.currency}, order in "
                                  f"{currency}.", consent)
        total = order.total_amount
        if total > limit.amount:
            return Classification(False, EligibilityReason.OVER_AMOUNT_LIMIT,
                                  f"Total {total} exceeds the consent's batch limit of "
                                  f"{limit.amount} (minor units of {limit.currency}).", consent)
    return chosen.eligible


class LimitedItem(msgspec.Struct, frozen=True, gc=False):
    """Untracked by the garbage collector (its consent never refers back to it): the 70,000
    of a large preview triggered full collections that stalled the console's UI thread."""

    key: tuple[str, str]
    consent: ConsentRecord
    amount: int


def apply_batch_limits(items: Iterable[LimitedItem]) -> tuple[list[tuple[str, str]],
                                                              list[tuple[str, str]]]:
    """Split (merchant, order) keys into those within each consent's per-batch limits and those
    held back (BATCH_LIMIT_REACHED). Items are taken in the order given (oldest first)."""
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    kept: list[tuple[str, str]] = []
    held: list[tuple[str, str]] = []
    for item in items:
        scope = item.consent.scope
        consent_id = item.consent.consent_id
        count = counts.get(consent_id, 0) + 1
        total = totals.get(consent_id, 0) + item.amount
        if (scope.max_orders_per_batch is not None and count > scope.max_orders_per_batch) or (
                scope.max_amount_per_batch is not None
                and total > scope.max_amount_per_batch.amount):
            held.append(item.key)
            continue
        counts[consent_id] = count
        totals[consent_id] = total
        kept.append(item.key)
    return kept, held


def dashboard_url(order_id: str, base_url: str = "https://app.squareup.com") -> str:
    """Where a person completes a manual-only order."""
    return f"{base_url}/dashboard/orders/overview/{order_id}"
