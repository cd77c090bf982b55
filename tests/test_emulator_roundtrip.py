"""No field of a request the emulator accepts is silently dropped. For every write endpoint, every
field its request schema defines in the vendored OpenAPI subset (services/emulator/openapi/) is
sent once, with a value built from the schema; the emulator either answers with the field in the
resource it returns, as Square does, or refuses it with Square's error envelope. Fields whose
effect is not an echo (keys, versions, tokens) are listed in CONSUMED with the reason, and the
test fails when the schema gains a field nobody classified."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from services.emulator import SeedConfig
from services.emulator.state import NONCE_OK
from tests.conftest import Emulator, make_emulator, sync_http
from tests.test_emulator_rules import headers

OPENAPI = json.loads((__import__("pathlib").Path(__file__).parents[1] / "services" / "emulator"
                      / "openapi" / "square-openapi-subset.json").read_text())
SCHEMAS: dict[str, Any] = OPENAPI["components"]["schemas"]
USD = {"amount": 100, "currency": "USD"}

# Request fields that are used, not echoed, and why.
CONSUMED: dict[str, dict[str, str]] = {
    "CreateOrderRequest": {"idempotency_key": "replay semantics (test_emulator_rules)"},
    "UpdateOrderRequest": {"idempotency_key": "replay semantics (test_emulator_rules)",
                           "fields_to_clear": "deletes fields (test_fields_to_clear_*)"},
    "Order@UpdateOrder": {"version": "must equal the current version; the answer has +1"},
    "PayOrderRequest": {"idempotency_key": "replay", "order_version": "a version check",
                        "payment_ids": "the payments to capture (their tenders change)"},
    "CreatePaymentRequest": {"idempotency_key": "replay", "source_id": "the card nonce",
                             "autocomplete": "decides COMPLETED or APPROVED",
                             "verification_token": "buyer verification; not on a Payment"},
    "CompletePaymentRequest": {"version_token": "a version check (a new token comes back)"},
    "RefundPaymentRequest": {"idempotency_key": "replay",
                             "payment_version_token": "a version check"},
    "CancelPaymentByIdempotencyKeyRequest": {"idempotency_key": "names the payment to void"},
}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def writable(schema_name: str) -> list[str]:
    return [name for name, prop in SCHEMAS[schema_name]["properties"].items()
            if not prop.get("readOnly")]


def sample(schema: dict[str, Any], name: str = "") -> Any:
    """A small valid value for a schema, the way a client would fill it in."""
    target = resolve(schema)
    if target is SCHEMAS["Money"]:
        return dict(USD)
    if "enum" in target:
        return target["enum"][0]
    kind = target.get("type")
    if kind == "object" or "properties" in target:
        properties = target.get("properties") or {}
        if not properties:
            return {"key_1": "value"}
        value = {key: sample(properties[key], key) for key in target.get("required", [])}
        scalar = next((key for key, prop in properties.items()
                       if not prop.get("readOnly") and key not in value
                       and resolve(prop).get("type") in ("string", "integer", "boolean")
                       and "enum" not in resolve(prop)), None)
        if scalar is not None:
            value[scalar] = sample(properties[scalar], scalar)
        return value
    if kind == "array":
        return [sample(target["items"], name)]
    if kind == "integer":
        return max(1, int(target.get("minimum", 1)))
    if kind == "boolean":
        return True
    if name == "quantity":
        return "2"
    if name.endswith("_at"):
        return "2026-11-20T15:04:05Z"
    if name.endswith("_duration"):
        return "P1D"
    text = f"{name or 'v'}-1"
    return (text * 4)[:max(target.get("minLength", 1), min(len(text),
                                                            target.get("maxLength", 999)))]


def contains(actual: Any, sent: Any) -> bool:
    """`sent` round-tripped into `actual` (lists: each sent entry is in some returned one)."""
    if isinstance(sent, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(actual[k], v) for k, v in sent.items())
    if isinstance(sent, list):
        return isinstance(actual, list) and all(any(contains(a, s) for a in actual)
                                                for s in sent)
    return bool(actual == sent)


class World:
    """A fresh emulator and a client over it; helpers make the objects each call needs."""

    def __init__(self) -> None:
        self.emulator: Emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=2))
        self.merchant = self.emulator.merchants[0].merchant.id
        self.location = self.emulator.merchants[0].locations[0].id
        self.keys = itertools.count()

    def key(self) -> str:
        return f"key-{next(self.keys)}"

    def order(self) -> Any:
        return self.emulator.square.create_order(self.merchant, {
            "location_id": self.location, "line_items": [{
                "name": "Mug", "quantity": "1", "base_price_money": dict(USD)}],
            "fulfillments": [{"type": "PICKUP", "state": "PROPOSED"}]})

    def payment(self) -> dict[str, Any]:
        return self.emulator.square.create_payment(self.merchant, {
            "source_id": NONCE_OK, "amount_money": dict(USD), "idempotency_key": self.key(),
            "location_id": self.location})

    def send(self, method: str, path: str, body: dict[str, Any]) -> Any:
        with sync_http(self.emulator) as http:
            return http.request(method, path, headers=headers(self.emulator.token()),
                                content=json.dumps(body))


Request = tuple[str, str, dict[str, Any], Callable[[dict[str, Any]], Any]]


def _create_order(world: World, extra: dict[str, Any]) -> Request:
    order: dict[str, Any] = {"location_id": world.location, **extra}
    return "POST", "/v2/orders", {"idempotency_key": world.key(), "order": order}, \
        lambda r: r["order"]


def _nested(list_name: str, base: dict[str, Any]) -> Callable[..., Any]:
    def build(world: World, extra: dict[str, Any]) -> Request:
        entry = {**base, **extra}
        return "POST", "/v2/orders", {"idempotency_key": world.key(), "order": {
            "location_id": world.location, list_name: [entry]}}, \
            lambda r: r["order"][list_name]
    return build


def _update_order(world: World, extra: dict[str, Any]) -> Request:
    record = world.order()
    order: dict[str, Any] = {"location_id": world.location, "version": record.version, **extra}
    return "PUT", f"/v2/orders/{record.id}", {"idempotency_key": world.key(), "order": order}, \
        lambda r: r["order"]


def _create_payment(world: World, extra: dict[str, Any]) -> Request:
    body = {"source_id": NONCE_OK, "idempotency_key": world.key(), "amount_money": dict(USD),
            "location_id": world.location, **extra}
    return "POST", "/v2/payments", body, lambda r: r["payment"]


def _refund(world: World, extra: dict[str, Any]) -> Request:
    payment = world.payment()
    body = {"idempotency_key": world.key(), "payment_id": payment["id"],
            "amount_money": {"amount": 50, "currency": "USD"}, **extra}
    return "POST", "/v2/refunds", body, lambda r: r["refund"]


LINE_ITEM = {"name": "Mug", "quantity": "1", "base_price_money": dict(USD)}
CASES: dict[str, tuple[str, Callable[..., Request], dict[str, Any]]] = {
    # key -> (schema whose writable fields are sent, how to send one, values to send instead
    # of the schema's sample; None: the base request already carries the field, and it is
    # checked as it is; a callable: the value depends on the world)
    "CreateOrder.order": ("Order", _create_order, {
        "line_items": [dict(LINE_ITEM)], "state": "OPEN",
        "fulfillments": [{"type": "PICKUP", "state": "PROPOSED"}],
        "service_charges": [{"name": "Ship", "amount_money": dict(USD),
                             "calculation_phase": "TOTAL_PHASE"}],
        "location_id": None}),
    "CreateOrder.order.line_items[]": ("OrderLineItem", _nested("line_items", LINE_ITEM),
                                       {"quantity": "3"}),
    "CreateOrder.order.fulfillments[]": ("Fulfillment", _nested("fulfillments", {
        "type": "PICKUP"}), {"type": "PICKUP"}),
    "CreateOrder.order.service_charges[]": ("OrderServiceCharge", _nested("service_charges", {
        "name": "Ship", "amount_money": dict(USD), "calculation_phase": "TOTAL_PHASE"}), {}),
    "UpdateOrder.order": ("Order", _update_order, {
        "line_items": [dict(LINE_ITEM, name="Extra")], "state": "OPEN",
        "fulfillments": [{"type": "SHIPMENT", "state": "PROPOSED"}],
        "location_id": None, "version": None}),
    "CreatePayment": ("CreatePaymentRequest", _create_payment, {
        "location_id": None, "amount_money": None, "delay_action": "COMPLETE"}),
    "RefundPayment": ("RefundPaymentRequest", _refund, {
        "amount_money": {"amount": 40, "currency": "USD"}, "payment_id": None,
        "location_id": lambda w: w.location}),
}


def classified(case: str) -> dict[str, str]:
    schema = CASES[case][0]
    consumed = dict(CONSUMED.get(f"{schema}@{case.split('.')[0]}", {}))
    consumed.update(CONSUMED.get(schema, {}))
    return consumed


PARAMS = [(case, field) for case, (schema, _, _) in CASES.items() for field in writable(schema)]


@pytest.mark.parametrize(("case", "field"), PARAMS, ids=[f"{c}.{f}" for c, f in PARAMS])
def test_every_accepted_field_round_trips_or_is_refused(case: str, field: str) -> None:
    schema, build, overrides = CASES[case]
    if field in classified(case):
        return  # consumed: see CONSUMED for why, and the tests named there
    w = World()
    if field in overrides and overrides[field] is None:
        method, path, body, pick = build(w, {})
        sent = body[field] if field in body else body["order"][field]
    else:
        value = overrides.get(field, sample(SCHEMAS[schema]["properties"][field], field))
        sent = value(w) if callable(value) else value
        method, path, body, pick = build(w, {field: sent})
    response = w.send(method, path, body)
    document = response.json()
    if response.status_code >= 400:
        error = document["errors"][0]
        assert error["category"] == "INVALID_REQUEST_ERROR" and error["code"], document
        return
    assert response.status_code == 200, document
    resource = pick(document)
    if isinstance(resource, list):  # one entry was sent in a list
        assert any(contains(entry.get(field), sent) for entry in resource), (field, resource)
    else:
        assert contains(resource.get(field), sent), (field, sent, resource.get(field))


def test_every_request_field_is_classified() -> None:
    """A field that is neither sent by the test above nor listed as consumed fails here, so a
    re-vendored schema cannot add an unchecked field."""
    sent = {(CASES[c][0], c.split(".")[0]) for c in CASES}
    for schema_name in ("PayOrderRequest", "CompletePaymentRequest",
                        "CancelPaymentByIdempotencyKeyRequest"):
        assert set(writable(schema_name)) == set(CONSUMED[schema_name]), schema_name
    for request in ("CreateOrderRequest", "UpdateOrderRequest"):
        assert set(writable(request)) - set(CONSUMED[request]) == {"order"}
    assert ("Order", "CreateOrder") in sent and ("Order", "UpdateOrder") in sent


def test_a_refund_without_reason_has_none() -> None:
    w = World()
    method, path, body, pick = _refund(w, {})
    refund = pick(w.send(method, path, body).json())
    assert "reason" not in refund and refund["status"] == "PENDING"


def test_app_fee_money_is_kept_on_the_payment() -> None:
    w = World()
    method, path, body, pick = _create_payment(w, {"app_fee_money": {"amount": 7,
                                                                   "currency": "USD"}})
    payment = pick(w.send(method, path, body).json())
    fetched = w.send("GET", f"/v2/payments/{payment['id']}", {}).json()["payment"]
    assert payment["app_fee_money"] == fetched["app_fee_money"] == {"amount": 7,
                                                                   "currency": "USD"}


def _clear(w: World, record: Any, paths: list[str]) -> Any:
    return w.send("PUT", f"/v2/orders/{record.id}", {
        "idempotency_key": w.key(), "fields_to_clear": paths,
        "order": {"location_id": w.location, "version": record.version}})


def test_fields_to_clear_line_items_and_nested_paths() -> None:
    w = World()
    record = w.emulator.square.create_order(w.merchant, {
        "location_id": w.location, "metadata": {"a": "1", "b": "2"},
        "line_items": [dict(LINE_ITEM, uid="li-1", note="gift wrap"),
                       dict(LINE_ITEM, uid="li-2", metadata={"sku": "9"})],
        "fulfillments": [{"uid": "f-1", "type": "PICKUP",
                          "pickup_details": {"note": "side door", "recipient": {
                              "display_name": "Ada"}}}]})
    response = _clear(w, record, ["line_items[li-1].note", "line_items[li-2].metadata.sku",
                                  "fulfillments[f-1].pickup_details.note", "metadata.a",
                                  "total_money"])
    assert response.status_code == 200, response.json()
    order = response.json()["order"]
    first, second = order["line_items"]
    assert "note" not in first and second.get("metadata", {}) == {}
    assert "note" not in order["fulfillments"][0]["pickup_details"]
    assert order["fulfillments"][0]["pickup_details"]["recipient"] == {"display_name": "Ada"}
    assert order["metadata"] == {"b": "2"}
    assert order["total_money"]["amount"] == 200  # computed: clearing it is ignored
    response = _clear(w, w.emulator.square.orders[record.id], ["line_items[li-1]"])
    assert response.status_code == 200, response.json()
    order = response.json()["order"]
    assert [li["uid"] for li in order["line_items"]] == ["li-2"]
    assert order["total_money"]["amount"] == order["net_amount_due_money"]["amount"] == 100


def test_fields_to_clear_refuses_unknown_uids_and_paid_line_items() -> None:
    w = World()
    record = w.order()
    response = _clear(w, record, ["line_items[nope]"])
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "fields_to_clear[0]"
    uid = record.doc["line_items"][0]["uid"]
    w.emulator.square.create_payment(w.merchant, {
        "source_id": NONCE_OK, "amount_money": dict(USD), "order_id": record.id,
        "idempotency_key": w.key()})
    before = record.copy_doc()
    refused = _clear(w, record, [f"line_items[{uid}]"])
    assert refused.status_code == 400
    assert "finalized tenders" in refused.json()["errors"][0]["detail"]
    assert record.copy_doc() == before
