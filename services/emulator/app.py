"""The emulator's HTTP face: an ASGI app speaking Square's paths, JSON and error envelope.

Serve it in-process with `httpx.ASGITransport(app)` or over loopback with uvicorn
(`serve.py`). Every request goes through `_handle`, in Square's order: latency, authentication
and scope, rate limit, injected faults, JSON and schema checks, then the operation itself.
Steering routes under `/_emulator/` (faults, token revocation, version bumps) exist only when
the app is built with `steering=True` (`emulator serve --steering`): a Square has no back door.

An unexpected exception inside the emulator still answers 500 (Square's envelope, no stack trace),
but it is also recorded in `internal_errors` and logged: the product retries a 500 as transient,
so without the record an emulator bug would look like a Square outage and tests would stay green
(tests/conftest.py fails any test during which one occurred). Injected faults are `SquareError`s
and are not recorded.

`strict=True` takes the strictest reading of the points square-api.md leaves UNCONFIRMED where
the default reading is the lenient one (see `EmulatorApp.strict`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

import jsonschema_rs
import orjson
from openapi_schema_validator import OAS30Validator
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from services.emulator.faults import FaultPlan, TokenRateLimiter
from services.emulator.state import EmulatedSquare, OrderRecord, SquareError, parse_time, rfc3339

__all__ = ["MAX_BODY_BYTES", "EmulatorApp", "build_app"]

log = logging.getLogger("services.emulator")

# Square publishes no general request-size limit (its ErrorCode enum has REQUEST_ENTITY_TOO_LARGE,
# with no figure). 1 MiB is far above any body these endpoints take (100 order ids, a sparse
# order) and bounds what one request can make the emulator parse and hash.
MAX_BODY_BYTES = 1024 * 1024

Handler = Callable[[Request, str, Any], Awaitable[Any]]


@dataclass
class Operation:
    name: str
    scopes: tuple[str, ...]
    request_schema: str | None
    writes: bool
    handler: Handler


@cache
def _openapi() -> dict[str, Any]:
    text = resources.files("services.emulator").joinpath(
        "openapi/square-openapi-subset.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


def _schema_root(schema_name: str) -> dict[str, Any]:
    return {"components": _openapi()["components"],
            "$ref": f"#/components/schemas/{schema_name}"}


@cache
def _validator(schema_name: str) -> OAS30Validator:
    return OAS30Validator(_schema_root(schema_name))


@cache
def _strict_prefilter(schema_name: str) -> jsonschema_rs.Validator:
    """The same schema under Draft 4 rules, compiled in Rust: about 200x faster than the
    OpenAPI validator. It is stricter, never looser (`nullable` is not a Draft 4 keyword, so
    it refuses every null; Square Online's extra enum values too): a body it passes is a
    body the OpenAPI check passes (tests/test_emulator_schema_prefilter.py checks that over
    generated bodies), and anything else goes through the full check, which decides."""
    return jsonschema_rs.Draft4Validator(_schema_root(schema_name))


# Fulfillment types Square Online returns although the published enum lacks them (§2 rule 6).
_EXTRA_ENUM_VALUES = {"DIGITAL", "IN_STORE"}
_TYPE_CODES = {"string": "EXPECTED_STRING", "integer": "EXPECTED_INTEGER",
               "boolean": "EXPECTED_BOOLEAN", "array": "EXPECTED_ARRAY",
               "object": "EXPECTED_OBJECT", "number": "EXPECTED_FLOAT"}


def _field_path(parts: list[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def check_request_shape(schema_name: str, body: Any) -> None:
    """Refuse a body that does not fit Square's published request shape, as Square does."""
    if _strict_prefilter(schema_name).is_valid(body):
        return
    for error in _validator(schema_name).iter_errors(body):
        path = list(error.absolute_path)
        keyword = error.validator
        if keyword == "enum" and error.instance in _EXTRA_ENUM_VALUES:
            continue
        if keyword == "required":
            missing = next((name for name in error.validator_value
                            if isinstance(error.instance, dict) and name not in error.instance),
                           "")
            raise SquareError(400, "INVALID_REQUEST_ERROR", "MISSING_REQUIRED_PARAMETER",
                              f"Field must be set: {missing}.", _field_path([*path, missing]))
        code = {"type": _TYPE_CODES.get(str(error.validator_value), "INVALID_VALUE"),
                "enum": "INVALID_ENUM_VALUE", "maxItems": "ARRAY_LENGTH_TOO_LONG",
                "minItems": "ARRAY_LENGTH_TOO_SHORT", "maxLength": "VALUE_TOO_LONG",
                "minLength": "VALUE_TOO_SHORT", "maximum": "VALUE_TOO_HIGH",
                "minimum": "VALUE_TOO_LOW"}.get(str(keyword), "INVALID_VALUE")
        raise SquareError(400, "INVALID_REQUEST_ERROR", code, error.message[:200],
                          _field_path(path) or None)


# Request fields of Square's schema that the emulator does not implement, per operation and
# place in the body ("" is the top level, "order.line_items[]" every line item). Sending one is
# refused with Square's error envelope rather than accepted and silently dropped; fields not in
# the schema at all are ignored, as Square ignores them (square-api.md §1.3).
_LINE_ITEM_UNIMPLEMENTED = frozenset({
    "applied_discounts", "applied_service_charges", "applied_taxes", "catalog_object_id",
    "catalog_version", "modifiers", "pricing_blocklists", "quantity_unit"})
_ORDER_UNIMPLEMENTED = frozenset({"discounts", "taxes", "pricing_options"})
UNIMPLEMENTED: dict[str, dict[str, frozenset[str]]] = {
    "CreateOrder": {
        "order": _ORDER_UNIMPLEMENTED,
        "order.line_items[]": _LINE_ITEM_UNIMPLEMENTED,
        "order.service_charges[]": frozenset({
            "applied_taxes", "catalog_object_id", "catalog_version", "percentage", "scope",
            "taxable", "treatment_type"}),
    },
    "UpdateOrder": {
        "order": _ORDER_UNIMPLEMENTED | {"service_charges", "source"},
        "order.line_items[]": _LINE_ITEM_UNIMPLEMENTED,
    },
    "CreatePayment": {"": frozenset({
        "accept_partial_authorization", "buyer_phone_number", "cash_details",
        "customer_details", "external_details", "offline_payment_details", "tip_money"})},
    "RefundPayment": {"": frozenset({
        "cash_details", "customer_id", "destination_id", "external_details", "unlinked"})},
}


def refuse_unimplemented(operation: str, body: dict[str, Any]) -> None:
    for place, names in UNIMPLEMENTED.get(operation, {}).items():
        nodes: list[tuple[str, Any]] = [("", body)]
        for part in place.split(".") if place else []:
            many = part.endswith("[]")
            name = part.removesuffix("[]")
            found: list[tuple[str, Any]] = []
            for path, node in nodes:
                child = node.get(name) if isinstance(node, dict) else None
                prefix = f"{path}.{name}" if path else name
                if many and isinstance(child, list):
                    found += [(f"{prefix}[{i}]", c) for i, c in enumerate(child)]
                elif not many and child is not None:
                    found.append((prefix, child))
            nodes = found
        for path, node in nodes:
            for name in sorted(names & set(node) if isinstance(node, dict) else ()):
                if node[name] is None:
                    continue
                where = f"{path}.{name}" if path else name
                raise SquareError(400, "INVALID_REQUEST_ERROR", "BAD_REQUEST",
                                  f"`{where}` is not implemented by this Square emulator; "
                                  "leave it out.", where)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers,
                    media_type="application/json")


