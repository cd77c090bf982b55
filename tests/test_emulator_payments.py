"""The Payments and Refunds surface a specialist's scripts meet around these orders, through the
official SDK: ListPayments, CancelPayment, CancelPaymentByIdempotencyKey, RefundPayment (PENDING
first, as Square documents), GetPaymentRefund, ListPaymentRefunds. Every exchange validates
against Square's OpenAPI subset; a PENDING refund already makes its order REFUNDED."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from square import Square
from square.core.api_error import ApiError

from services.consent import ConsentRecord
from services.eligibility import EligibilityReason, classify
from services.square_models import SquareOrder
from tests.conftest import Emulator, consent_document, sync_http
from tests.oracle import eligibility as oracle
from tests.test_emulator_sdk import assert_exchanges_match_openapi

LINE_ITEMS = [{"name": "Mug", "quantity": "1",
               "base_price_money": {"amount": 1500, "currency": "USD"}}]


def paid_order(client: Square, location_id: str, key: str, *, autocomplete: bool = True
               ) -> tuple[Any, Any]:
    order = client.orders.create(idempotency_key=f"o-{key}", order={
        "location_id": location_id, "source": {"name": "Square Online"},
        "line_items": LINE_ITEMS, "fulfillments": [{"type": "PICKUP", "state": "PROPOSED"}]}
    ).order
    payment = client.payments.create(source_id="cnon:card-nonce-ok", idempotency_key=f"p-{key}",
                                     amount_money={"amount": 1500, "currency": "USD"},
                                     order_id=order.id, autocomplete=autocomplete).payment
    return order, payment


def test_payments_and_refunds_surface(emulator: Emulator) -> None:
    location_id = emulator.merchants[0].locations[0].id
    with sync_http(emulator) as http:
        client = Square(base_url=emulator.base_url, token=emulator.token(), httpx_client=http)
        # CancelPayment voids an authorized payment; the order's tender follows.
        order, held = paid_order(client, location_id, "a", autocomplete=False)
        canceled = client.payments.cancel(held.id).payment
        assert (canceled.status, canceled.card_details.status) == ("CANCELED", "VOIDED")
        tender = client.orders.get(order.id).order.tenders[0]
        assert tender.card_details.status == "VOIDED"
        with pytest.raises(ApiError) as not_approved:
            client.payments.complete(held.id, request_options={"max_retries": 0})
        assert not_approved.value.status_code == 400
        # CancelPaymentByIdempotencyKey: voids what CreatePayment with that key made; an
        # unknown key is no error.
        _, second = paid_order(client, location_id, "b", autocomplete=False)
        assert not client.payments.cancel_by_idempotency_key(idempotency_key="p-b").errors
        assert client.payments.get(second.id).payment.status == "CANCELED"
        client.payments.cancel_by_idempotency_key(idempotency_key="never-used")
        # A captured payment cannot be canceled.
        order, captured = paid_order(client, location_id, "c")
        with pytest.raises(ApiError):
            client.payments.cancel(captured.id, request_options={"max_retries": 0})
        # RefundPayment starts PENDING; without a reason, none comes back.
        refund = client.refunds.refund_payment(
            idempotency_key="r-c", payment_id=captured.id,
            amount_money={"amount": 500, "currency": "USD"},
            app_fee_money={"amount": 10, "currency": "USD"}).refund
        assert refund.status == "PENDING" and refund.reason is None
        assert refund.app_fee_money.amount == 10
        fetched = client.refunds.get(refund.id).refund
        assert (fetched.id, fetched.status, fetched.payment_id) == (refund.id, "PENDING",
                                                                    captured.id)
        with pytest.raises(ApiError) as missing:
            client.refunds.get("no-such-refund")
        assert missing.value.status_code == 404
        # A PENDING refund already takes the order out of the candidates.
        raw = emulator.square.orders[order.id].copy_doc()
        assert raw["refunds"][0]["status"] == "PENDING"
        document = consent_document(emulator.merchants[0].merchant.id, scope={
            "action": "complete_fully_paid_orders", "min_order_age_hours": 0})
        now = datetime.now(UTC)
        verdict = classify(SquareOrder.model_validate(raw),
                           [ConsentRecord.model_validate(document)], now)
        assert verdict.reason is EligibilityReason.REFUNDED
        assert oracle.judge(raw, [document], now).reasons == {"REFUNDED"}
        emulator.square.settle_refund(refund.id)
        assert client.refunds.get(refund.id).refund.status == "COMPLETED"
        # ListPaymentRefunds: filters and pages.
        listed = list(client.refunds.list(status="COMPLETED", location_id=location_id))
        assert refund.id in {r.id for r in listed}
        assert all(r.status == "COMPLETED" for r in listed)
        assert refund.id not in {r.id for r in client.refunds.list(status="PENDING")}
        every = list(client.refunds.list())
        assert len(every) == len({r.id for r in every}) == sum(
            1 for r in emulator.square.refunds.values()
            if r["location_id"] in {loc.id for loc in emulator.merchants[0].locations})
        # ListPayments: the location's payments, newest first, in pages of `limit`.
        pager = client.payments.list(location_id=location_id, limit=7)
        payments = list(pager)
        ids = [p.id for p in payments]
        assert len(ids) == len(set(ids)) and {held.id, second.id, captured.id} <= set(ids)
        created = [p.created_at for p in payments]
        assert created == sorted(created, reverse=True)
        ascending = [p.created_at for p in client.payments.list(location_id=location_id,
                                                                sort_order="ASC")]
        assert ascending == sorted(ascending)
        recent = list(client.payments.list(
            location_id=location_id,
            begin_time=(datetime.now(UTC) - timedelta(minutes=5)).isoformat()))
        assert {p.id for p in recent} == {held.id, second.id, captured.id}
        with pytest.raises(ApiError) as bad_limit:
            client.payments.list(limit=500, request_options={"max_retries": 0})
        assert bad_limit.value.errors[0].field == "limit"
    assert_exchanges_match_openapi(emulator)
