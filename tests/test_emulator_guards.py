"""The emulator is never more lenient than Square and never hides its own bugs: internal errors
are recorded (and fail the test, see conftest), strict readings refuse what Square may refuse,
bodies are bounded, the steering routes need a flag."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from services.emulator import FaultPlan, SeedConfig
from services.emulator.app import MAX_BODY_BYTES
from services.emulator.state import NONCE_OK
from tests.conftest import Emulator, async_http, make_emulator
from tests.test_emulator_rules import completion_body, error_of, headers, put, snapshot

SMALL = SeedConfig(merchants=1, orders_per_location=3)


def proposed_paid_order(emulator: Emulator) -> Any:
    """A Square Online order paid at checkout, its only fulfillment still PROPOSED (§4)."""
    merchant = emulator.merchants[0]
    record = emulator.square.create_order(merchant.merchant.id, {
        "location_id": merchant.locations[0].id, "source": {"name": "Square Online"},
        "line_items": [{"name": "Print", "quantity": "1",
                        "base_price_money": {"amount": 4200, "currency": "USD"}}],
        "fulfillments": [{"type": "SHIPMENT", "state": "PROPOSED"}]})
    emulator.square.create_payment(merchant.merchant.id, {
        "source_id": NONCE_OK, "order_id": record.id, "idempotency_key": f"pay-{record.id}",
        "amount_money": {"amount": 4200, "currency": "USD"}})
    return record


# ---------------------------------------------------------------- internal errors

async def test_an_internal_error_is_recorded_but_an_injected_fault_is_not() -> None:
    emulator = make_emulator(SMALL, FaultPlan(server_error_rate=1.0, operations=["GetPayment"]))
    async with async_http(emulator) as http:
        injected = await http.get("/v2/payments/x", headers=headers(emulator.token()))
        assert injected.status_code == 503
        assert emulator.app.internal_errors == []

        def broken(*args: Any) -> Any:
            raise KeyError("version")
        emulator.square.update_order = broken  # type: ignore[method-assign]
        record = proposed_paid_order(emulator)
        response = await http.put(f"/v2/orders/{record.id}", headers=headers(emulator.token()),
                                  content=json.dumps(completion_body(record)))
    assert response.status_code == 500 and "KeyError" not in response.text
    assert len(emulator.app.internal_errors) == 1
    assert "UpdateOrder" in emulator.app.internal_errors[0]
    assert "KeyError" in emulator.app.internal_errors[0]
    emulator.app.internal_errors.clear()  # expected here; the autouse fixture checks the rest


# ---------------------------------------------------------------- strict readings

async def test_lenient_reading_lets_proposed_jump_to_completed() -> None:
    emulator = make_emulator(SMALL)
    record = proposed_paid_order(emulator)
    response = await put(emulator, record, completion_body(record))
    assert response.status_code == 200 and response.json()["order"]["state"] == "COMPLETED"


async def test_strict_reading_refuses_proposed_to_completed() -> None:
    emulator = make_emulator(SMALL, strict=True)
    record = proposed_paid_order(emulator)
    before = snapshot(record)
    response = await put(emulator, record, completion_body(record))
    assert response.status_code == 400
    error = error_of(response)
    assert (error["category"], error["code"]) == ("INVALID_REQUEST_ERROR", "BAD_REQUEST")
    assert error["field"] == "order.fulfillments[0].state"
    assert snapshot(record) == before
    # Accepted first (RESERVED), it completes.
    accepted = await put(emulator, record, {"idempotency_key": "accept", "order": {
        "location_id": record.location_id, "version": record.version,
        "fulfillments": [{"uid": record.doc["fulfillments"][0]["uid"], "state": "RESERVED"}]}})
    assert accepted.status_code == 200
    done = await put(emulator, record, completion_body(record, key="k-2"))
    assert done.status_code == 200 and done.json()["order"]["state"] == "COMPLETED"


async def test_strict_reading_keyless_or_reused_key_update_changes_nothing() -> None:
    emulator = make_emulator(SMALL, strict=True)
    record = proposed_paid_order(emulator)
    accept = {"location_id": record.location_id, "version": record.version,
              "fulfillments": [{"uid": record.doc["fulfillments"][0]["uid"],
                                "state": "RESERVED"}]}
    before = snapshot(record)
    keyless = await put(emulator, record, {"order": accept})
    assert keyless.status_code == 200 and keyless.json()["order"]["version"] == record.version
    assert snapshot(record) == before
    first = await put(emulator, record, {"idempotency_key": "same", "order": accept})
    assert first.status_code == 200 and first.json()["order"]["version"] == accept["version"] + 1
    after_first = snapshot(record)
    other = await put(emulator, record, {"idempotency_key": "same", "order": dict(
        accept, version=record.version, reference_id="changed")})
    assert other.status_code == 200
    assert other.json()["order"].get("reference_id") != "changed"
    assert snapshot(record) == after_first


async def test_strict_rate_limit_has_no_retry_after() -> None:
    for strict in (False, True):
        emulator = make_emulator(SMALL, FaultPlan(rate_limit_rps=2), strict=strict)
        async with async_http(emulator) as http:
            answers = [await http.get("/v2/locations", headers=headers(emulator.token()))
                       for _ in range(6)]
        limited = [a for a in answers if a.status_code == 429]
        assert limited
        assert all(("retry-after" in a.headers) is (not strict) for a in limited)


# ---------------------------------------------------------------- request size, steering

@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
async def test_bodies_over_the_limit_are_refused(declared: bool) -> None:
    emulator = make_emulator(SMALL)
    record = proposed_paid_order(emulator)
    before = snapshot(record)
    body = completion_body(record)
    body["order"]["reference_id"] = "x" * (MAX_BODY_BYTES + 1)
    content = json.dumps(body).encode()

    async def chunks() -> Any:
        for start in range(0, len(content), 65536):
            yield content[start:start + 65536]

    # A plain client: the recording one reads request bodies, which a stream does not allow.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app.asgi()),
                                 base_url=emulator.base_url) as http:
        response = await http.put(f"/v2/orders/{record.id}", headers=headers(emulator.token()),
                                  content=content if declared else chunks())
    assert response.status_code == 413
    error = error_of(response)
    assert (error["category"], error["code"]) == ("INVALID_REQUEST_ERROR",
                                                  "REQUEST_ENTITY_TOO_LARGE")
    assert snapshot(record) == before
    # Just under the limit is read (and refused for its own reasons, not its size).
    body["order"]["reference_id"] = "x" * 1000
    async with async_http(emulator) as http:
        ok = await http.put(f"/v2/orders/{record.id}", headers=headers(emulator.token()),
                            content=json.dumps(body))
    assert ok.status_code != 413


async def test_steering_routes_need_the_flag() -> None:
    for steering in (False, True):
        emulator = make_emulator(SMALL, steering=steering)
        async with async_http(emulator) as http:
            response = await http.post(f"/_emulator/orders/{next(iter(emulator.square.orders))}"
                                       "/bump")
        assert (response.status_code == 200) is steering


def test_serve_has_a_steering_flag() -> None:
    from console.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["emulator", "serve"]).steering is False
    assert parser.parse_args(["emulator", "serve", "--steering"]).steering is True
    assert parser.parse_args(["emulator", "serve", "--strict"]).strict is True


async def test_strict_reading_of_versions_terminal_orders_and_tokens() -> None:
    for strict in (False, True):
        emulator = make_emulator(SMALL, strict=strict)
        record = proposed_paid_order(emulator)
        stale = await put(emulator, record, completion_body(record, version=record.version - 1))
        assert (stale.status_code, error_of(stale)["code"]) == (
            (409, "CONFLICT") if strict else (400, "VERSION_MISMATCH"))
        emulator.square.update_order(emulator.merchants[0].merchant.id, record.id, {
            "order": {"location_id": record.location_id, "version": record.version,
                      "state": "CANCELED"}})
        terminal = await put(emulator, record, completion_body(record, key="k-9"))
        assert error_of(terminal)["code"] == ("VERSION_MISMATCH" if strict else "BAD_REQUEST")
        unknown = await put(emulator, record, completion_body(record), token="no-such-token")
        assert unknown.status_code == (403 if strict else 401)
        assert error_of(unknown)["code"] == "UNAUTHORIZED"
