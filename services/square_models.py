"""Slim pydantic models of the Square objects this product reads.

The SDK's own decoding costs ~3.7 ms per order (square-api.md §15); these models validate just
the fields we use, straight from the JSON, in microseconds. Unknown fields are ignored and enums
are plain strings, because Square adds values (`DIGITAL`, `IN_STORE`) without notice.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Fulfillment", "LineItem", "Location", "Merchant", "Money", "SquareOrder", "Tender",
           "TokenStatus"]

TERMINAL_FULFILLMENT_STATES = frozenset({"COMPLETED", "CANCELED", "FAILED"})


class _Slim(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Money(_Slim):
    amount: int = 0
    currency: str = ""


class CardDetails(_Slim):
    status: str | None = None


class Tender(_Slim):
    id: str | None = None
    type: str = ""
    amount_money: Money | None = None
    card_details: CardDetails | None = None
    payment_id: str | None = None

    @property
    def card_status(self) -> str | None:
        return self.card_details.status if self.card_details else None


class Fulfillment(_Slim):
    uid: str | None = None
    type: str = ""
    state: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_FULFILLMENT_STATES


class LineItem(_Slim):
    uid: str | None = None
    name: str | None = None
    quantity: str = "1"
    total_money: Money | None = None


class Source(_Slim):
    name: str | None = None


class SquareOrder(_Slim):
    id: str
    location_id: str
    reference_id: str | None = None
    state: str
    version: int | None = None
    source: Source | None = None
    customer_id: str | None = None
    created_at: str
    updated_at: str | None = None
    closed_at: str | None = None
    total_money: Money | None = None
    net_amount_due_money: Money | None = None
    tenders: tuple[Tender, ...] = ()
    fulfillments: tuple[Fulfillment, ...] = ()
    line_items: tuple[LineItem, ...] = ()
    refunds: tuple[dict[str, Any], ...] = ()
    returns: tuple[dict[str, Any], ...] = ()

    @field_validator("tenders", "fulfillments", "line_items", "refunds", "returns",
                     mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return () if value is None else value

    @property
    def source_name(self) -> str | None:
        return self.source.name if self.source else None

    @property
    def currency(self) -> str:
        return self.total_money.currency if self.total_money else ""

    @property
    def total_amount(self) -> int:
        return self.total_money.amount if self.total_money else 0

    @property
    def amount_due(self) -> int:
        return self.net_amount_due_money.amount if self.net_amount_due_money else 0


class Location(_Slim):
    id: str
    name: str = ""
    status: str = "ACTIVE"
    currency: str = ""
    timezone: str | None = None
    business_email: str | None = None


class Merchant(_Slim):
    id: str
    business_name: str | None = None
    country: str | None = None
    currency: str | None = None


class TokenStatus(_Slim):
    scopes: tuple[str, ...] = ()
    expires_at: str | None = None
    merchant_id: str | None = None
    client_id: str | None = None


class SearchOrdersPage(_Slim):
    orders: tuple[SquareOrder, ...] = ()
    cursor: str | None = None


class OrdersBatch(_Slim):
    orders: tuple[SquareOrder, ...] = ()


class OrderEnvelope(_Slim):
    order: SquareOrder | None = None
    errors: tuple[dict[str, Any], ...] = Field(default=())
