"""Slim models of the Square objects this product reads.

The SDK's own decoding costs ~3.7 ms per order (square-api.md §15); these models validate just
the fields we use, straight from the JSON, in microseconds. Unknown fields are ignored and enums
are plain strings, because Square adds values (`DIGITAL`, `IN_STORE`) without notice.

Two flavours of the order: pydantic models for the low-volume edges (completion, tests), and
msgspec Structs (`OrderStruct`) for SearchOrders pages, where 100,000 orders are decoded per
discovery and msgspec decodes a page into them ~6x faster than pydantic (issue 11). Both have
the same fields, names and properties, so `classify` takes either (`OrderLike`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Fulfillment", "LineItem", "Location", "Merchant", "Money", "OrderLike", "OrderStruct",
           "SearchPageStruct", "SquareOrder", "Tender", "TokenStatus", "decode_order",
           "decode_order_envelope", "decode_orders_batch", "decode_search_page", "encode_order"]

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


# ---------------------------------------------------------------------- msgspec (fast path)
# Square leaves empty lists out, but a `null` must not fail a whole page: list fields are
# decoded as `X | None` under their Square name and read through a property that gives `()`.

class _S(msgspec.Struct, omit_defaults=True, gc=False):
    pass


class MoneyStruct(_S):
    amount: int = 0
    currency: str = ""


class CardDetailsStruct(_S):
    status: str | None = None


class TenderStruct(_S):
    id: str | None = None
    type: str = ""
    amount_money: MoneyStruct | None = None
    card_details: CardDetailsStruct | None = None
    payment_id: str | None = None

    @property
    def card_status(self) -> str | None:
        return self.card_details.status if self.card_details else None


class FulfillmentStruct(_S):
    uid: str | None = None
    type: str = ""
    state: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_FULFILLMENT_STATES


class LineItemStruct(_S):
    uid: str | None = None
    name: str | None = None
    quantity: str = "1"
    total_money: MoneyStruct | None = None


class SourceStruct(_S):
    name: str | None = None


class OrderStruct(_S):
    id: str
    location_id: str
    state: str
    created_at: str
    reference_id: str | None = None
    version: int | None = None
    source: SourceStruct | None = None
    customer_id: str | None = None
    updated_at: str | None = None
    closed_at: str | None = None
    total_money: MoneyStruct | None = None
    net_amount_due_money: MoneyStruct | None = None
    tenders_: tuple[TenderStruct, ...] | None = msgspec.field(default=None, name="tenders")
    fulfillments_: tuple[FulfillmentStruct, ...] | None = msgspec.field(default=None,
                                                                          name="fulfillments")
    line_items_: tuple[LineItemStruct, ...] | None = msgspec.field(default=None,
                                                                     name="line_items")
    refunds_: tuple[dict[str, Any], ...] | None = msgspec.field(default=None, name="refunds")
    returns_: tuple[dict[str, Any], ...] | None = msgspec.field(default=None, name="returns")

    @property
    def tenders(self) -> tuple[TenderStruct, ...]:
        return self.tenders_ or ()

    @property
    def fulfillments(self) -> tuple[FulfillmentStruct, ...]:
        return self.fulfillments_ or ()

    @property
    def line_items(self) -> tuple[LineItemStruct, ...]:
        return self.line_items_ or ()

    @property
    def refunds(self) -> tuple[dict[str, Any], ...]:
        return self.refunds_ or ()

    @property
    def returns(self) -> tuple[dict[str, Any], ...]:
        return self.returns_ or ()

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


class SearchPageStruct(_S):
    orders: list[OrderStruct] = msgspec.field(default_factory=list)
    cursor: str | None = None


class OrdersBatchStruct(_S):
    orders: list[OrderStruct] | None = None


class OrderEnvelopeStruct(_S):
    order: OrderStruct | None = None


OrderLike = SquareOrder | OrderStruct
"""What `classify` and `order_row` take: either flavour of the same slim order."""

_PAGE_DECODER = msgspec.json.Decoder(SearchPageStruct)
_ORDER_DECODER = msgspec.json.Decoder(OrderStruct)
_ENCODER = msgspec.json.Encoder()


def decode_search_page(data: bytes) -> SearchPageStruct:
    """A SearchOrders page, straight from the response bytes (raises msgspec.ValidationError
    or msgspec.DecodeError when it does not have the expected shape)."""
    return _PAGE_DECODER.decode(data)


_BATCH_DECODER = msgspec.json.Decoder(OrdersBatchStruct)
_ENVELOPE_DECODER = msgspec.json.Decoder(OrderEnvelopeStruct)


def decode_orders_batch(data: bytes) -> list[OrderStruct]:
    """BatchRetrieveOrders' orders, straight from the bytes (raises as `decode_search_page`)."""
    return _BATCH_DECODER.decode(data).orders or []


def decode_order_envelope(data: bytes) -> OrderStruct | None:
    """UpdateOrder's `{"order": ...}`, straight from the bytes: 5,000 of them per completion,
    where pydantic's validation was a tenth of the client's CPU."""
    return _ENVELOPE_DECODER.decode(data).order


def decode_order(data: str | bytes) -> OrderStruct:
    """An order as stored in `orders.order_json` (either flavour wrote it)."""
    return _ORDER_DECODER.decode(data)


def encode_order(order: OrderLike) -> str:
    """The slim order as `orders.order_json` keeps it (the detail panel reads it)."""
    if isinstance(order, OrderStruct):
        return _ENCODER.encode(order).decode()
    return order.model_dump_json(exclude_defaults=True)
