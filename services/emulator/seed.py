"""Deterministic seed data: merchants, locations, tokens and a realistic mix of orders.

Orders are made through the emulator's own CreateOrder / CreatePayment / UpdateOrder / Refund
code, so seeded data obeys the same rules as data made over HTTP. The same `seed` always gives
the same merchants, ids and amounts; ages are relative to the `now` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.emulator.state import (
    NONCE_OK,
    EmulatedLocation,
    EmulatedMerchant,
    EmulatedSquare,
    EmulatedToken,
)

__all__ = ["ORDER_KINDS", "SeedConfig", "SeededMerchant", "seed_square"]

# (name, country, currency, timezone, language)
_MARKETS = [
    ("US", "USD", "America/New_York", "en-US"),
    ("US", "USD", "America/Los_Angeles", "en-US"),
    ("CA", "CAD", "America/Toronto", "en-CA"),
    ("GB", "GBP", "Europe/London", "en-GB"),
    ("AU", "AUD", "Australia/Sydney", "en-AU"),
    ("JP", "JPY", "Asia/Tokyo", "ja-JP"),
    ("IE", "EUR", "Europe/Dublin", "en-IE"),
    ("US", "USD", "America/Chicago", "en-US"),
]
_NAMES = ["Blue Fern Bakery", "Harbor Coffee Roasters", "Maple & Main Books", "Tidewater Tea",
          "Copper Kettle Candles", "Northside Bikes", "Sakura Ceramics", "Willow Street Florist",
          "Granite Peak Outfitters", "Little Lark Toys", "Saltbox Soap Co.", "Juniper Jewelry",
          "Riverbend Records", "Foxglove Apothecary", "Old Mill Pantry", "Bright Harbor Pets"]
_ITEMS = ["Sourdough loaf", "Gift card box", "Ceramic mug", "Tea sampler", "Candle (8 oz)",
          "Bike tune-up", "Notebook set", "Bouquet", "Hiking socks", "Wooden train",
          "Lavender soap", "Silver ring", "Vinyl LP", "Herbal salve", "Jam trio", "Dog treats"]
_ONLINE = "Square Online"
_OTHER_SOURCES = ["Point of Sale", "Invoices App", "Acme Delivery Connector"]

# Kind of order -> weight. The names are what tests and the demo talk about.
ORDER_KINDS: dict[str, int] = {
    "online_paid_open": 46,      # the target population: paid at checkout, left OPEN
    "online_partially_paid": 4,
    "online_card_authorized": 5,
    "online_refunded": 4,
    "online_completed": 14,
    "online_canceled": 4,
    "online_unpaid": 4,          # abandoned checkout: no tender
    "online_no_version": 4,      # not updatable through the API: manual only
    "other_source_paid_open": 9,
    "point_of_sale_open": 6,
}

# Currencies without minor units price whole amounts.
_ZERO_DECIMAL = {"JPY"}


@dataclass(frozen=True)
class SeedConfig:
    seed: int = 7
    merchants: int = 12
    locations_per_merchant: int = 2
    orders_per_location: int = 60
    max_age_days: int = 35
    inactive_location_every: int = 4  # every Nth merchant also has an INACTIVE location
    # Kind -> weight; None means the realistic mix of ORDER_KINDS.
    kinds: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class SeededMerchant:
    merchant: EmulatedMerchant
    locations: list[EmulatedLocation]
    token: EmulatedToken

    def manifest_entry(self) -> dict[str, Any]:
        return {"merchant_id": self.merchant.id, "business_name": self.merchant.business_name,
                "access_token": self.token.token, "scopes": sorted(self.token.scopes),
                "location_ids": [loc.id for loc in self.locations],
                "timezone": self.merchant.timezone, "currency": self.merchant.currency}


def seed_square(config: SeedConfig, now: datetime | None = None,
                square: EmulatedSquare | None = None) -> tuple[EmulatedSquare,
                                                                list[SeededMerchant]]:
    now = now or datetime.now(UTC)
    rng = random.Random(config.seed)
    square = square or EmulatedSquare(rng=random.Random(config.seed + 1))
    # While seeding, Square's clock reads `now`: the same seed and `now` give the same bytes.
    serving_clock = square.clock
    square.clock = lambda: now
    try:
        return _seed(square, config, rng, now)
    finally:
        square.clock = serving_clock


def _seed(square: EmulatedSquare, config: SeedConfig, rng: random.Random, now: datetime
          ) -> tuple[EmulatedSquare, list[SeededMerchant]]:
    seeded: list[SeededMerchant] = []
    mix = dict(config.kinds) if config.kinds else ORDER_KINDS
    unknown = set(mix) - set(ORDER_KINDS)
    if unknown:
        raise ValueError(f"unknown order kinds: {sorted(unknown)}")
    kinds = list(mix)
    weights = list(mix.values())
    for index in range(config.merchants):
        country, currency, timezone, language = _MARKETS[index % len(_MARKETS)]
        name = _NAMES[index % len(_NAMES)]
        if index >= len(_NAMES):
            name = f"{name} #{index // len(_NAMES) + 1}"
        merchant = EmulatedMerchant(
            id=f"EMU{square.new_id(10).upper()}", business_name=name, country=country,
            currency=currency, timezone=timezone, language_code=language,
            created_at=now - timedelta(days=400 + index))
        locations = [
            EmulatedLocation(id=f"L{square.new_id(12).upper()}", merchant_id=merchant.id,
                             name=f"{name} — {suffix}", status="ACTIVE", currency=currency,
                             timezone=timezone, country=country,
                             created_at=merchant.created_at,
                             business_email=_business_email(name, index, place))
            for place, suffix in enumerate(["Main Street", "Online", "Market Stall",
                                            "Warehouse"][:max(1, config.locations_per_merchant)])]
        extra = []
        if config.inactive_location_every and index % config.inactive_location_every == 3:
            extra.append(EmulatedLocation(
                id=f"L{square.new_id(12).upper()}", merchant_id=merchant.id,
                name=f"{name} — Closed Pop-up", status="INACTIVE", currency=currency,
                timezone=timezone, country=country, created_at=merchant.created_at))
        square.add_merchant(merchant, locations + extra)
        token = square.issue_token(merchant.id)
        seeded.append(SeededMerchant(merchant, locations + extra, token))
        for location in locations:
            for _ in range(config.orders_per_location):
                kind = rng.choices(kinds, weights)[0]
                created = now - timedelta(seconds=rng.randint(3600, config.max_age_days * 86400))
                make_order(square, rng, merchant.id, location, kind, created)
    square.settle_all()
    return square, seeded


def _business_email(name: str, index: int, place: int) -> str | None:
    """The location's contact address, as sellers fill it in: usually fine, sometimes left
    empty or mistyped. Derived from the index, not the rng, so seeded orders stay the same."""
    if index % 7 == 5:
        return None
    slug = "".join(c for c in name.lower() if c.isalnum())[:24] or "shop"
    if index % 7 == 6:
        return f"orders at {slug}.example"
    return f"{'orders' if place == 0 else f'shop{place}'}@{slug}.example.com"


def make_order(square: EmulatedSquare, rng: random.Random, merchant_id: str,
               location: EmulatedLocation, kind: str, created: datetime) -> str:
    """One order of the given kind, through the emulator's own operations; returns its id."""
    currency = location.currency
    scale = 1 if currency in _ZERO_DECIMAL else 100
    items = [{"name": rng.choice(_ITEMS), "quantity": str(rng.randint(1, 3)),
              "base_price_money": {"amount": rng.randint(3, 90) * scale, "currency": currency}}
             for _ in range(rng.randint(1, 3))]
    online = kind.startswith("online_")
    source = _ONLINE if online else (
        "Point of Sale" if kind == "point_of_sale_open" else rng.choice(_OTHER_SOURCES[1:]))
    f_type = rng.choice(["SHIPMENT", "SHIPMENT", "PICKUP", "DELIVERY", "DIGITAL"])
    fulfillments = [{"type": f_type, "state": rng.choice(["PROPOSED", "PROPOSED", "RESERVED",
                                                          "PREPARED"])}]
    if online and rng.random() < 0.08:
        fulfillments.append({"type": "PICKUP", "state": "PROPOSED"})
    spec: dict[str, Any] = {
        "location_id": location.id, "source": {"name": source}, "line_items": items,
        "fulfillments": fulfillments,
        "reference_id": str(rng.randint(100_000_000, 999_999_999)),
    }
    if f_type == "SHIPMENT":
        spec["service_charges"] = [{"name": "Shipping", "calculation_phase": "TOTAL_PHASE",
                                    "amount_money": {"amount": rng.choice([0, 5, 8]) * scale,
                                                     "currency": currency}}]
    if rng.random() < 0.25:
        spec["customer_id"] = f"C{square.new_id(12).upper()}"
    via_api = kind not in ("online_no_version", "point_of_sale_open")
    record = square.create_order(merchant_id, spec, via_api=via_api, created_at=created)
    total = record.doc["total_money"]["amount"]
    paid_at = created + timedelta(seconds=rng.randint(5, 600))

    def pay(amount: int, autocomplete: bool = True) -> dict[str, Any]:
        return square.create_payment(merchant_id, {
            "source_id": NONCE_OK, "amount_money": {"amount": amount, "currency": currency},
            "order_id": record.id, "autocomplete": autocomplete,
            "idempotency_key": square.new_id(20)}, created_at=paid_at)

    if kind == "online_unpaid" or total == 0:
        record.settle()
        return record.id
    if kind == "online_partially_paid":
        pay(max(1, total // 2))
    elif kind == "online_card_authorized":
        pay(total, autocomplete=False)
    else:
        payment = pay(total)
        if kind == "online_refunded":
            refund = square.refund_payment(merchant_id, {
                "payment_id": payment["id"], "idempotency_key": square.new_id(20),
                "amount_money": {"amount": max(1, total // rng.choice([1, 2])),
                                 "currency": currency}, "reason": "Customer request"})
            # Refunds start PENDING; Square has processed most of them by now. (Decided from
            # the id, not the rng, so the rest of the seeded data stays as it was.)
            if sum(refund["id"].encode()) % 4:
                square.settle_refund(refund["id"])
        elif kind in ("online_completed", "online_canceled"):
            doc = record.doc
            state = "COMPLETED" if kind == "online_completed" else "CANCELED"
            f_state = "COMPLETED" if state == "COMPLETED" else "CANCELED"
            square.update_order(merchant_id, record.id, {"order": {
                "location_id": location.id, "version": doc["version"], "state": state,
                "fulfillments": [{"uid": f["uid"], "state": f_state}
                                 for f in doc.get("fulfillments", [])]}})
    record.settle()
    return record.id
