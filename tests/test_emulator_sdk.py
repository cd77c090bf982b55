"""The official SDK, sync and async, in-process and over loopback, runs every endpoint against the
emulator; every request and response on the wire validates against Square's OpenAPI subset."""

from __future__ import annotations

import inspect
import json
from functools import cache
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS30Validator
from square import AsyncSquare, Square
from square.core.api_error import ApiError

from tests.conftest import Emulator, LoopbackServer, async_http, sync_http

OPENAPI = json.loads((__import__("pathlib").Path(__file__).parents[1] / "services" / "emulator"
                      / "openapi" / "square-openapi-subset.json").read_text())


async def call(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def exercise(client: Any, emulator: Emulator, index: int = 0) -> dict[str, Any]:
    """Every endpoint once, the way a Square integration would call it (a USD merchant)."""
    seen: dict[str, Any] = {}
    merchant = emulator.merchants[index]
    assert merchant.merchant.currency == "USD"
    location_id = merchant.locations[0].id
    status = await call(client.o_auth.retrieve_token_status())
    assert status.merchant_id == merchant.merchant.id
    me = await call(client.merchants.get("me"))
    assert me.merchant.business_name == merchant.merchant.business_name
    pager = await call(client.merchants.list())
    merchants = [m async for m in pager] if hasattr(pager, "__aiter__") else list(pager)
    assert [m.id for m in merchants] == [me.merchant.id]
    locations = await call(client.locations.list())
    assert location_id in [loc.id for loc in locations.locations]
    line_items = [{"name": "Mug", "quantity": "2",
                   "base_price_money": {"amount": 1250, "currency": "USD"}}]
    calculated = await call(client.orders.calculate(order={"location_id": location_id,
                                                           "line_items": line_items}))
    assert calculated.order.total_money.amount == 2500
    created = await call(client.orders.create(
        idempotency_key="create-1",
        order={"location_id": location_id, "source": {"name": "Square Online"},
               "line_items": line_items,
               "fulfillments": [{"type": "SHIPMENT", "state": "PROPOSED",
                                 "shipment_details": {"recipient": {"display_name": "Ada"}}}]}))
    order = created.order
    assert (order.state, order.version, order.net_amount_due_money.amount) == ("OPEN", 1, 2500)
    payment = await call(client.payments.create(
        source_id="cnon:card-nonce-ok", idempotency_key="pay-1",
        amount_money={"amount": 2500, "currency": "USD"}, order_id=order.id))
    assert payment.payment.status == "COMPLETED"
    fetched = await call(client.payments.get(payment.payment.id))
    assert fetched.payment.card_details.status == "CAPTURED"
    order = (await call(client.orders.get(order.id))).order
    assert order.version == 2 and order.net_amount_due_money.amount == 0
    batch = await call(client.orders.batch_get(order_ids=[order.id, "no-such-order"]))
    assert [o.id for o in batch.orders] == [order.id]
    found = await call(client.orders.search(
        location_ids=[location_id],
        query={"filter": {"state_filter": {"states": ["OPEN"]},
                          "source_filter": {"source_names": ["Square Online"]}},
               "sort": {"sort_field": "CREATED_AT", "sort_order": "ASC"}}, limit=5))
    assert len(found.orders) == 5 and found.cursor
    updated = await call(client.orders.update(
        order.id, idempotency_key=f"complete:{order.id}:2",
        order={"location_id": location_id, "version": 2, "state": "COMPLETED",
               "fulfillments": [{"uid": order.fulfillments[0].uid, "state": "COMPLETED"}]},
        request_options={"max_retries": 0}))
    assert (updated.order.state, updated.order.version) == ("COMPLETED", 3)
    assert updated.order.closed_at
    # Delayed capture, completed through CompletePayment.
    second = (await call(client.orders.create(idempotency_key="create-2", order={
        "location_id": location_id, "line_items": line_items}))).order
    approved = await call(client.payments.create(
        source_id="cnon:card-nonce-ok", idempotency_key="pay-2", autocomplete=False,
        amount_money={"amount": 2500, "currency": "USD"}, order_id=second.id))
    assert approved.payment.status == "APPROVED"
    assert (await call(client.orders.get(second.id))).order.tenders[0].card_details.status == \
        "AUTHORIZED"
    completed = await call(client.payments.complete(approved.payment.id))
    assert completed.payment.status == "COMPLETED"
    # Delayed capture settled by PayOrder.
    third = (await call(client.orders.create(idempotency_key="create-3", order={
        "location_id": location_id, "line_items": line_items,
        "fulfillments": [{"type": "PICKUP", "state": "PROPOSED"}]}))).order
    held = await call(client.payments.create(
        source_id="cnon:card-nonce-ok", idempotency_key="pay-3", autocomplete=False,
        amount_money={"amount": 2500, "currency": "USD"}, order_id=third.id))
    paid = await call(client.orders.pay(third.id, idempotency_key="payorder-3",
                                        payment_ids=[held.payment.id]))
    assert paid.order.state == "OPEN" and paid.order.net_amount_due_money.amount == 0
    refund = await call(client.refunds.refund_payment(
        idempotency_key="refund-1", payment_id=payment.payment.id,
        amount_money={"amount": 500, "currency": "USD"}, reason="Damaged"))
    assert refund.refund.amount_money.amount == 500
    refunded = await call(client.payments.get(payment.payment.id))
    assert refunded.payment.refunded_money.amount == 500
    with pytest.raises(ApiError) as declined:
        await call(client.payments.create(
            source_id="cnon:card-nonce-declined", idempotency_key="pay-4",
            amount_money={"amount": 100, "currency": "USD"}, location_id=location_id))
    assert declined.value.errors[0].code == "GENERIC_DECLINE"
    seen["order"] = order.id
    return seen


@cache
def _validator(ref: str) -> OAS30Validator:
    return OAS30Validator({"components": OPENAPI["components"], "$ref": ref})


def _response_ref(method: str, path: str, status: int) -> tuple[str | None, str]:
    for template, operations in OPENAPI["paths"].items():
        parts = template.strip("/").split("/")
        actual = path.strip("/").split("/")
        if len(parts) != len(actual) or not all(
                p == a or p.startswith("{") for p, a in zip(parts, actual, strict=True)):
            continue
        operation = operations.get(method.lower())
        if operation is None:
            continue
        request = (operation.get("requestBody", {}).get("content", {})
                   .get("application/json", {}).get("schema", {}).get("$ref"))
        return request, operation["responses"]["200"]["content"]["application/json"][
            "schema"]["$ref"]
    raise AssertionError(f"{method} {path} is not in the OpenAPI subset")


def _shape_errors(ref: str, document: Any) -> list[str]:
    problems = []
    for error in _validator(ref).iter_errors(document):
        # Validate shapes, not enums Square itself breaks (VERSION_MISMATCH, DIGITAL, ...).
        if error.validator == "enum":
            continue
        problems.append(f"{list(error.absolute_path)}: {error.message[:120]}")
    return problems


def assert_exchanges_match_openapi(emulator: Emulator) -> None:
    assert emulator.exchanges, "nothing was recorded"
    for exchange in emulator.exchanges:
        request_ref, response_ref = _response_ref(exchange["method"], exchange["path"],
                                                  exchange["status"])
        where = f"{exchange['method']} {exchange['path']} -> {exchange['status']}"
        if request_ref and exchange["request"]:
            assert not _shape_errors(request_ref, json.loads(exchange["request"])), where
        body = json.loads(exchange["response"])
        # Errors use the same response type: {"errors": [...]}.
        problems = _shape_errors(response_ref, body)
        assert not problems, f"{where}: {problems}"
        if exchange["status"] >= 400:
            assert body["errors"][0]["category"] and body["errors"][0]["code"]


async def test_async_sdk_in_process(emulator: Emulator) -> None:
    async with async_http(emulator) as http:
        client = AsyncSquare(base_url=emulator.base_url, token=emulator.token(),
                             httpx_client=http)
        await exercise(client, emulator)
    assert_exchanges_match_openapi(emulator)
    assert len({e["path"] for e in emulator.exchanges}) >= 14


async def test_sync_sdk_in_process(emulator: Emulator) -> None:
    with sync_http(emulator) as http:
        client = Square(base_url=emulator.base_url, token=emulator.token(), httpx_client=http)
        await exercise(client, emulator)
    assert_exchanges_match_openapi(emulator)


@pytest.mark.loopback
async def test_async_and_sync_sdk_over_loopback(emulator: Emulator,
                                                loopback: LoopbackServer) -> None:
    def hook(response: httpx.Response) -> None:
        response.read()
        emulator.record(response.request, response)

    async def ahook(response: httpx.Response) -> None:
        await response.aread()
        emulator.record(response.request, response)

    async with httpx.AsyncClient(event_hooks={"response": [ahook]}) as http:
        client = AsyncSquare(base_url=loopback.base_url, token=emulator.token(0),
                             httpx_client=http)
        await exercise(client, emulator, 0)
    with httpx.Client(event_hooks={"response": [hook]}) as sync_client:
        sync_sdk = Square(base_url=loopback.base_url, token=emulator.token(1),
                          httpx_client=sync_client)
        await exercise(sync_sdk, emulator, 1)
    assert_exchanges_match_openapi(emulator)


async def test_seeded_orders_parse_with_sdk_types_and_openapi(emulator: Emulator) -> None:
    """Every seeded order (all kinds) parses as the SDK's Order and fits Square's schema."""
    from square.types.order import Order
    for record in emulator.square.orders.values():
        document = json.loads(record.json)
        Order.model_validate(document)
        assert not _shape_errors("#/components/schemas/Order", document), record.id
