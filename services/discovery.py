"""Discovery: for every merchant with credentials, find its OPEN orders and classify them.

Merchants run concurrently (bounded); each one's token health, profile and locations come first,
then SearchOrders over its ACTIVE locations in chunks of 10, every cursor followed. A failure is
recorded on that merchant and never stops the others; its cached orders stay (marked stale by
the caller), except under a token that is another merchant's: those are dropped, because
nothing seen through such a token may be filed under this merchant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import orjson

from services.consent import ConsentRecord
from services.credentials import MerchantCredentials
from services.eligibility import ConsentView, classify
from services.errors import (
    ReconError,
    SquareAuthError,
    SquareScopeError,
    TokenMerchantMismatch,
)
from services.square_gateway import SquareGateway
from services.square_models import Location, SquareOrder
from services.store import Store, utc_text

__all__ = ["NEEDED_SCOPES", "MerchantDiscovery", "TokenHealth", "discover", "order_row"]

NEEDED_SCOPES = ("ORDERS_READ", "ORDERS_WRITE", "PAYMENTS_READ", "MERCHANT_PROFILE_READ")
TOKEN_EXPIRY_WARNING = timedelta(days=8)
OPEN_ORDERS_QUERY = {"filter": {"state_filter": {"states": ["OPEN"]}},
                     "sort": {"sort_field": "CREATED_AT", "sort_order": "ASC"}}


class TokenHealth:
    VALID = "valid"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    REVOKED = "revoked"
    INVALID = "invalid"
    MISSING_SCOPES = "missing_scopes"
    MERCHANT_MISMATCH = "merchant_mismatch"   # Square says the token is another merchant's
    UNKNOWN = "unknown"


@dataclass
class MerchantDiscovery:
    merchant_id: str
    business_name: str | None = None
    token_health: str = TokenHealth.UNKNOWN
    error: str | None = None
    orders: int = 0
    eligible: int = 0
    refreshed: bool = False     # its orders were re-read from Square just now
    locations: list[Location] = field(default_factory=list)


def _fulfillment_summary(order: SquareOrder) -> str:
    return ",".join(f"{f.type}:{f.state}" for f in order.fulfillments)


def order_row(order: SquareOrder, merchant_id: str, consents: Sequence[ConsentRecord],
              now: datetime, seen_at: str, view: ConsentView | None = None
              ) -> dict[str, object]:
    verdict = classify(order, consents, now, view)
    return {
        "order_id": order.id, "merchant_id": merchant_id, "location_id": order.location_id,
        "version": order.version, "state": order.state, "source": order.source_name,
        "reference_id": order.reference_id, "total_amount": order.total_amount,
        "currency": order.currency, "due_amount": order.amount_due,
        "created_at": order.created_at, "updated_at": order.updated_at,
        "eligible": int(verdict.eligible),
        "reason": verdict.reason.value if verdict.reason else None, "detail": verdict.detail,
        "consent_id": verdict.consent.consent_id if verdict.consent else None,
        "fulfillments": _fulfillment_summary(order),
        "order_json": order.model_dump_json(exclude_defaults=True),
        "seen_at": seen_at,
    }


async def _discover_one(gateway: SquareGateway, store: Store, creds: MerchantCredentials,
                        consents: Sequence[ConsentRecord], now: datetime) -> MerchantDiscovery:
    report = MerchantDiscovery(creds.merchant_id)
    row: dict[str, object] = {"merchant_id": creds.merchant_id,
                              "sync_time": creds.sync_time.strftime("%H:%M")
                              if creds.sync_time else None}
    try:
        try:
            status = await gateway.token_status(creds)
        except SquareAuthError as error:
            report.token_health = {"ACCESS_TOKEN_EXPIRED": TokenHealth.EXPIRED,
                                   "ACCESS_TOKEN_REVOKED": TokenHealth.REVOKED}.get(
                error.code, TokenHealth.INVALID)
            raise
        missing = [s for s in NEEDED_SCOPES if s not in status.scopes]
        expires = (datetime.fromisoformat(status.expires_at.replace("Z", "+00:00"))
                   if status.expires_at else None)
        if missing:
            report.token_health = TokenHealth.MISSING_SCOPES
        elif expires is not None and expires - now <= TOKEN_EXPIRY_WARNING:
            report.token_health = TokenHealth.EXPIRING
        else:
            report.token_health = TokenHealth.VALID
        row.update(token_expires_at=status.expires_at, token_scopes=",".join(status.scopes))
        merchant = await gateway.merchant(creds)
        locations = await gateway.locations(creds)
        report.business_name = merchant.business_name
        report.locations = locations
        active = [loc.id for loc in locations if loc.status == "ACTIVE"]
        timezone = next((loc.timezone for loc in locations if loc.timezone), None)
        row.update(business_name=merchant.business_name, country=merchant.country,
                   currency=merchant.currency, timezone=timezone,
                   locations_json=orjson.dumps([loc.model_dump() for loc in locations]).decode(),
                   fetched_at=utc_text(now))
        if "ORDERS_READ" in missing:
            raise SquareScopeError(status=403, code="INSUFFICIENT_SCOPES",
                                   detail="ORDERS_READ missing")
        seen_at = utc_text(now)
        view = ConsentView.build(consents, now)
        rows: list[dict[str, object]] = []
        for start in range(0, len(active), 10):
            async for page in gateway.search_orders(creds, active[start:start + 10],
                                                    OPEN_ORDERS_QUERY):
                rows.extend(order_row(order, creds.merchant_id, consents, now, seen_at, view)
                            for order in page)
        store.replace_orders(creds.merchant_id, rows)
        report.refreshed = True
        report.orders = len(rows)
        report.eligible = sum(1 for r in rows if r["eligible"])
        if missing:
            report.error = (f"Token lacks {', '.join(missing)}: orders are shown but cannot be "
                            "completed until the merchant re-authorizes.")
    except TokenMerchantMismatch as error:
        report.token_health = TokenHealth.MERCHANT_MISMATCH
        report.error = str(error)
        # Whatever is stored under this id may have come through that token: none of it may
        # stay a candidate.
        store.replace_orders(creds.merchant_id, [])
    except ReconError as error:
        report.error = str(error)
    row.update(token_health=report.token_health, discovery_error=report.error,
               discovered_at=utc_text(now))
    store.upsert_merchant(row)
    return report


async def discover(gateway: SquareGateway, store: Store,
                   credentials: dict[str, MerchantCredentials],
                   consents: dict[str, list[ConsentRecord]], now: datetime, *,
                   concurrency: int = 16, merchant_ids: Sequence[str] | None = None,
                   on_merchant: Callable[[MerchantDiscovery], None] | None = None
                   ) -> list[MerchantDiscovery]:
    wanted = list(merchant_ids) if merchant_ids is not None else sorted(credentials)
    gate = asyncio.Semaphore(concurrency)

    async def one(merchant_id: str) -> MerchantDiscovery:
        async with gate:
            report = await _discover_one(gateway, store, credentials[merchant_id],
                                         consents.get(merchant_id, []), now)
        if on_merchant is not None:
            on_merchant(report)
        return report

    return list(await asyncio.gather(*(one(m) for m in wanted)))