def _orders_payload(key: str, records: list[OrderRecord], extra: dict[str, Any]) -> bytes:
    """Join the orders' settled JSON bytes instead of re-encoding each order."""
    parts = [b"{"]
    if records:
        parts += [b'"', key.encode(), b'":[', b",".join(r.json for r in records), b"]"]
    for name, value in extra.items():
        if value is not None:
            parts += [b"," if len(parts) > 1 else b"",
                      json.dumps(name).encode(), b":", json.dumps(value).encode()]
    parts.append(b"}")
    return b"".join(parts)


@dataclass
class EmulatorApp:
    """Owns the emulated Square, the fault plan and the ASGI app built over them."""

    square: EmulatedSquare
    faults: FaultPlan = field(default_factory=FaultPlan)
    base_url: str = "http://emulator.invalid"
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    limiter: TokenRateLimiter | None = None
    requests_seen: int = 0
    # Strictest readings of square-api.md's UNCONFIRMED points (lenient by default where the
    # sources lean that way):
    # - a fulfillment cannot jump from PROPOSED straight to COMPLETED (§2 rule 2): 400;
    # - UpdateOrder without an idempotency key answers 200 and changes nothing (§1.3, §14);
    # - a reused idempotency key with another body answers 200 and changes nothing (§14);
    # - 429 comes without Retry-After (§8, §14);
    # - a stale version is 409 CONFLICT, not 400 VERSION_MISMATCH (§1.3, §14);
    # - updating a COMPLETED or CANCELED order is VERSION_MISMATCH, not BAD_REQUEST (§14);
    # - unknown, expired and revoked tokens are 403, not 401 (§7, §14).
    strict: bool = False
    steering: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    internal_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.set_faults(self.faults)
        self.square.strict = self.strict

    def set_faults(self, plan: FaultPlan) -> None:
        self.faults = plan
        self.rng = random.Random(plan.seed)
        self.limiter = TokenRateLimiter(plan.rate_limit_rps) if plan.rate_limit_rps else None

    # ------------------------------------------------------------------ the pipeline
    async def _handle(self, operation: Operation, request: Request) -> Response:
        self.requests_seen += 1
        plan = self.faults
        try:
            if plan.latency_ms or plan.jitter_ms:
                await asyncio.sleep((plan.latency_ms + self.rng.random() * plan.jitter_ms) / 1000)
            token = self.square.authenticate(request.headers.get("authorization"),
                                             operation.scopes)
            if self.limiter is not None:
                wait = self.limiter.retry_after(token.token)
                if wait is not None:
                    raise SquareError(429, "RATE_LIMIT_ERROR", "RATE_LIMITED",
                                      "This request was rate limited. Please retry later.",
                                      headers={} if self.strict else {"Retry-After": str(wait)})
            faulty = plan.applies_to(operation.name)
            if faulty and plan.version_bump_rate and self.rng.random() < plan.version_bump_rate:
                self._bump_for(token.merchant_id)
            if faulty and plan.hang_rate and self.rng.random() < plan.hang_rate:
                await asyncio.sleep(plan.hang_seconds)
                raise SquareError(504, "API_ERROR", "GATEWAY_TIMEOUT", "The request timed out.")
            if faulty and plan.server_error_rate and self.rng.random() < plan.server_error_rate:
                raise SquareError(503, "API_ERROR", "SERVICE_UNAVAILABLE",
                                  "Square is temporarily unavailable. Retry later.")
            body: Any = None
            if operation.request_schema is not None:
                raw = await self._bounded_body(request)
                try:
                    body = orjson.loads(raw) if raw else {}
                except orjson.JSONDecodeError:
                    raise SquareError(400, "INVALID_REQUEST_ERROR", "EXPECTED_JSON_BODY",
                                      "The request body is not valid JSON.") from None
                if not isinstance(body, dict):
                    raise SquareError(400, "INVALID_REQUEST_ERROR", "EXPECTED_OBJECT",
                                      "The request body must be a JSON object.")
                check_request_shape(operation.request_schema, body)
                refuse_unimplemented(operation.name, body)
            if (operation.name == "UpdateOrder" and faulty and plan.noop_update_rate
                    and self.rng.random() < plan.noop_update_rate):
                # The looser reading of UpdateOrder: a 200 that changed nothing.
                record = self.square.order_of(token.merchant_id,
                                              request.path_params["order_id"])
                return Response(b'{"order":' + record.json + b"}",
                                media_type="application/json")
            result = await operation.handler(request, token.merchant_id, body)
            if operation.writes and faulty and plan.lost_response_rate and \
                    self.rng.random() < plan.lost_response_rate:
                # The change is applied (and remembered under its idempotency key); the answer
                # never reaches the client.
                if plan.lost_response_mode == "hang":
                    await asyncio.sleep(plan.hang_seconds)
                raise SquareError(500, "API_ERROR", "INTERNAL_SERVER_ERROR",
                                  "An internal error occurred.")
            if isinstance(result, Response):
                return result
            return _json(result)
        except SquareError as error:
            return _json(error.envelope(), error.status, error.headers)
        except ClientDisconnect:  # the client went away mid-request (e.g. it was killed)
            return Response(status_code=499)
        except Exception:  # never a stack trace to the client; but never hidden either
            self.internal_errors.append(f"{operation.name}: {traceback.format_exc()}")
            log.exception("emulator internal error in %s", operation.name)
            internal = SquareError(500, "API_ERROR", "INTERNAL_SERVER_ERROR",
                                   "An internal error occurred.")
            return _json(internal.envelope(), 500)

    async def _bounded_body(self, request: Request) -> bytes:
        too_large = SquareError(413, "INVALID_REQUEST_ERROR", "REQUEST_ENTITY_TOO_LARGE",
                                f"The request body exceeds {self.max_body_bytes} bytes.")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # stop reading as soon as the limit is passed
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _bump_for(self, merchant_id: str) -> None:
        orders = [r for r in self.square.orders_by_merchant.get(merchant_id, ())
                  if r.state == "OPEN" and r.version is not None]
        if orders:
            self.square.touch(self.rng.choice(orders))

    def _idempotent(self, merchant_id: str, operation: str, key: str | None, body: Any,
                    apply: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self.square.lock:
            stored, digest = self.square.replay(merchant_id, operation, key, body)
            if stored is not None:
                return stored
            response = apply()
            self.square.remember(merchant_id, operation, key, digest, response)
            return response

    # ------------------------------------------------------------------ operations
    async def list_locations(self, request: Request, merchant_id: str, body: Any) -> Any:
        return {"locations": [loc.to_json() for loc in
                              self.square.merchant_locations(merchant_id)]}

    async def retrieve_merchant(self, request: Request, merchant_id: str, body: Any) -> Any:
        wanted = request.path_params["merchant_id"]
        if wanted not in ("me", merchant_id):
            raise SquareError(404, "INVALID_REQUEST_ERROR", "NOT_FOUND",
                              f"Merchant `{wanted}` not found.", "merchant_id")
        return {"merchant": self.square.merchants[merchant_id].to_json()}

    async def list_merchants(self, request: Request, merchant_id: str, body: Any) -> Any:
        return {"merchant": [self.square.merchants[merchant_id].to_json()]}

    async def token_status(self, request: Request, merchant_id: str, body: Any) -> Any:
        token = self.square.tokens[request.headers["authorization"][len("Bearer "):].strip()]
        return {"scopes": sorted(token.scopes), "expires_at": rfc3339(token.expires_at),
                "client_id": token.client_id, "merchant_id": token.merchant_id}

    async def create_order(self, request: Request, merchant_id: str, body: Any) -> Any:
        return self._idempotent(
            merchant_id, "CreateOrder", body.get("idempotency_key"), body,
            lambda: {"order": self.square.create_order(merchant_id, body["order"]).copy_doc()})

    async def calculate_order(self, request: Request, merchant_id: str, body: Any) -> Any:
        doc = self.square.price_order(merchant_id, body["order"])
        doc.pop("id", None)
        return {"order": doc}

    async def retrieve_order(self, request: Request, merchant_id: str, body: Any) -> Any:
        record = self.square.order_of(merchant_id, request.path_params["order_id"])
        return Response(b'{"order":' + record.json + b"}", media_type="application/json")

    async def batch_retrieve(self, request: Request, merchant_id: str, body: Any) -> Any:
        ids = body["order_ids"]
        if len(ids) > 100:
            raise SquareError(400, "INVALID_REQUEST_ERROR", "ARRAY_LENGTH_TOO_LONG",
                              "At most 100 order IDs per request.", "order_ids")
        location_id = body.get("location_id")
        found = []
        for order_id in ids:
            record = self.square.orders.get(order_id)
            if record is None or record.merchant_id != merchant_id:
                continue
            if location_id and record.location_id != location_id:
                continue
            found.append(record)
        return Response(_orders_payload("orders", found, {}), media_type="application/json")

    async def search_orders(self, request: Request, merchant_id: str, body: Any) -> Any:
        page, cursor = self.square.search_orders(merchant_id, body)
        if body.get("return_entries"):
            entries = [{"order_id": r.id, "location_id": r.location_id,
                        **({"version": r.version} if r.version is not None else {})}
                       for r in page]
            payload: dict[str, Any] = {"order_entries": entries} if entries else {}
            if cursor:
                payload["cursor"] = cursor
            return payload
        return Response(_orders_payload("orders", page, {"cursor": cursor}),
                        media_type="application/json")

    async def update_order(self, request: Request, merchant_id: str, body: Any) -> Any:
        order_id = request.path_params["order_id"]
        if self.strict:
            # The stricter reading of §1.3: without a key, or reusing one with another body,
            # UpdateOrder answers 200 with the order unchanged.
            unchanged = {"order": self.square.order_of(merchant_id, order_id).copy_doc()}
            if not body.get("idempotency_key"):
                return unchanged
            try:
                self.square.replay(merchant_id, f"UpdateOrder:{order_id}",
                                   body["idempotency_key"], body)
            except SquareError as error:
                if error.code == "IDEMPOTENCY_KEY_REUSED":
                    return unchanged
                raise
        return self._idempotent(
            merchant_id, f"UpdateOrder:{order_id}", body.get("idempotency_key"), body,
            lambda: {"order": self.square.update_order(merchant_id, order_id, body).copy_doc()})

    async def pay_order(self, request: Request, merchant_id: str, body: Any) -> Any:
        order_id = request.path_params["order_id"]
        return self._idempotent(
            merchant_id, f"PayOrder:{order_id}", body.get("idempotency_key"), body,
            lambda: {"order": self.square.pay_order(merchant_id, order_id, body).copy_doc()})

    async def create_payment(self, request: Request, merchant_id: str, body: Any) -> Any:
        return self._idempotent(
            merchant_id, "CreatePayment", body.get("idempotency_key"), body,
            lambda: {"payment": dict(self.square.create_payment(merchant_id, body))})

    async def get_payment(self, request: Request, merchant_id: str, body: Any) -> Any:
        return {"payment": self.square.payment_of(merchant_id,
                                                  request.path_params["payment_id"])}

    async def complete_payment(self, request: Request, merchant_id: str, body: Any) -> Any:
        payment_id = request.path_params["payment_id"]
        return {"payment": dict(self.square.complete_payment(merchant_id, payment_id,
                                                             body.get("version_token")))}

    async def cancel_payment(self, request: Request, merchant_id: str, body: Any) -> Any:
        return {"payment": self.square.cancel_payment(merchant_id,
                                                      request.path_params["payment_id"])}

    async def cancel_payment_by_key(self, request: Request, merchant_id: str, body: Any) -> Any:
        """Voids the payment a CreatePayment with this key made; no such payment is no error."""
        with self.square.lock:
            stored = self.square.idempotency.get((merchant_id, "CreatePayment",
                                                  body["idempotency_key"]))
            if stored is not None:
                payment = self.square.payment_of(merchant_id, stored.response["payment"]["id"])
                if payment["status"] != "CANCELED":
                    self.square.cancel_payment(merchant_id, payment["id"])
        return {}

    async def list_payments(self, request: Request, merchant_id: str, body: Any) -> Any:
        page, cursor = self.square.list_payments(merchant_id, dict(request.query_params))
        return {**({"payments": page} if page else {}), **({"cursor": cursor} if cursor else {})}

    async def get_refund(self, request: Request, merchant_id: str, body: Any) -> Any:
        return {"refund": self.square.refund_of(merchant_id, request.path_params["refund_id"])}

    async def list_refunds(self, request: Request, merchant_id: str, body: Any) -> Any:
        page, cursor = self.square.list_refunds(merchant_id, dict(request.query_params))
        return {**({"refunds": page} if page else {}), **({"cursor": cursor} if cursor else {})}

    async def refund_payment(self, request: Request, merchant_id: str, body: Any) -> Any:
        return self._idempotent(
            merchant_id, "RefundPayment", body.get("idempotency_key"), body,
            lambda: {"refund": self.square.refund_payment(merchant_id, body)})

    # ------------------------------------------------------------------ admin
    async def admin_faults(self, request: Request) -> Response:
        if request.method == "PUT":
            try:
                self.set_faults(FaultPlan.model_validate_json(await request.body()))
            except ValueError as error:
                return _json({"errors": [{"category": "INVALID_REQUEST_ERROR",
                                          "code": "BAD_REQUEST", "detail": str(error)[:300]}]},
                             400)
        return _json(self.faults.model_dump())

    async def admin_revoke(self, request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        token = body.get("access_token")
        if token not in self.square.tokens:
            return _json({"errors": [{"category": "INVALID_REQUEST_ERROR", "code": "NOT_FOUND",
                                      "detail": "Unknown token."}]}, 404)
        at = parse_time(body["at"], "at") if body.get("at") else None
        self.square.revoke_token(token, at)
        return _json({"revoked_at": rfc3339(self.square.tokens[token].revoked_at
                                            or datetime.now())})

    async def admin_bump(self, request: Request) -> Response:
        record = self.square.orders.get(request.path_params["order_id"])
        if record is None:
            return _json({"errors": [{"category": "INVALID_REQUEST_ERROR", "code": "NOT_FOUND",
                                      "detail": "Unknown order."}]}, 404)
        self.square.touch(record)
        return _json({"version": record.version})

    async def not_found(self, request: Request) -> Response:
        return _json({"errors": [{"category": "INVALID_REQUEST_ERROR", "code": "NOT_FOUND",
                                  "detail": f"Resource not found: {request.method} "
                                            f"{request.url.path}"}]}, 404)

    async def method_not_allowed(self, request: Request) -> Response:
        return _json({"errors": [{"category": "INVALID_REQUEST_ERROR",
                                  "code": "METHOD_NOT_ALLOWED",
                                  "detail": f"{request.method} is not allowed on "
                                            f"{request.url.path}."}]}, 405)

    # ------------------------------------------------------------------ wiring
    def operations(self) -> list[tuple[str, str, Operation]]:
        def op(name: str, scopes: tuple[str, ...], schema: str | None, handler: Handler,
               writes: bool = False) -> Operation:
            return Operation(name, scopes, schema, writes, handler)

        read_profile = ("MERCHANT_PROFILE_READ",)
        return [
            ("GET", "/v2/locations", op("ListLocations", read_profile, None,
                                        self.list_locations)),
            ("GET", "/v2/merchants", op("ListMerchants", read_profile, None,
                                        self.list_merchants)),
            ("GET", "/v2/merchants/{merchant_id}", op("RetrieveMerchant", read_profile, None,
                                                      self.retrieve_merchant)),
            ("POST", "/oauth2/token/status", op("RetrieveTokenStatus", (), None,
                                                self.token_status)),
            ("POST", "/v2/orders", op("CreateOrder", ("ORDERS_WRITE",), "CreateOrderRequest",
                                      self.create_order, writes=True)),
            ("POST", "/v2/orders/calculate", op("CalculateOrder", (), "CalculateOrderRequest",
                                                self.calculate_order)),
            ("POST", "/v2/orders/batch-retrieve", op("BatchRetrieveOrders", ("ORDERS_READ",),
                                                     "BatchRetrieveOrdersRequest",
                                                     self.batch_retrieve)),
            ("POST", "/v2/orders/search", op("SearchOrders", ("ORDERS_READ",),
                                             "SearchOrdersRequest", self.search_orders)),
            ("GET", "/v2/orders/{order_id}", op("RetrieveOrder", ("ORDERS_READ",), None,
                                                self.retrieve_order)),
            ("PUT", "/v2/orders/{order_id}", op("UpdateOrder", ("ORDERS_WRITE",),
                                                "UpdateOrderRequest", self.update_order,
                                                writes=True)),
            ("POST", "/v2/orders/{order_id}/pay", op("PayOrder", ("PAYMENTS_WRITE",
                                                                  "ORDERS_WRITE"),
                                                     "PayOrderRequest", self.pay_order,
                                                     writes=True)),
            ("POST", "/v2/payments", op("CreatePayment", ("PAYMENTS_WRITE",),
                                        "CreatePaymentRequest", self.create_payment,
                                        writes=True)),
            ("GET", "/v2/payments/{payment_id}", op("GetPayment", ("PAYMENTS_READ",), None,
                                                    self.get_payment)),
            ("POST", "/v2/payments/{payment_id}/complete", op(
                "CompletePayment", ("PAYMENTS_WRITE",), "CompletePaymentRequest",
                self.complete_payment, writes=True)),
            ("POST", "/v2/refunds", op("RefundPayment", ("PAYMENTS_WRITE",),
                                       "RefundPaymentRequest", self.refund_payment,
                                       writes=True)),
            ("GET", "/v2/payments", op("ListPayments", ("PAYMENTS_READ",), None,
                                       self.list_payments)),
            ("POST", "/v2/payments/cancel", op(
                "CancelPaymentByIdempotencyKey", ("PAYMENTS_WRITE",),
                "CancelPaymentByIdempotencyKeyRequest", self.cancel_payment_by_key,
                writes=True)),
            ("POST", "/v2/payments/{payment_id}/cancel", op(
                "CancelPayment", ("PAYMENTS_WRITE",), None, self.cancel_payment, writes=True)),
            ("GET", "/v2/refunds", op("ListPaymentRefunds", ("PAYMENTS_READ",), None,
                                      self.list_refunds)),
            ("GET", "/v2/refunds/{refund_id}", op("GetPaymentRefund", ("PAYMENTS_READ",), None,
                                                  self.get_refund)),
        ]

    def asgi(self) -> Starlette:
        by_path: dict[str, dict[str, Operation]] = {}
        for method, path, operation in self.operations():
            by_path.setdefault(path, {})[method] = operation

        def endpoint(methods: dict[str, Operation]) -> Callable[[Request], Awaitable[Response]]:
            async def run(request: Request) -> Response:
                operation = methods.get(request.method)
                if operation is None:
                    return await self.method_not_allowed(request)
                return await self._handle(operation, request)
            return run

        all_methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        # Literal paths first, so /v2/payments/cancel is not taken for a payment id.
        routes = [Route(path, endpoint(methods), methods=all_methods)
                  for path, methods in sorted(by_path.items(), key=lambda p: p[0].count("{"))]
        if self.steering:
            routes += [
                Route("/_emulator/faults", self.admin_faults, methods=["GET", "PUT"]),
                Route("/_emulator/tokens/revoke", self.admin_revoke, methods=["POST"]),
                Route("/_emulator/orders/{order_id}/bump", self.admin_bump, methods=["POST"]),
            ]
        routes.append(Route("/{path:path}", self.not_found, methods=all_methods))
        return Starlette(routes=routes)


def build_app(square: EmulatedSquare, faults: FaultPlan | None = None, *, strict: bool = False,
              steering: bool = False) -> EmulatorApp:
    return EmulatorApp(square=square, faults=faults or FaultPlan(), strict=strict,
                       steering=steering)
