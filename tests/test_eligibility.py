"""Classification: a table of every reason code, the real Square Online order shape, and a
property test that `classify` agrees with the independent oracle (tests/oracle) on cases of which
a good share are eligible, so nothing unpaid, uncaptured, refunded, not OPEN or unconsented is
ever a candidate."""

from __future__ import annotations

import ast
import copy
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
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
from tests.oracle import eligibility as oracle

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


# The property test. Its cases start from the eligible Square Online order and consent above and
# change each part with a small probability, so a good share stay eligible (the earlier strategy
# drew fields independently and produced no eligible order in 1,200 examples, so its asserts never
# ran). Every case is judged twice: by `classify` and by the independent oracle of tests/oracle.
def _consent_doc(rnd: random.Random, index: int) -> dict[str, Any]:
    document = consent_document(MERCHANT)
    document["consent_id"] = f"0b7c6f1e-3f7a-4c1e-9a51-2f8e6c1d4b1{index}"
    document["location_ids"] = ["LMAIN123", "LWEB456"]
    scope = document["scope"]
    roll = rnd.random
    if roll() < 0.1:
        document["location_ids"] = "ALL"
    if roll() < 0.1:
        document["location_ids"] = ["LWEB456"]
    if roll() < 0.06:
        document["expires_at"] = "2026-11-25T00:00:00Z"
    if roll() < 0.06:
        document["revocation"] = {"revoked_at": "2026-11-01T00:00:00Z", "revoked_by": "D",
                                  "reason": "r"}
    if roll() < 0.06:
        document["effective_from"] = "2027-01-01T00:00:00Z"
    if roll() < 0.1:
        document["effective_from"] = "2026-11-10T00:00:00Z"
    if roll() < 0.08:
        scope["order_sources"] = rnd.choice([["Invoices App"], ["Square Online", "Invoices App"]])
    if roll() < 0.08:
        scope.pop("order_sources")
    if roll() < 0.06:
        scope["max_amount_per_batch"] = {"amount": rnd.choice([0, 4200, 4199]),
                                         "currency": rnd.choice(["USD", "USD", "CAD"])}
    if roll() < 0.05:
        scope.pop("max_amount_per_batch")
    if roll() < 0.08:
        scope["min_order_age_hours"] = rnd.choice([0, 1, 200])
    return document


def random_case(rnd: random.Random) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One (raw order JSON, raw consent documents) pair, mostly eligible."""
    document = copy.deepcopy(SQUARE_ONLINE_ORDER)
    roll = rnd.random
    document["created_at"] = rnd.choice(["2026-11-20T15:04:05.000Z", "2026-11-01T00:00:00Z",
                                         "2026-11-26T06:00:00Z" if roll() < 0.1 else
                                         "2026-11-24T12:00:00Z"])
    if roll() < 0.07:
        document["state"] = rnd.choice(["COMPLETED", "CANCELED", "DRAFT"])
    if roll() < 0.06:
        document["source"] = {"name": rnd.choice(["Point of Sale", "Invoices App"])}
    if roll() < 0.03:
        document.pop("source")
    if roll() < 0.07:
        document["refunds"] = [{"id": "r1", "status": rnd.choice(["PENDING", "APPROVED"])}]
    if roll() < 0.05:
        document["returns"] = [{"uid": "ret1", "source_order_id": "other"}]
    if roll() < 0.1:
        tender = document["tenders"][0]
        tender["card_details"]["status"] = rnd.choice(["AUTHORIZED", "VOIDED", "FAILED",
                                                       "CAPTURED"])
    if roll() < 0.08:
        document["tenders"].append(rnd.choice([
            {"id": "t2", "type": "CASH", "amount_money": {"amount": 0, "currency": "USD"}},
            {"id": "t3", "type": "CARD", "card_details": {"status": "AUTHORIZED"},
             "amount_money": {"amount": 100, "currency": "USD"}}]))
    if roll() < 0.05:
        document.pop("tenders")
    if roll() < 0.07:
        document["net_amount_due_money"] = {"amount": rnd.choice([1, 4200]), "currency": "USD"}
    if roll() < 0.05:
        document.pop("net_amount_due_money")
    if roll() < 0.05:
        document.pop("version")
    if roll() < 0.06:
        document["location_id"] = rnd.choice(["LWEB456", "LOTHER"])
    if roll() < 0.06:
        document["total_money"] = rnd.choice([{"amount": 600000, "currency": "USD"},
                                              {"amount": 4200, "currency": "CAD"}])
    if roll() < 0.05:
        document.pop("total_money")
    count = 0 if roll() < 0.05 else (1 if roll() < 0.8 else rnd.choice([2, 3]))
    return document, [_consent_doc(rnd, i) for i in range(count)]


def judged(document: dict[str, Any], consent_docs: list[dict[str, Any]]) -> bool:
    """Compare classify with the oracle on one case; returns whether it is eligible."""
    subject = SquareOrder.model_validate(document)
    consents = [ConsentRecord.model_validate(c) for c in consent_docs]
    verdict = classify(subject, consents, NOW)
    expected = oracle.judge(document, consent_docs, NOW)
    assert verdict.eligible == expected.eligible, (verdict, expected, document, consent_docs)
    if not verdict.eligible:
        assert verdict.reason is not None
        assert verdict.reason.value in expected.reasons, (verdict, expected)
        return False
    # Eligible: re-check the safety rules straight on the product's view of the order.
    assert subject.state == "OPEN" and subject.amount_due == 0 and subject.tenders
    assert all(t.card_status in (None, "CAPTURED") for t in subject.tenders)
    assert subject.version is not None and not subject.refunds and not subject.returns
    assert verdict.consent is not None
    assert verdict.consent.consent_id == expected.consent_id
    assert verdict.consent.status_at(NOW) is ConsentStatus.ACTIVE
    assert verdict.consent.covers_location(subject.location_id)
    assert verdict.consent.covers_source(subject.source_name)
    assert NOW - datetime.fromisoformat(subject.created_at.replace("Z", "+00:00")) >= \
        timedelta(hours=verdict.consent.scope.min_order_age_hours or 0)
    return True


@settings(max_examples=400, deadline=None)
@given(st.randoms(use_true_random=False))
def test_property_classify_agrees_with_the_oracle(rnd: random.Random) -> None:
    judged(*random_case(rnd))


def test_a_fixed_batch_is_often_eligible_and_covers_every_reason() -> None:
    """The same generator from a seeded Random: at least 20% eligible, so the eligible-branch
    asserts above really run, and every reason the oracle knows appears."""
    rnd = random.Random(20261126)
    cases = 1000
    eligible = 0
    reasons: set[str] = set()
    for _ in range(cases):
        document, consent_docs = random_case(rnd)
        eligible += judged(document, consent_docs)
        reasons |= oracle.judge(document, consent_docs, NOW).reasons
    assert eligible >= cases * 0.2, f"only {eligible} of {cases} cases eligible"
    assert reasons == {r.value for r in EligibilityReason} - {"BATCH_LIMIT_REACHED"}


def test_the_oracle_imports_nothing_from_services() -> None:
    """The oracle must stay independent of the code it judges."""
    folder = Path(oracle.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                assert node.level == 0 or not any("services" in a.name for a in node.names)
            for name in names:
                root = name.split(".")[0]
                assert root not in ("services", "console"), f"{path.name} imports {name}"
