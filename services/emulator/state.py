"""The emulated Square account data and the rules Square applies to it.

Everything here is plain Python over in-memory data, with no HTTP: the ASGI app (`app.py`) turns
requests into calls on `EmulatedSquare` and `SquareError`s into Square's error envelope, and the
seed generator (`seed.py`) builds its data through the very same methods.

Orders are held as `OrderRecord`s: a few indexed fields for searching plus the order's JSON, kept
as a dict while it changes and as encoded bytes once it settles, so that 100,000 seeded orders fit
in little memory and a search page is a join of ready bytes (see `square-api.md` §14 for the rules
and the choices made where Square is unconfirmed).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import random
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

__all__ = [
    "TERMINAL_FULFILLMENT_STATES",
    "EmulatedLocation",
    "EmulatedMerchant",
    "EmulatedSquare",
    "EmulatedToken",
    "OrderRecord",
    "SquareError",
]

TERMINAL_FULFILLMENT_STATES = frozenset({"COMPLETED", "CANCELED", "FAILED"})
FULFILLMENT_STATES = ("PROPOSED", "RESERVED", "PREPARED", "COMPLETED", "CANCELED", "FAILED")
ORDER_STATES = ("OPEN", "COMPLETED", "CANCELED", "DRAFT")
ALL_SCOPES = ("ORDERS_READ", "ORDERS_WRITE", "PAYMENTS_READ", "PAYMENTS_WRITE",
              "MERCHANT_PROFILE_READ")
# CreatePayment fields kept as given and returned on the Payment.
PAYMENT_PASSTHROUGH = ("reference_id", "app_fee_money", "billing_address", "buyer_email_address",
                       "customer_id", "note", "shipping_address",
                       "statement_description_identifier", "team_member_id")
NONCE_OK = "cnon:card-nonce-ok"
NONCE_DECLINED = "cnon:card-nonce-declined"
FULFILLMENT_DETAILS_KEY = {
    "PICKUP": "pickup_details",
    "SHIPMENT": "shipment_details",
    "DELIVERY": "delivery_details",
}


_ID_LETTERS = bytes.maketrans(b"+/", b"Xy")
# A fields_to_clear path: dot-separated names, each optionally selecting a list entry by uid.
_CLEAR_PATH = re.compile(r"[a-z_]+(\[[^\]\[.]+\])?(\.[a-zA-Z0-9_-]+(\[[^\]\[.]+\])?)*")
_CLEAR_PART = re.compile(r"([a-zA-Z0-9_-]+)(?:\[([^\]]+)\])?")
_COMPUTED_ORDER_FIELDS = frozenset({
    "closed_at", "created_at", "updated_at", "net_amount_due_money", "net_amounts", "refunds",
    "return_amounts", "returns", "rewards", "rounding_adjustment", "tenders",
    "total_discount_money", "total_money", "total_service_charge_money", "total_tax_money",
    "total_tip_money"})
# Line item fields a client sets and the emulator keeps (others are refused by the app).
LINE_ITEM_FIELDS = ("name", "quantity", "base_price_money", "note", "metadata",
                    "variation_name", "item_type")


class SquareError(Exception):
    """A refusal in Square's terms: HTTP status plus one error of the envelope."""

    def __init__(self, status: int, category: str, code: str, detail: str,
                 field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.category = category
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        error: dict[str, Any] = {"category": self.category, "code": self.code,
                                 "detail": self.detail}
        if self.field:
            error["field"] = self.field
        return {"errors": [error]}


def bad_request(detail: str, field: str | None = None, code: str = "BAD_REQUEST") -> SquareError:
    return SquareError(400, "INVALID_REQUEST_ERROR", code, detail, field)


def not_found(detail: str, field: str | None = None) -> SquareError:
    return SquareError(404, "INVALID_REQUEST_ERROR", "NOT_FOUND", detail, field)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_time(text: str, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise bad_request(f"Invalid RFC 3339 time: {text!r}.", field, "INVALID_TIME") from None
    if moment.tzinfo is None:
        raise bad_request(f"Time {text!r} has no zone.", field, "INVALID_TIME")
    return moment


def _iso_days(text: Any, field: str) -> timedelta:
    """The ISO 8601 durations Square's delay_duration takes: PnD, PTnH, PTnM."""
    found = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?)?", str(text))
    if found is None or not any(found.groups()):
        raise bad_request(f"Invalid duration {text!r}.", field, "INVALID_VALUE")
    days, hours, minutes = (int(g or 0) for g in found.groups())
    return timedelta(days=days, hours=hours, minutes=minutes)


def compact_json(document: Any) -> bytes:
    """orjson's bytes keep spare capacity (4x here); a copy is sized exactly."""
    return bytes(memoryview(orjson.dumps(document)))


def money(amount: int, currency: str) -> dict[str, Any]:
    return {"amount": amount, "currency": currency}


@dataclass
class EmulatedMerchant:
    id: str
    business_name: str
    country: str
    currency: str
    timezone: str
    language_code: str
    created_at: datetime
    main_location_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "business_name": self.business_name, "country": self.country,
                "language_code": self.language_code, "currency": self.currency,
                "status": "ACTIVE", "main_location_id": self.main_location_id,
                "created_at": rfc3339(self.created_at)}


@dataclass
class EmulatedLocation:
    id: str
    merchant_id: str
    name: str
    status: str
    currency: str
    timezone: str
    country: str
    created_at: datetime
    business_email: str | None = None  # Square omits the field when the seller set none

    def to_json(self) -> dict[str, Any]:
        document = {"id": self.id, "name": self.name, "merchant_id": self.merchant_id,
                    "status": self.status, "currency": self.currency,
                    "timezone": self.timezone, "country": self.country, "type": "PHYSICAL",
                    "capabilities": ["CREDIT_CARD_PROCESSING"],
                    "created_at": rfc3339(self.created_at)}
        if self.business_email is not None:
            document["business_email"] = self.business_email
        return document


@dataclass
class EmulatedToken:
    token: str
    merchant_id: str
    scopes: frozenset[str]
    expires_at: datetime
    revoked_at: datetime | None = None
    client_id: str = "emulator-application"


