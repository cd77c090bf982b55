"""Classification: a table of every reason code, the real Square Online order shape, and a
property test that nothing unpaid, uncaptured, not OPEN or unconsented is ever a candidate."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.consent import ConsentRecord, ConsentStatus
from services.eligibility import (
    EligibilityReason,
    LimitedItem,
    apply_batch_limits,
    classify,
)
from services.square_models import SquareOrder
from tests.conftest import consent_document

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
MERCHANT = "MERCHANT1"

# The captured production Square Online order of square-api.md §4 (personal data left out):
# paid at checkout, left OPEN, SHIPMENT fulfillment PROPOSED, shipping service charge.
SQUARE_ONLINE_ORDER: dict[str, Any] = {
    "id": "pJf8k2Lm9QrS4tUvWxYz0aBcDeF", "location_id": "LMAIN123", "reference_id": "104837261",
    "source": {"name": "Square Online"}, "state": "OPEN", "version": 15,
    "created_at": "2026-11-20T15:04:05.000Z", "updated_at": "2026-11-20T15:09:05.000Z",
    "line_items": [{"uid": "li1", "name": "Print", "quantity": "1",
                    "total_money": {"amount": 4200, "currency": "USD"}}],
    "service_charges": [{"name": "Shipping", "amount_money": {"amount": 0, "currency": "USD"}}],
    "fulfillments": [{"uid": "f1", "type": "SHIPMENT", "state": "PROPOSED",
                      "shipment_details": {"shipping_type": "No Shipping"}}],
    "tenders": [{"id": "t1", "type": "CARD", "amount_money": {"amount": 4200, "currency": "USD"},
                 "card_details": {"status": "CAPTURED"}, "payment_id": "p1"}],
    "total_money": {"amount": 4200, "currency": "USD"},
    "net_amount_due_money": {"amount": 0, "currency": "USD"},
}


def order(**changes: Any) -> SquareOrder:
    document = copy.deepcopy(SQUARE_ONLINE_ORDER)
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    return SquareOrder.model_validate(document)


def consent(**changes: Any) -> ConsentRecord:
    document = consent_document(MERCHANT, **changes)
    document["location_ids"] = changes.get("location_ids", ["LMAIN123", "LWEB456"])
    return ConsentRecord.model_validate(document)


ACTIVE = consent()
CASES: list[tuple[str, SquareOrder, list[ConsentRecord], EligibilityReason | None]] = [
    ("square online order, consented", order(), [ACTIVE], None),
    ("no net amount due field at all", order(net_amount_due_money=None), [ACTIVE], None),
    ("DIGITAL fulfillment still classifies", order(fulfillments=[
        {"uid": "f", "type": "DIGITAL", "state": "PROPOSED"}]), [ACTIVE], None),
    ("completed", order(state="COMPLETED"), [ACTIVE], EligibilityReason.NOT_OPEN),
    ("canceled", order(state="CANCELED"), [ACTIVE], EligibilityReason.NOT_OPEN),
    ("draft", order(state="DRAFT"), [ACTIVE], EligibilityReason.NOT_OPEN),
    ("point of sale source", order(source={"name": "Point of Sale"}), [ACTIVE],
     EligibilityReason.OUTSIDE_CONSENT_SCOPE),
    ("no source", order(source=None), [ACTIVE], EligibilityReason.OUTSIDE_CONSENT_SCOPE),
    ("refunded", order(refunds=[{"id": "r1"}]), [ACTIVE], EligibilityReason.REFUNDED),
    ("has returns", order(returns=[{"uid": "r"}]), [ACTIVE], EligibilityReason.REFUNDED),
    ("card authorized only", order(
        tenders=[{"type": "CARD", "card_details": {"status": "AUTHORIZED"},
                  "amount_money": {"amount": 4200, "currency": "USD"}}],
        net_amount_due_money={"amount": 4200, "currency": "USD"}), [ACTIVE],
     EligibilityReason.PAYMENT_NOT_CAPTURED),
    ("card voided", order(tenders=[{"type": "CARD", "card_details": {"status": "VOIDED"}}]),
     [ACTIVE], EligibilityReason.PAYMENT_NOT_CAPTURED),
    ("card failed", order(tenders=[{"type": "CARD", "card_details": {"status": "FAILED"}}]),
     [ACTIVE], EligibilityReason.PAYMENT_NOT_CAPTURED),
    ("partially paid", order(net_amount_due_money={"amount": 100, "currency": "USD"}), [ACTIVE],
     EligibilityReason.NOT_FULLY_PAID),
    ("no tender at all", order(tenders=None), [ACTIVE], EligibilityReason.NOT_FULLY_PAID),
    ("no version", order(version=None), [ACTIVE], EligibilityReason.MANUAL_ONLY),
    ("no consent", order(), [], EligibilityReason.NO_CONSENT),
    ("consent not yet effective", order(), [consent(effective_from="2026-12-01T00:00:00Z")],
     EligibilityReason.CONSENT_NOT_YET_EFFECTIVE),
    ("consent expired", order(), [consent(expires_at="2026-11-25T00:00:00Z")],
     EligibilityReason.CONSENT_EXPIRED),
    ("consent revoked", order(), [consent(revocation={
        "revoked_at": "2026-11-25T00:00:00Z", "revoked_by": "Dana", "reason": "No longer"})],
     EligibilityReason.CONSENT_REVOKED),
    ("location not covered", order(location_id="LOTHER"), [ACTIVE],
     EligibilityReason.OUTSIDE_CONSENT_SCOPE),
    ("ALL locations covers any", order(location_id="LOTHER"), [consent(location_ids="ALL")],
     None),
    ("source consented explicitly", order(source={"name": "Invoices App"}),
     [consent(scope={"action": "complete_fully_paid_orders", "order_sources": ["Invoices App"]})],
     None),
    ("too recent", order(created_at="2026-11-26T06:00:00Z"), [ACTIVE],
     EligibilityReason.TOO_RECENT),
    ("over the batch amount alone", order(total_money={"amount": 600000, "currency": "USD"}),
     [ACTIVE], EligibilityReason.OVER_AMOUNT_LIMIT),
    ("currency outside the limit", order(total_money={"amount": 100, "currency": "CAD"}),
     [ACTIVE], EligibilityReason.OUTSIDE_CONSENT_SCOPE),
]


@pytest.mark.parametrize(("name", "subject", "consents", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_reason_codes(name: str, subject: SquareOrder, consents: list[ConsentRecord],
                      reason: EligibilityReason | None) -> None:
    verdict = classify(subject, consents, NOW)
    assert verdict.reason == reason, verdict.detail
    assert verdict.eligible is (reason is None)
    if verdict.eligible:
        assert verdict.consent is not None


def test_every_reason_code_is_exercised() -> None:
    covered = {c[3] for c in CASES}
    assert set(EligibilityReason) - covered == {EligibilityReason.BATCH_LIMIT_REACHED}


def test_an_active_consent_wins_over_a_revoked_one() -> None:
    revoked = consent(consent_id="9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a", revocation={
        "revoked_at": "2026-11-25T00:00:00Z", "revoked_by": "Dana", "reason": "replaced"})
    assert classify(order(), [revoked, ACTIVE], NOW).eligible


def test_batch_limits_stop_at_the_limit_and_keep_the_rest() -> None:
    limited = consent(scope={"action": "complete_fully_paid_orders", "max_orders_per_batch": 2,
                             "max_amount_per_batch": {"amount": 10000, "currency": "USD"}})
    items = [LimitedItem((MERCHANT, f"o{i}"), limited, 3000) for i in range(5)]
    kept, held = apply_batch_limits(items)
    assert kept == [(MERCHANT, "o0"), (MERCHANT, "o1")]
    assert held == [(MERCHANT, f"o{i}") for i in (2, 3, 4)]
    by_amount = consent(scope={"action": "complete_fully_paid_orders",
                               "max_amount_per_batch": {"amount": 7000, "currency": "USD"}})
    kept, held = apply_batch_limits(
        [LimitedItem((MERCHANT, f"o{i}"), by_amount, 3000) for i in range(4)])
    assert len(kept) == 2 and len(held) == 2


money = st.builds(lambda a: {"amount": a, "currency": "USD"}, st.integers(0, 10**7))
tender = st.fixed_dictionaries({
    "type": st.sampled_from(["CARD", "CASH", "WALLET", "SQUARE_GIFT_CARD"]),
    "amount_money": money,
}, optional={"card_details": st.fixed_dictionaries(
    {"status": st.sampled_from(["AUTHORIZED", "CAPTURED", "VOIDED", "FAILED"])})})
orders = st.fixed_dictionaries({
    "id": st.text("abcdef0123", min_size=1, max_size=8),
    "location_id": st.sampled_from(["LMAIN123", "LWEB456", "LOTHER"]),
    "state": st.sampled_from(["OPEN", "COMPLETED", "CANCELED", "DRAFT"]),
    "created_at": st.sampled_from(["2026-11-01T00:00:00Z", "2026-11-26T11:00:00Z"]),
    "tenders": st.lists(tender, max_size=3),
}, optional={
    "version": st.integers(1, 50),
    "source": st.fixed_dictionaries({"name": st.sampled_from(["Square Online", "Point of Sale"])}),
    "net_amount_due_money": money,
    "total_money": money,
    "refunds": st.lists(st.just({"id": "r"}), max_size=1),
})
consent_sets = st.lists(st.sampled_from([
    ACTIVE, consent(location_ids="ALL"), consent(expires_at="2026-11-25T00:00:00Z"),
    consent(revocation={"revoked_at": "2026-11-01T00:00:00Z", "revoked_by": "D",
                        "reason": "r"}),
    consent(effective_from="2027-01-01T00:00:00Z")]), max_size=3)


@settings(max_examples=400, deadline=None)
@given(orders, consent_sets)
def test_property_never_a_candidate_when_unsafe(document: dict[str, Any],
                                                consents: list[ConsentRecord]) -> None:
    subject = SquareOrder.model_validate(document)
    verdict = classify(subject, consents, NOW)
    if not verdict.eligible:
        return
    assert subject.state == "OPEN"
    assert subject.amount_due == 0
    assert subject.tenders
    assert all(t.card_status in (None, "CAPTURED") for t in subject.tenders)
    assert subject.version is not None
    assert not subject.refunds
    assert verdict.consent is not None
    assert verdict.consent.status_at(NOW) is ConsentStatus.ACTIVE
    assert verdict.consent.covers_location(subject.location_id)
    assert verdict.consent.covers_source(subject.source_name)
    assert any(c is verdict.consent for c in consents)
    assert NOW - datetime.fromisoformat(subject.created_at.replace("Z", "+00:00")) >= \
        timedelta(hours=verdict.consent.scope.min_order_age_hours or 0)
