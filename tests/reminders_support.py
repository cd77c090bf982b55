"""Reminder test data written straight into a store (no Square needed: reminders plan from what
discovery stored), and SMTP handlers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta
from typing import Any

import orjson

from services.reminders.local_server import Mailbox
from services.store import Store, utc_text

ZONES = ["America/New_York", "Europe/London", "Asia/Tokyo", "Australia/Sydney"]


def add_merchant(store: Store, merchant_id: str, *, name: str | None = None,
                 timezone: str = "America/New_York", email: str | None = "owner@shop.example",
                 locations: int = 1, error: str | None = None) -> list[str]:
    ids = [f"{merchant_id}-L{i}" for i in range(locations)]
    store.upsert_merchant({
        "merchant_id": merchant_id, "business_name": name or f"Shop {merchant_id}",
        "currency": "USD", "timezone": timezone, "discovery_error": error,
        "locations_json": orjson.dumps([
            {"id": lid, "name": f"Location {i}", "status": "ACTIVE", "currency": "USD",
             "timezone": timezone, "business_email": email} for i, lid in enumerate(ids)
        ]).decode()})
    return ids


def add_orders(store: Store, merchant_id: str, location_id: str, now: datetime,
               ages_days: list[float], reason: str = "NO_CONSENT", amount: int = 1250,
               currency: str = "USD", prefix: str = "") -> list[str]:
    rows = []
    existing = store.queued_orders(merchant_id)
    for index, age in enumerate(ages_days):
        order_id = f"{prefix or merchant_id}-O{len(existing) + index}"
        rows.append({
            "order_id": order_id, "merchant_id": merchant_id, "location_id": location_id,
            "version": None if reason == "MANUAL_ONLY" else 3, "state": "OPEN",
            "source": "Square Online", "reference_id": f"R{100000 + len(existing) + index}",
            "total_amount": amount, "currency": currency, "due_amount": 0,
            "created_at": utc_text(now - timedelta(days=age)), "updated_at": None,
            "eligible": 0, "reason": reason, "detail": "", "consent_id": None,
            "fulfillments": "", "order_json": "{}", "seen_at": utc_text(now)})
    columns = list(rows[0])
    with store.transaction() as conn:
        conn.executemany(f"INSERT INTO orders ({', '.join(columns)}) VALUES "
                         f"({', '.join('?' for _ in columns)})",
                         [[r[c] for c in columns] for r in rows])
    return [r["order_id"] for r in rows]


def fill(store: Store, merchants: int, now: datetime, orders_each: int = 3,
         zones: list[str] | None = None) -> list[str]:
    """Many merchants without consent, each with a few paid open orders."""
    ids = []
    for index in range(merchants):
        merchant_id = f"M{index:05d}"
        zone = (zones or ["UTC"])[index % len(zones or ["UTC"])]
        (location,) = add_merchant(store, merchant_id, timezone=zone,
                                   email=f"orders{index}@shop{index}.example")
        add_orders(store, merchant_id, location, now,
                   [2.0 + i for i in range(orders_each)])
        ids.append(merchant_id)
    return ids


class ScriptedMailbox(Mailbox):
    """Answers DATA from a script: per message number (1-based), an SMTP reply string, or
    'drop' to close the connection without answering, or 'hold' to wait until released."""

    def __init__(self, script: dict[int, str] | None = None, default: str | None = None) -> None:
        super().__init__()
        self.script = script or {}
        self.default = default
        self.attempts = 0
        self.held = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.attempts += 1
        action = self.script.get(self.attempts, self.default)
        if action == "drop":
            server.transport.close()
            return "421 4.4.2 closing"
        if action == "hold":
            await super().handle_DATA(server, session, envelope)  # the server has it
            self.held.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
            return "250 OK"
        if action is not None:
            return action
        return await super().handle_DATA(server, session, envelope)