class OrderRecord:
    """One order: indexed fields for search, and its JSON as a dict or as settled bytes."""

    __slots__ = (
        "_doc",
        "_json",
        "closed_at",
        "created_at",
        "customer_id",
        "fstates",
        "ftypes",
        "id",
        "location_id",
        "merchant_id",
        "source_name",
        "state",
        "updated_at",
        "version",
    )

    def __init__(self, merchant_id: str, doc: dict[str, Any]) -> None:
        self.merchant_id = merchant_id
        self._doc: dict[str, Any] | None = doc
        self._json: bytes | None = None
        self.reindex()

    def reindex(self) -> None:
        doc = self.doc
        self.id = doc["id"]
        self.location_id = doc["location_id"]
        self.state = doc["state"]
        self.version = doc.get("version")
        self.source_name = (doc.get("source") or {}).get("name")
        self.customer_id = doc.get("customer_id")
        self.created_at = doc["created_at"]
        self.updated_at = doc["updated_at"]
        self.closed_at = doc.get("closed_at")
        fulfillments = doc.get("fulfillments") or []
        self.ftypes = tuple(f.get("type") for f in fulfillments)
        self.fstates = tuple(f.get("state") for f in fulfillments)

    @property
    def doc(self) -> dict[str, Any]:
        if self._doc is None:
            assert self._json is not None
            self._doc = orjson.loads(self._json)
        return self._doc

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = compact_json(self.doc)
        return self._json

    def changed(self) -> None:
        """Call after editing `doc`: drops the stale bytes and refreshes the index."""
        self._json = None
        self.reindex()

    def settle(self) -> None:
        """Keep only the bytes: the compact form for orders nobody is changing."""
        self.json  # noqa: B018 - encodes if needed
        self._doc = None

    def copy_doc(self) -> dict[str, Any]:
        document: dict[str, Any] = orjson.loads(self.json)
        return document


@dataclass
class IdempotentResult:
    request_hash: str
    response: dict[str, Any]


@dataclass
class EmulatedSquare:
    """The whole emulated account space: merchants, tokens, orders, payments."""

    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    merchants: dict[str, EmulatedMerchant] = field(default_factory=dict)
    locations: dict[str, EmulatedLocation] = field(default_factory=dict)
    tokens: dict[str, EmulatedToken] = field(default_factory=dict)
    orders: dict[str, OrderRecord] = field(default_factory=dict)
    orders_by_merchant: dict[str, list[OrderRecord]] = field(default_factory=dict)
    # Payments are kept as encoded JSON too; `payment_of` decodes, `save_payment` encodes.
    payments: dict[str, bytes] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[tuple[str, str, str], IdempotentResult] = field(default_factory=dict)
    # Per merchant: a counter bumped by every order change, and the sorted matches of recent
    # queries at that count (an index, as Square keeps: paging a query costs a bisect).
    generations: dict[str, int] = field(default_factory=dict)
    search_cache: dict[tuple[str, str], tuple[int, list[OrderRecord], list[tuple[str, str]]]] = \
        field(default_factory=dict)
    # One lock: uvicorn may run handlers on threads only for sync code, but the seeder and the
    # background version bumper may share the object with the event loop.
    lock: threading.RLock = field(default_factory=threading.RLock)
    # The strictest reading of UNCONFIRMED rules (set by the app's `strict` option).
    strict: bool = False

    # ------------------------------------------------------------------ ids and auth
    def new_id(self, length: int = 24) -> str:
        # Base64 of seeded random bytes, with letters for '+' and '/': deterministic and fast
        # enough to seed 100,000 orders.
        size = (length * 3 + 3) // 4
        raw = binascii.b2a_base64(self.rng.getrandbits(size * 8).to_bytes(size, "little"),
                                  newline=False)
        return raw.translate(_ID_LETTERS).decode()[:length]

    def add_merchant(self, merchant: EmulatedMerchant, locations: Iterable[EmulatedLocation]
                     ) -> None:
        self.merchants[merchant.id] = merchant
        self.orders_by_merchant.setdefault(merchant.id, [])
        for location in locations:
            self.locations[location.id] = location
            if not merchant.main_location_id:
                merchant.main_location_id = location.id

    def issue_token(self, merchant_id: str, scopes: Iterable[str] = ALL_SCOPES,
                    expires_in: timedelta = timedelta(days=30)) -> EmulatedToken:
        # Deliberately unlike real Square tokens (EAAA..., sq0atp-...), so none is ever mistaken.
        token = EmulatedToken(token=f"emu-token-{merchant_id.lower()}-{self.new_id(16)}",
                              merchant_id=merchant_id, scopes=frozenset(scopes),
                              expires_at=self.clock() + expires_in)
        self.tokens[token.token] = token
        return token

    def revoke_token(self, token: str, at: datetime | None = None) -> None:
        self.tokens[token].revoked_at = at or self.clock()

    def authenticate(self, authorization: str | None, needed: Iterable[str]) -> EmulatedToken:
        try:
            return self._authenticate(authorization, needed)
        except SquareError as error:
            if self.strict and error.status == 401:  # §14: the same refusal as a 403
                error.status = 403
            raise

    def _authenticate(self, authorization: str | None, needed: Iterable[str]) -> EmulatedToken:
        if not authorization or not authorization.startswith("Bearer "):
            raise SquareError(401, "AUTHENTICATION_ERROR", "UNAUTHORIZED",
                              "This request could not be authorized.")
        token = self.tokens.get(authorization[len("Bearer "):].strip())
        if token is None:
            raise SquareError(401, "AUTHENTICATION_ERROR", "UNAUTHORIZED",
                              "This request could not be authorized.")
        now = self.clock()
        if token.revoked_at is not None and token.revoked_at <= now:
            raise SquareError(401, "AUTHENTICATION_ERROR", "ACCESS_TOKEN_REVOKED",
                              "The access token has been revoked.")
        if token.expires_at <= now:
            raise SquareError(401, "AUTHENTICATION_ERROR", "ACCESS_TOKEN_EXPIRED",
                              "The access token has expired.")
        missing = [scope for scope in needed if scope not in token.scopes]
        if missing:
            raise SquareError(403, "AUTHENTICATION_ERROR", "INSUFFICIENT_SCOPES",
                              "The merchant has not given your application sufficient "
                              f"permissions to do that. Missing: {', '.join(missing)}.")
        return token

    # ------------------------------------------------------------------ idempotency
    def replay(self, merchant_id: str, operation: str, key: str | None, body: Any
               ) -> tuple[dict[str, Any] | None, str]:
        """The stored answer for a replayed key, or None; a reused key is refused."""
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        if not key:
            return None, digest
        stored = self.idempotency.get((merchant_id, operation, key))
        if stored is None:
            return None, digest
        if stored.request_hash != digest:
            raise bad_request("The provided idempotency key has already been used with "
                              "another request.", "idempotency_key", "IDEMPOTENCY_KEY_REUSED")
        return stored.response, digest

    def remember(self, merchant_id: str, operation: str, key: str | None, digest: str,
                 response: dict[str, Any]) -> None:
        if key:
            self.idempotency[(merchant_id, operation, key)] = IdempotentResult(digest, response)

    # ------------------------------------------------------------------ merchants
    def merchant_locations(self, merchant_id: str) -> list[EmulatedLocation]:
        found = [loc for loc in self.locations.values() if loc.merchant_id == merchant_id]
        return sorted(found, key=lambda loc: loc.name)

    def location_of(self, merchant_id: str, location_id: Any, field: str) -> EmulatedLocation:
        location = self.locations.get(location_id) if isinstance(location_id, str) else None
        if location is None or location.merchant_id != merchant_id:
            raise not_found(f"Location `{location_id}` not found.", field)
        return location

    # ------------------------------------------------------------------ orders
    def order_of(self, merchant_id: str, order_id: str) -> OrderRecord:
        record = self.orders.get(order_id)
        if record is None or record.merchant_id != merchant_id:
            raise not_found(f"Order `{order_id}` not found.", "order_id")
        return record

    def price_order(self, merchant_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Build an order document with Square's computed totals (no taxes or discounts)."""
        location = self.location_of(merchant_id, spec.get("location_id"), "order.location_id")
        currency = location.currency
        now = rfc3339(self.clock())
        line_items = []
        for index, item in enumerate(spec.get("line_items") or []):
            base = item.get("base_price_money") or {}
            if base.get("currency", currency) != currency:
                raise bad_request("Money currency must match the location's currency.",
                                  f"order.line_items[{index}].base_price_money.currency",
                                  "INVALID_VALUE")
            quantity = item.get("quantity", "1")
            try:
                units = int(quantity)
                if units < 1:
                    raise ValueError
            except (TypeError, ValueError):
                raise bad_request(f"Invalid quantity {quantity!r}.",
                                  f"order.line_items[{index}].quantity", "INVALID_VALUE") from None
            unit_price = int(base.get("amount", 0))
            gross = unit_price * units
            kept = {key: item[key] for key in ("note", "metadata", "variation_name")
                    if item.get(key) is not None}
            line_items.append({
                **kept,
                "uid": item.get("uid") or self.new_id(22), "name": item.get("name", "Item"),
                "quantity": str(units), "item_type": item.get("item_type") or "ITEM",
                "base_price_money": money(unit_price, currency),
                "variation_total_price_money": money(gross, currency),
                "gross_sales_money": money(gross, currency),
                "total_tax_money": money(0, currency),
                "total_discount_money": money(0, currency),
                "total_money": money(gross, currency),
            })
        service_charges = []
        for index, charge in enumerate(spec.get("service_charges") or []):
            amount = int((charge.get("amount_money") or {}).get("amount", 0))
            if (charge.get("amount_money") or {}).get("currency", currency) != currency:
                raise bad_request("Money currency must match the location's currency.",
                                  f"order.service_charges[{index}].amount_money.currency",
                                  "INVALID_VALUE")
            service_charges.append({
                **({"metadata": charge["metadata"]} if charge.get("metadata") else {}),
                "uid": charge.get("uid") or self.new_id(22), "name": charge.get("name", "Charge"),
                "amount_money": money(amount, currency), "applied_money": money(amount, currency),
                "calculation_phase": charge.get("calculation_phase", "TOTAL_PHASE"),
                "total_money": money(amount, currency), "total_tax_money": money(0, currency),
                "type": "CUSTOM", "treatment_type": "LINE_ITEM_TREATMENT",
            })
        fulfillments = []
        for index, spec_f in enumerate(spec.get("fulfillments") or []):
            f_type = spec_f.get("type", "PICKUP")
            state = spec_f.get("state", "PROPOSED")
            if state not in FULFILLMENT_STATES:
                raise bad_request(f"Invalid fulfillment state {state!r}.",
                                  f"order.fulfillments[{index}].state", "INVALID_ENUM_VALUE")
            fulfillment: dict[str, Any] = {"uid": spec_f.get("uid") or self.new_id(22),
                                           "type": f_type, "state": state,
                                           "line_item_application": "ALL"}
            if spec_f.get("metadata"):
                fulfillment["metadata"] = spec_f["metadata"]
            details_key = FULFILLMENT_DETAILS_KEY.get(f_type)
            for key in FULFILLMENT_DETAILS_KEY.values():
                if spec_f.get(key) is not None and key != details_key:
                    raise bad_request(f"`{key}` does not fit a {f_type} fulfillment.",
                                      f"order.fulfillments[{index}].{key}", "INVALID_VALUE")
            if details_key:
                fulfillment[details_key] = dict(spec_f.get(details_key) or {})
                fulfillment[details_key].setdefault("placed_at", now)
            fulfillments.append(fulfillment)
        items_total = sum(li["total_money"]["amount"] for li in line_items)
        charges_total = sum(sc["total_money"]["amount"] for sc in service_charges)
        total = items_total + charges_total
        doc: dict[str, Any] = {
            "id": spec.get("id") or self.new_id(),
            "location_id": location.id,
            "line_items": line_items,
            "state": spec.get("state", "OPEN"),
            "total_money": money(total, currency),
            "total_tax_money": money(0, currency),
            "total_discount_money": money(0, currency),
            "total_tip_money": money(0, currency),
            "total_service_charge_money": money(charges_total, currency),
            "net_amounts": {"total_money": money(total, currency),
                            "tax_money": money(0, currency),
                            "discount_money": money(0, currency),
                            "tip_money": money(0, currency),
                            "service_charge_money": money(charges_total, currency)},
            "net_amount_due_money": money(total, currency),
            "created_at": now, "updated_at": now,
        }
        if not line_items:
            doc.pop("line_items")
        if service_charges:
            doc["service_charges"] = service_charges
        if fulfillments:
            doc["fulfillments"] = fulfillments
        for key in ("reference_id", "customer_id", "ticket_name", "metadata"):
            if spec.get(key):
                doc[key] = spec[key]
        doc["source"] = dict(spec.get("source") or {"name": "Emulator Application"})
        if doc["state"] not in ("OPEN", "DRAFT"):
            raise bad_request("New orders must be OPEN or DRAFT.", "order.state", "INVALID_VALUE")
        return doc

    def create_order(self, merchant_id: str, spec: dict[str, Any], *, via_api: bool = True,
                     created_at: datetime | None = None) -> OrderRecord:
        """CreateOrder. `via_api=False` models orders Square's own products made without a
        version (point of sale, legacy flows): the API cannot update those."""
        with self.lock:
            doc = self.price_order(merchant_id, spec)
            if created_at is not None:
                doc["created_at"] = doc["updated_at"] = rfc3339(created_at)
            if via_api:
                doc["version"] = 1
            record = OrderRecord(merchant_id, doc)
            self.orders[record.id] = record
            self.orders_by_merchant.setdefault(merchant_id, []).append(record)
            self.changed(merchant_id)
            return record

    def touch(self, record: OrderRecord, moment: datetime | None = None) -> None:
        doc = record.doc
        doc["updated_at"] = rfc3339(moment or self.clock())
        if doc.get("version") is not None:
            doc["version"] += 1
        record.changed()
        self.changed(record.merchant_id)

    def update_order(self, merchant_id: str, order_id: str, body: dict[str, Any]
                     ) -> OrderRecord:
        """UpdateOrder's rules, after authentication and idempotency (see §14 for the order)."""
        with self.lock:
            record = self.order_of(merchant_id, order_id)
            sparse = body.get("order") or {}
            if record.version is None:
                raise bad_request("This order was not created through the Orders API and has no "
                                  "version, so it cannot be updated.", "order_id")
            if "version" not in sparse:
                raise bad_request("The order version is required to update an order.",
                                  "order.version", "MISSING_REQUIRED_PARAMETER")
            if sparse["version"] != record.version:
                detail = (f"Supplied version {sparse['version']} does not match the current "
                          f"version {record.version} of order {order_id}.")
                if self.strict:  # §14: the console must also cope with a 409
                    raise SquareError(409, "INVALID_REQUEST_ERROR", "CONFLICT", detail,
                                      "order.version")
                raise bad_request(detail, "order.version", "VERSION_MISMATCH")
            if sparse.get("location_id") != record.location_id:
                raise bad_request("The order's location_id cannot be changed.",
                                  "order.location_id")
            if record.state in ("COMPLETED", "CANCELED"):
                if self.strict:  # §14: a VERSION_MISMATCH instead of BAD_REQUEST
                    raise bad_request(f"Order {order_id} is {record.state}; its version has "
                                      "moved on.", "order.version", "VERSION_MISMATCH")
                raise bad_request(f"Order {order_id} is {record.state} and can no longer be "
                                  "updated.", "order.state")
            doc = record.copy_doc()
            self._apply_sparse(doc, sparse, body.get("fields_to_clear") or [])
            now = self.clock()
            new_state = doc["state"]
            if new_state == "COMPLETED":
                open_fulfillments = [f for f in doc.get("fulfillments") or []
                                     if f.get("state") not in TERMINAL_FULFILLMENT_STATES]
                if open_fulfillments:
                    raise bad_request("All fulfillments must have a state of COMPLETED, "
                                      "CANCELED, or FAILED for an order to be able to have a "
                                      "state of COMPLETED.", "order.state")
                if (doc.get("net_amount_due_money") or {}).get("amount", 0) > 0:
                    raise bad_request("The order is not fully paid and cannot be COMPLETED.",
                                      "order.state")
            if new_state in ("COMPLETED", "CANCELED"):
                doc["closed_at"] = rfc3339(now)
            doc["version"] = record.version + 1
            doc["updated_at"] = rfc3339(now)
            record._doc = doc
            record.changed()
            self.changed(merchant_id)
            return record

    def _apply_sparse(self, doc: dict[str, Any], sparse: dict[str, Any],
                      fields_to_clear: list[str]) -> None:
        now = rfc3339(self.clock())
        if "state" in sparse:
            state = sparse["state"]
            if state not in ORDER_STATES:
                raise bad_request(f"Invalid order state {state!r}.", "order.state",
                                  "INVALID_ENUM_VALUE")
            if state == "DRAFT" and doc["state"] != "DRAFT":
                raise bad_request("An OPEN order cannot move back to DRAFT.", "order.state")
            doc["state"] = state
        for key in ("reference_id", "ticket_name", "metadata", "customer_id"):
            if key in sparse:
                doc[key] = sparse[key]
        if "line_items" in sparse:
            if doc.get("tenders"):
                raise bad_request("LineItems cannot be modified for finalized tenders.",
                                  "order.line_items")
            self._merge_line_items(doc, sparse["line_items"])
        for index, change in enumerate(sparse.get("fulfillments") or []):
            self._merge_fulfillment(doc, index, change, now)
        cleared_items = False
        for index, path in enumerate(fields_to_clear):
            cleared_items |= self._clear_field(doc, path, f"fields_to_clear[{index}]")
        if cleared_items:
            if doc.get("tenders"):
                raise bad_request("LineItems cannot be modified for finalized tenders.",
                                  "fields_to_clear")
            self._merge_line_items(doc, [])

    def _merge_line_items(self, doc: dict[str, Any], changes: list[dict[str, Any]]) -> None:
        currency = doc["total_money"]["currency"]
        existing = {li["uid"]: li for li in doc.get("line_items") or []}
        specs = [dict(li) for li in doc.get("line_items") or []]
        for change in changes:
            uid = change.get("uid")
            if uid and uid in existing:
                for spec in specs:
                    if spec["uid"] == uid:
                        spec.update({k: v for k, v in change.items() if k in
                                     LINE_ITEM_FIELDS})
            else:
                specs.append(change)
        repriced = self.price_order(
            self.locations[doc["location_id"]].merchant_id,
            {"location_id": doc["location_id"], "line_items": specs,
             "service_charges": doc.get("service_charges") or []})
        doc["line_items"] = repriced.get("line_items", [])
        for key in ("total_money", "net_amounts", "total_service_charge_money"):
            doc[key] = repriced[key]
        paid = sum(t["amount_money"]["amount"] for t in doc.get("tenders") or []
                   if (t.get("card_details") or {}).get("status", "CAPTURED") == "CAPTURED")
        doc["net_amount_due_money"] = money(doc["total_money"]["amount"] - paid, currency)

    def _merge_fulfillment(self, doc: dict[str, Any], index: int, change: dict[str, Any],
                           now: str) -> None:
        fulfillments = doc.setdefault("fulfillments", [])
        uid = change.get("uid")
        target = next((f for f in fulfillments if uid and f.get("uid") == uid), None)
        if target is None:
            if uid:
                raise bad_request(f"Fulfillment `{uid}` not found on this order.",
                                  f"order.fulfillments[{index}].uid", "NOT_FOUND")
            location = doc["location_id"]
            priced = self.price_order(self.locations[location].merchant_id, {
                "location_id": location, "fulfillments": [{**change, "uid": None}]})
            fulfillments.append(priced["fulfillments"][0])
            return
        if change.get("type") is not None and change["type"] != target.get("type"):
            raise bad_request(f"Fulfillment `{uid}` is {target.get('type')}; its type cannot "
                              "change.", f"order.fulfillments[{index}].type")
        if change.get("metadata") is not None:
            target["metadata"] = {**(target.get("metadata") or {}), **change["metadata"]}
        for key in FULFILLMENT_DETAILS_KEY.values():
            if change.get(key) is not None:
                if key != FULFILLMENT_DETAILS_KEY.get(target.get("type", "")):
                    raise bad_request(f"`{key}` does not fit a {target.get('type')} "
                                      "fulfillment.", f"order.fulfillments[{index}].{key}",
                                      "INVALID_VALUE")
                target[key] = {**(target.get(key) or {}), **change[key]}
        if "state" in change:
            state = change["state"]
            if state not in FULFILLMENT_STATES:
                raise bad_request(f"Invalid fulfillment state {state!r}.",
                                  f"order.fulfillments[{index}].state", "INVALID_ENUM_VALUE")
            current = target.get("state")
            if current in TERMINAL_FULFILLMENT_STATES and state != current:
                raise bad_request(f"Fulfillment `{uid}` is {current} and cannot change state.",
                                  f"order.fulfillments[{index}].state")
            if self.strict and current == "PROPOSED" and state == "COMPLETED":
                # square-api.md §2 rule 2: whether PROPOSED may jump to COMPLETED is
                # UNCONFIRMED; the strict reading refuses it.
                raise bad_request(f"Fulfillment `{uid}` cannot move from PROPOSED to COMPLETED; "
                                  "it must be accepted first.",
                                  f"order.fulfillments[{index}].state")
            target["state"] = state
            details_key = FULFILLMENT_DETAILS_KEY.get(target.get("type", ""))
            if details_key and state != current:
                stamp = {"COMPLETED": "completed_at" if details_key != "shipment_details"
                         else "shipped_at", "CANCELED": "canceled_at", "FAILED": "failed_at",
                         "RESERVED": "accepted_at" if details_key != "shipment_details"
                         else "in_progress_at", "PREPARED": "ready_at" if details_key !=
                         "shipment_details" else "packaged_at"}.get(state)
                if stamp:
                    target.setdefault(details_key, {})[stamp] = now

    @staticmethod
    def _clear_field(doc: dict[str, Any], path: str, field: str) -> bool:
        """Delete what a `fields_to_clear` dot path names: `reference_id`, `metadata.key`,
        `line_items[uid]`, `line_items[uid].note`, `fulfillments[uid].pickup_details.note`...
        Returns whether line items changed (the totals must then be recomputed). Paths naming
        computed fields are ignored, as Square ignores them."""
        match = _CLEAR_PATH.fullmatch(path)
        if match is None:
            raise bad_request(f"Invalid field path {path!r}.", field, "INVALID_VALUE")
        parts = [(m.group(1), m.group(2)) for m in _CLEAR_PART.finditer(path)]
        if parts[0][0] in _COMPUTED_ORDER_FIELDS or parts[0][0] in ("id", "location_id",
                                                                     "version", "state"):
            return False
        node: Any = doc
        for position, (name, uid) in enumerate(parts):
            last = position == len(parts) - 1
            if not isinstance(node, dict) or name not in node:
                return False  # nothing there: already clear
            if uid is None:
                if last:
                    node.pop(name)
                    return parts[0][0] == "line_items"
                node = node[name]
                continue
            items = node[name]
            target = next((i for i in items if isinstance(i, dict) and i.get("uid") == uid), None)
            if target is None:
                raise bad_request(f"No `{name}` entry has uid `{uid}`.", field, "NOT_FOUND")
            if last:
                items.remove(target)
                if not items:
                    node.pop(name)
                return parts[0][0] == "line_items"
            node = target
        return False

    def changed(self, merchant_id: str) -> None:
        self.generations[merchant_id] = self.generations.get(merchant_id, 0) + 1

    # ------------------------------------------------------------------ search
    def search_orders(self, merchant_id: str, body: dict[str, Any]
                      ) -> tuple[list[OrderRecord], str | None]:
        location_ids = body.get("location_ids")
        if not location_ids:
            raise bad_request("At least one location ID must be provided.", "location_ids",
                              "ARRAY_LENGTH_TOO_SHORT")
        if len(location_ids) > 10:
            raise bad_request("At most 10 location IDs may be provided.", "location_ids",
                              "ARRAY_LENGTH_TOO_LONG")
        for index, location_id in enumerate(location_ids):
            self.location_of(merchant_id, location_id, f"location_ids[{index}]")
        limit = body.get("limit", 500)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise bad_request("limit must be between 1 and 1000.", "limit", "INVALID_VALUE")
        query = body.get("query") or {}
        filters = query.get("filter") or {}
        sort = query.get("sort") or {}
        sort_field = sort.get("sort_field", "CREATED_AT")
        sort_order = sort.get("sort_order", "DESC")
        if sort_field not in ("CREATED_AT", "UPDATED_AT", "CLOSED_AT"):
            raise bad_request(f"Invalid sort field {sort_field!r}.", "query.sort.sort_field",
                              "INVALID_ENUM_VALUE")
        if sort_order not in ("ASC", "DESC"):
            raise bad_request(f"Invalid sort order {sort_order!r}.", "query.sort.sort_order",
                              "INVALID_SORT_ORDER")
        attribute = sort_field.lower()
        time_range = None
        date_filter = filters.get("date_time_filter")
        if date_filter:
            named = [k for k in ("created_at", "updated_at", "closed_at") if date_filter.get(k)]
            if len(named) != 1:
                raise bad_request("date_time_filter must name exactly one of created_at, "
                                  "updated_at or closed_at.", "query.filter.date_time_filter")
            if named[0] != attribute:
                raise bad_request(f"The sort field {sort_field} must match the date_time_filter "
                                  f"field {named[0]}.", "query.sort.sort_field")
            window = date_filter[named[0]]
            start = window.get("start_at")
            end = window.get("end_at")
            time_range = (
                rfc3339(parse_time(start, f"query.filter.date_time_filter.{named[0]}.start_at"))
                if start else None,
                rfc3339(parse_time(end, f"query.filter.date_time_filter.{named[0]}.end_at"))
                if end else None)
        states = None
        if "state_filter" in filters:
            states = set((filters["state_filter"] or {}).get("states") or [])
            if not states:
                raise bad_request("state_filter.states is required.",
                                  "query.filter.state_filter.states",
                                  "MISSING_REQUIRED_PARAMETER")
            unknown = states - set(ORDER_STATES)
            if unknown:
                raise bad_request(f"Invalid order state {sorted(unknown)[0]!r}.",
                                  "query.filter.state_filter.states", "INVALID_ENUM_VALUE")
        sources = set((filters.get("source_filter") or {}).get("source_names") or []) or None
        customers = set((filters.get("customer_filter") or {}).get("customer_ids") or []) or None
        if sources and len(sources) > 10:
            raise bad_request("At most 10 source names.",
                              "query.filter.source_filter.source_names", "ARRAY_LENGTH_TOO_LONG")
        f_filter = filters.get("fulfillment_filter") or {}
        f_types = set(f_filter.get("fulfillment_types") or []) or None
        f_states = set(f_filter.get("fulfillment_states") or []) or None
        cursor_key = hashlib.sha256(orjson.dumps(
            [sorted(location_ids), query, bool(body.get("return_entries"))],
            option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        after: tuple[str, str] | None = None
        if body.get("cursor"):
            after = self._decode_cursor(body["cursor"], cursor_key)
        wanted_locations = set(location_ids)
        generation = self.generations.get(merchant_id, 0)
        cached = self.search_cache.get((merchant_id, cursor_key))
        if cached is not None and cached[0] == generation:
            _, ordered, keys = cached
        else:
            with self.lock:
                matched = []
                for record in self.orders_by_merchant.get(merchant_id, ()):
                    if record.location_id not in wanted_locations:
                        continue
                    if states is not None and record.state not in states:
                        continue
                    if sources is not None and record.source_name not in sources:
                        continue
                    if customers is not None and record.customer_id not in customers:
                        continue
                    if f_types is not None and not f_types.intersection(record.ftypes):
                        continue
                    if f_states is not None and not f_states.intersection(record.fstates):
                        continue
                    key = getattr(record, attribute)
                    if key is None:
                        continue
                    if time_range is not None:
                        if time_range[0] and key < time_range[0]:
                            continue
                        if time_range[1] and key >= time_range[1]:
                            continue
                    matched.append(record)
            matched.sort(key=lambda r: (getattr(r, attribute), r.id))
            ordered = matched
            keys = [(getattr(r, attribute), r.id) for r in matched]
            if len(self.search_cache) > 512:
                self.search_cache.clear()
            self.search_cache[(merchant_id, cursor_key)] = (generation, ordered, keys)
        # Keyset paging over the ascending list: stable while orders change between pages.
        total = len(ordered)
        if sort_order == "ASC":
            start = bisect.bisect_right(keys, after) if after is not None else 0
            page = ordered[start:start + limit]
            more = start + limit < total
        else:
            end = bisect.bisect_left(keys, after) if after is not None else total
            page = ordered[max(0, end - limit):end][::-1]
            more = end - limit > 0
        cursor = None
        if more and page:
            last = page[-1]
            cursor = self._encode_cursor(cursor_key, (getattr(last, attribute), last.id))
        return page, cursor

    @staticmethod
    def _encode_cursor(query_key: str, after: tuple[str, str]) -> str:
        raw = json.dumps([query_key, after[0], after[1]]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: Any, query_key: str) -> tuple[str, str]:
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            key, sort_value, order_id = json.loads(base64.urlsafe_b64decode(padded))
        except Exception:
            raise bad_request("The cursor is not valid.", "cursor", "INVALID_CURSOR") from None
        if key != query_key:
            raise bad_request("The cursor does not belong to this query: resend the original "
                              "query unchanged with it.", "cursor", "INVALID_CURSOR")
        return str(sort_value), str(order_id)

    # ------------------------------------------------------------------ payments
    def create_payment(self, merchant_id: str, body: dict[str, Any],
                       created_at: datetime | None = None) -> dict[str, Any]:
        with self.lock:
            source_id = body.get("source_id")
            amount_money = body.get("amount_money") or {}
            amount = amount_money.get("amount")
            if not isinstance(amount, int) or amount <= 0:
                raise bad_request("amount_money.amount must be a positive integer.",
                                  "amount_money.amount", "INVALID_VALUE")
            order_record = None
            if body.get("order_id"):
                order_record = self.order_of(merchant_id, body["order_id"])
                location = self.locations[order_record.location_id]
            elif body.get("location_id"):
                location = self.location_of(merchant_id, body["location_id"], "location_id")
            else:
                location = self.locations[self.merchants[merchant_id].main_location_id]
            currency = amount_money.get("currency") or location.currency
            if currency != location.currency:
                raise bad_request("Currency must match the location's currency.",
                                  "amount_money.currency", "INVALID_VALUE")
            if source_id == NONCE_DECLINED:
                raise SquareError(400, "PAYMENT_METHOD_ERROR", "GENERIC_DECLINE",
                                  "Authorization error: 'GENERIC_DECLINE'", "source_id")
            if source_id != NONCE_OK:
                raise bad_request("source_id must be a card nonce; the emulator accepts the "
                                  f"sandbox test values {NONCE_OK} and {NONCE_DECLINED}.",
                                  "source_id", "INVALID_CARD_DATA")
            if order_record is not None:
                doc = order_record.doc
                if order_record.state != "OPEN":
                    raise bad_request("Payments can only be taken for OPEN orders.", "order_id")
                due = doc["net_amount_due_money"]["amount"]
                authorized = sum(t["amount_money"]["amount"] for t in doc.get("tenders") or []
                                 if (t.get("card_details") or {}).get("status") == "AUTHORIZED")
                if amount > due - authorized:
                    raise bad_request(f"Payment of {amount} exceeds the {due - authorized} the "
                                      "order still owes.", "amount_money.amount",
                                      "PAYMENT_AMOUNT_MISMATCH")
            autocomplete = body.get("autocomplete", True)
            moment = created_at or self.clock()
            stamp = rfc3339(moment)
            payment_id = self.new_id(28)
            card_status = "CAPTURED" if autocomplete else "AUTHORIZED"
            payment: dict[str, Any] = {
                "id": payment_id, "created_at": stamp, "updated_at": stamp,
                "amount_money": money(amount, currency), "total_money": money(amount, currency),
                "approved_money": money(amount, currency),
                "status": "COMPLETED" if autocomplete else "APPROVED",
                "source_type": "CARD", "location_id": location.id,
                "card_details": {"status": card_status, "entry_method": "KEYED",
                                 "cvv_status": "CVV_ACCEPTED", "avs_status": "AVS_ACCEPTED",
                                 "card": {"card_brand": "VISA", "last_4": "1111",
                                          "exp_month": 11, "exp_year": 2030,
                                          "card_type": "CREDIT"}},
                "receipt_number": payment_id[:4], "version_token": self.new_id(20),
            }
            if not autocomplete:
                payment["delay_duration"] = "P7D"
                payment["delay_action"] = "CANCEL"
                payment["delayed_until"] = rfc3339(moment + timedelta(days=7))
            for key in PAYMENT_PASSTHROUGH:
                if body.get(key) is not None:
                    payment[key] = body[key]
            if body.get("delay_duration") or body.get("delay_action"):
                if autocomplete:
                    raise bad_request("delay_duration and delay_action need autocomplete false.",
                                      "autocomplete", "INVALID_VALUE")
                if body.get("delay_duration"):
                    days = _iso_days(body["delay_duration"], "delay_duration")
                    payment["delay_duration"] = body["delay_duration"]
                    payment["delayed_until"] = rfc3339(moment + days)
                if body.get("delay_action"):
                    payment["delay_action"] = body["delay_action"]
            if order_record is not None:
                payment["order_id"] = order_record.id
                doc = order_record.doc
                doc.setdefault("tenders", []).append({
                    "id": payment_id, "location_id": location.id,
                    "transaction_id": order_record.id, "created_at": stamp,
                    "amount_money": money(amount, currency), "type": "CARD",
                    "card_details": {"status": card_status, "entry_method": "KEYED",
                                     "card": {"card_brand": "VISA", "last_4": "1111"}},
                    "payment_id": payment_id,
                })
                if autocomplete:
                    doc["net_amount_due_money"]["amount"] -= amount
                # Square's own processing bumps the version after a payment.
                self.touch(order_record, moment)
            self.save_payment(payment)
            return payment

    def payment_of(self, merchant_id: str, payment_id: str) -> dict[str, Any]:
        """A decoded copy of the payment; change it, then `save_payment` it."""
        stored = self.payments.get(payment_id)
        payment: dict[str, Any] | None = orjson.loads(stored) if stored else None
        if payment is None or self.locations[payment["location_id"]].merchant_id != merchant_id:
            raise not_found(f"Payment `{payment_id}` not found.", "payment_id")
        return payment

    def save_payment(self, payment: dict[str, Any]) -> None:
        self.payments[payment["id"]] = compact_json(payment)

    def complete_payment(self, merchant_id: str, payment_id: str,
                         version_token: str | None = None) -> dict[str, Any]:
        with self.lock:
            payment = self.payment_of(merchant_id, payment_id)
            if version_token is not None and version_token != payment.get("version_token"):
                raise bad_request("The version_token does not match the payment's current "
                                  "version.", "version_token", "VERSION_MISMATCH")
            if payment["status"] == "COMPLETED":
                return payment
            if payment["status"] != "APPROVED":
                raise bad_request(f"Payment is {payment['status']} and cannot be completed.",
                                  "payment_id")
            stamp = rfc3339(self.clock())
            payment.update(status="COMPLETED", updated_at=stamp, version_token=self.new_id(20))
            payment["card_details"]["status"] = "CAPTURED"
            for key in ("delay_duration", "delay_action", "delayed_until"):
                payment.pop(key, None)
            if payment.get("order_id"):
                record = self.orders[payment["order_id"]]
                doc = record.doc
                for tender in doc.get("tenders") or []:
                    if tender.get("payment_id") == payment_id:
                        tender["card_details"]["status"] = "CAPTURED"
                doc["net_amount_due_money"]["amount"] -= payment["amount_money"]["amount"]
                self.touch(record)
            self.save_payment(payment)
            return payment

    def pay_order(self, merchant_id: str, order_id: str, body: dict[str, Any]) -> OrderRecord:
        with self.lock:
            record = self.order_of(merchant_id, order_id)
            if body.get("order_version") is not None and body["order_version"] != record.version:
                raise bad_request(f"Supplied version {body['order_version']} does not match the "
                                  f"current version {record.version} of order {order_id}.",
                                  "order_version", "VERSION_MISMATCH")
            if record.state != "OPEN":
                raise bad_request(f"Order {order_id} is {record.state}.", "order_id")
            payment_ids = body.get("payment_ids") or []
            payments = [self.payment_of(merchant_id, pid) for pid in payment_ids]
            owed = record.doc["net_amount_due_money"]["amount"]
            approved = sum(p["amount_money"]["amount"] for p in payments
                           if p["status"] == "APPROVED")
            if approved != owed:
                raise bad_request("The payments must add up to the amount the order owes.",
                                  "payment_ids", "PAYMENT_AMOUNT_MISMATCH")
            for payment in payments:
                if payment["status"] == "APPROVED":
                    self.complete_payment(merchant_id, payment["id"])
            doc = record.doc
            open_fulfillments = [f for f in doc.get("fulfillments") or []
                                 if f.get("state") not in TERMINAL_FULFILLMENT_STATES]
            if not open_fulfillments:
                doc["state"] = "COMPLETED"
                doc["closed_at"] = rfc3339(self.clock())
                self.touch(record)
            return record

    def refund_payment(self, merchant_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """RefundPayment. The refund starts PENDING, as Square documents; `settle_refund` plays
        Square's processing. The order shows it at once (as a refund and a return order)."""
        with self.lock:
            payment = self.payment_of(merchant_id, body.get("payment_id", ""))
            token = body.get("payment_version_token")
            if token is not None and token != payment.get("version_token"):
                raise bad_request("The payment_version_token does not match the payment's "
                                  "current version.", "payment_version_token",
                                  "VERSION_MISMATCH")
            if body.get("location_id") not in (None, payment["location_id"]):
                raise bad_request("location_id must be the payment's location.", "location_id",
                                  "INVALID_VALUE")
            amount = (body.get("amount_money") or {}).get("amount")
            refunded = (payment.get("refunded_money") or {}).get("amount", 0)
            if payment["status"] != "COMPLETED":
                raise SquareError(400, "REFUND_ERROR", "PAYMENT_NOT_REFUNDABLE",
                                  "Only completed payments can be refunded.", "payment_id")
            if not isinstance(amount, int) or amount <= 0 or \
                    amount > payment["amount_money"]["amount"] - refunded:
                raise SquareError(400, "REFUND_ERROR", "REFUND_AMOUNT_INVALID",
                                  "The refund amount is more than what is left to refund.",
                                  "amount_money.amount")
            currency = payment["amount_money"]["currency"]
            stamp = rfc3339(self.clock())
            refund_id = f"{payment['id']}_{self.new_id(16)}"
            refund: dict[str, Any] = {
                "id": refund_id, "status": "PENDING", "amount_money": money(amount, currency),
                "payment_id": payment["id"], "location_id": payment["location_id"],
                "created_at": stamp, "updated_at": stamp}
            for key in ("reason", "app_fee_money", "team_member_id"):
                if body.get(key) is not None:  # Square omits what was not given
                    refund[key] = body[key]
            payment["refunded_money"] = money(refunded + amount, currency)
            payment.setdefault("refund_ids", []).append(refund_id)
            payment["updated_at"] = stamp
            self.save_payment(payment)
            if payment.get("order_id"):
                source = self.orders[payment["order_id"]]
                refund["order_id"] = source.id
                source.doc.setdefault("refunds", []).append({
                    "id": refund_id, "location_id": payment["location_id"],
                    "transaction_id": source.id, "tender_id": payment["id"],
                    "created_at": stamp, "reason": body.get("reason") or "Refund",
                    "amount_money": money(amount, currency), "status": "PENDING"})
                self.touch(source)
                # Square records the return as an order of its own pointing back at the sale.
                merchant = source.merchant_id
                return_doc = self.price_order(merchant, {
                    "location_id": source.location_id, "source": source.doc.get("source")})
                return_doc.update(state="COMPLETED", closed_at=stamp, version=1, returns=[{
                    "uid": self.new_id(22), "source_order_id": source.id,
                    "return_amounts": {"total_money": money(amount, currency)}}])
                return_doc["net_amount_due_money"] = money(0, currency)
                return_record = OrderRecord(merchant, return_doc)
                self.orders[return_record.id] = return_record
                self.orders_by_merchant[merchant].append(return_record)
                self.changed(merchant)
            self.refunds[refund_id] = refund
            return refund

    def refund_of(self, merchant_id: str, refund_id: str) -> dict[str, Any]:
        refund = self.refunds.get(refund_id)
        if refund is None or self.locations[refund["location_id"]].merchant_id != merchant_id:
            raise not_found(f"Refund `{refund_id}` not found.", "refund_id")
        return dict(refund)

    def settle_refund(self, refund_id: str, status: str = "COMPLETED") -> dict[str, Any]:
        """Square's processing of a PENDING refund: COMPLETED, REJECTED or FAILED. The order's
        refund entry follows (APPROVED, REJECTED, FAILED)."""
        with self.lock:
            refund = self.refunds[refund_id]
            stamp = rfc3339(self.clock())
            refund.update(status=status, updated_at=stamp)
            if refund.get("order_id"):
                record = self.orders[refund["order_id"]]
                for entry in record.doc.get("refunds") or []:
                    if entry["id"] == refund_id:
                        entry["status"] = "APPROVED" if status == "COMPLETED" else status
                record.changed()
                self.changed(record.merchant_id)
            return dict(refund)

    def cancel_payment(self, merchant_id: str, payment_id: str) -> dict[str, Any]:
        """CancelPayment: voids an APPROVED (authorized, not captured) payment."""
        with self.lock:
            payment = self.payment_of(merchant_id, payment_id)
            if payment["status"] == "CANCELED":
                return payment
            if payment["status"] != "APPROVED":
                raise bad_request(f"Payment is {payment['status']}; only APPROVED payments can "
                                  "be canceled.", "payment_id")
            stamp = rfc3339(self.clock())
            payment.update(status="CANCELED", updated_at=stamp, version_token=self.new_id(20))
            payment["card_details"]["status"] = "VOIDED"
            for key in ("delay_duration", "delay_action", "delayed_until"):
                payment.pop(key, None)
            if payment.get("order_id"):
                record = self.orders[payment["order_id"]]
                for tender in record.doc.get("tenders") or []:
                    if tender.get("payment_id") == payment_id:
                        tender["card_details"]["status"] = "VOIDED"
                self.touch(record)
            self.save_payment(payment)
            return payment

    def list_payments(self, merchant_id: str, query: dict[str, str]
                      ) -> tuple[list[dict[str, Any]], str | None]:
        """ListPayments: by default the merchant's main location, newest first, 100 a page."""
        location_id = query.get("location_id") or self.merchants[merchant_id].main_location_id
        self.location_of(merchant_id, location_id, "location_id")
        payments = [orjson.loads(raw) for raw in self.payments.values()]
        payments = [p for p in payments if p["location_id"] == location_id]
        if query.get("total"):
            total = _int_param(query["total"], "total", 0, None)
            payments = [p for p in payments if p["total_money"]["amount"] == total]
        for key, path in (("last_4", "last_4"), ("card_brand", "card_brand")):
            if query.get(key):
                payments = [p for p in payments
                            if ((p.get("card_details") or {}).get("card") or {}).get(path)
                            == query[key]]
        return _page(payments, query, ("CREATED_AT", "UPDATED_AT", "OFFLINE_CREATED_AT"))

    def list_refunds(self, merchant_id: str, query: dict[str, str]
                     ) -> tuple[list[dict[str, Any]], str | None]:
        """ListPaymentRefunds: every location by default, newest first, 100 a page."""
        refunds = [dict(r) for r in self.refunds.values()
                   if self.locations[r["location_id"]].merchant_id == merchant_id]
        if query.get("location_id"):
            self.location_of(merchant_id, query["location_id"], "location_id")
            refunds = [r for r in refunds if r["location_id"] == query["location_id"]]
        if query.get("status"):
            refunds = [r for r in refunds if r["status"] == query["status"]]
        if query.get("source_type"):
            refunds = [r for r in refunds if query["source_type"] == "CARD"]
        return _page(refunds, query, ("CREATED_AT", "UPDATED_AT"))

    def settle_all(self) -> None:
        for record in self.orders.values():
            record.settle()


def _int_param(text: str, field: str, low: int, high: int | None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise bad_request(f"{field} must be an integer.", field, "EXPECTED_INTEGER") from None
    if value < low or (high is not None and value > high):
        raise bad_request(f"{field} must be between {low} and {high}.", field, "INVALID_VALUE")
    return value


def _page(items: list[dict[str, Any]], query: dict[str, str], sort_fields: tuple[str, ...]
          ) -> tuple[list[dict[str, Any]], str | None]:
    """Filter by the time windows, sort and page a Payments-API list (limit ≤ 100)."""
    for name, attribute, bound in (("begin_time", "created_at", "start"),
                                   ("end_time", "created_at", "end"),
                                   ("updated_at_begin_time", "updated_at", "start"),
                                   ("updated_at_end_time", "updated_at", "end")):
        if query.get(name):
            moment = rfc3339(parse_time(query[name], name))
            items = [i for i in items if (i[attribute] >= moment if bound == "start"
                                          else i[attribute] < moment)]
    sort_field = query.get("sort_field") or "CREATED_AT"
    if sort_field not in sort_fields:
        raise bad_request(f"Invalid sort_field {sort_field!r}.", "sort_field",
                          "INVALID_ENUM_VALUE")
    sort_order = query.get("sort_order") or "DESC"
    if sort_order not in ("ASC", "DESC"):
        raise bad_request(f"Invalid sort_order {sort_order!r}.", "sort_order",
                          "INVALID_SORT_ORDER")
    attribute = "updated_at" if sort_field == "UPDATED_AT" else "created_at"
    items.sort(key=lambda i: (i.get(attribute, ""), i["id"]), reverse=sort_order == "DESC")
    limit = _int_param(query["limit"], "limit", 1, 100) if query.get("limit") else 100
    start = 0
    if query.get("cursor"):
        try:
            start = int(base64.urlsafe_b64decode(query["cursor"] + "==").decode())
        except (ValueError, binascii.Error):
            raise bad_request("The cursor is not valid.", "cursor", "INVALID_CURSOR") from None
    page = items[start:start + limit]
    more = start + limit < len(items)
    cursor = base64.urlsafe_b64encode(str(start + limit).encode()).decode().rstrip("=") \
        if more else None
    return page, cursor
