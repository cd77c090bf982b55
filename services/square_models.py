"""Slim models of the Square objects this product reads.

The SDK's own decoding costs ~3.7 ms per order (square-api.md §15); these models validate just
the fields we use, straight from the JSON, in microseconds. Unknown fields are ignored and enums
are plain strings, because Square adds values (`DIGITAL`, `IN_STORE`) without notice.

Two flavours of the order: pydantic models for the low-volume edges (completion, tests), and
msgspec Structs (`OrderStruct`) for SearchOrders pages, where 100,000 orders are decoded per
discovery and msgspec decodes a page into them ~6x faster than pydantic (issue 11). Both have
the same fields, names and properties, so `classify` takes either (`OrderLike`), and the order
as `orders` stores it (`StoredOrder`) too.
"""

from __future__ import annotations

from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Classifiable", "Fulfillment", "LineItem", "Location", "Merchant", "Money", "OrderLike",
           "OrderStruct", "SearchPageStruct", "SquareOrder", "StoredOrder", "Tender", "TokenStatus",
           "decode_order", "decode_order_envelope", "decode_orders_batch", "decode_search_page",
           "encode_order", "encode_stored", "order_document", "stored_order"]

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
"""Either flavour of the same slim order, as read from Square."""


# ---------------------------------------------------------------------- the stored order
# What `orders.order_json` keeps (issue 11): only what classification and the detail panel
# read, as positional arrays. About 290 bytes an order against 860 for the slim order as
# JSON: writing 100,000 of those was a third of a full discovery (the row, the WAL and the
# checkpoint). Rows written before are slim-order objects; `decode_order` and
# `order_document` read both (an array starts with `[`, an object with `{`).

class StoredItem(_S, array_like=True):
    name: str | None = None
    quantity: str = "1"
    amount: int = 0
    currency: str = ""


class StoredTender(_S, array_like=True):
    type: str = ""
    card_status: str | None = None
    amount: int = 0
    currency: str = ""


class StoredFulfillment(_S, array_like=True):
    type: str = ""
    state: str = ""


class StoredOrder(_S, array_like=True, tag=1):
    """The order as stored: encoded `[1, id, location_id, ...]` (the tag is the format's
    version). Its fields have the names of the slim order's properties, so `classify` reads
    it as it reads the others."""
    id: str
    location_id: str
    state: str
    created_at: str
    version: int | None = None
    source_name: str | None = None
    reference_id: str | None = None
    updated_at: str | None = None
    total_amount: int = 0
    currency: str = ""
    amount_due: int = 0
    line_items: list[StoredItem] = msgspec.field(default_factory=list)
    tenders: list[StoredTender] = msgspec.field(default_factory=list)
    fulfillments: list[StoredFulfillment] = msgspec.field(default_factory=list)
    # Kept whole: rare, and only whether there are any matters to classification.
    refunds: tuple[dict[str, Any], ...] = ()
    returns: tuple[dict[str, Any], ...] = ()


Classifiable = OrderLike | StoredOrder
"""What `classify` and `order_row` take: an order read from Square or from `orders`."""

_PAGE_DECODER = msgspec.json.Decoder(SearchPageStruct)
_ORDER_DECODER = msgspec.json.Decoder(OrderStruct)
_STORED_DECODER = msgspec.json.Decoder(StoredOrder)
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


def _is_stored(data: str | bytes) -> bool:
    return data[:1] in ("[", b"[")


def decode_order(data: str | bytes) -> StoredOrder | OrderStruct:
    """An order as stored in `orders.order_json` (either format, see `StoredOrder`)."""
    return _STORED_DECODER.decode(data) if _is_stored(data) else _ORDER_DECODER.decode(data)


def stored_order(order: Classifiable) -> StoredOrder:
    """The order as `orders.order_json` keeps it."""
    if isinstance(order, StoredOrder):
        return order
    items: tuple[LineItem | LineItemStruct, ...]
    tenders: tuple[Tender | TenderStruct, ...]
    fulfillments: tuple[Fulfillment | FulfillmentStruct, ...]
    if isinstance(order, OrderStruct):  # discovery's: its fields, not its properties
        items, tenders = order.line_items_ or (), order.tenders_ or ()
        fulfillments = order.fulfillments_ or ()
        refunds, returns = order.refunds_ or (), order.returns_ or ()
    else:
        items, tenders, fulfillments = order.line_items, order.tenders, order.fulfillments
        refunds, returns = order.refunds, order.returns
    # Plain loops, money read inline: 100,000 orders per discovery (issue 11).
    stored_items = []
    for item in items:
        money = item.total_money
        stored_items.append(StoredItem(item.name, item.quantity, money.amount, money.currency)
                            if money is not None else StoredItem(item.name, item.quantity))
    stored_tenders = []
    for tender in tenders:
        money, card = tender.amount_money, tender.card_details
        status = card.status if card is not None else None
        stored_tenders.append(StoredTender(tender.type, status, money.amount, money.currency)
                              if money is not None else StoredTender(tender.type, status))
    source, total, due = order.source, order.total_money, order.net_amount_due_money
    return StoredOrder(
        order.id, order.location_id, order.state, order.created_at, order.version,
        source.name if source is not None else None, order.reference_id, order.updated_at,
        total.amount if total is not None else 0, total.currency if total is not None else "",
        due.amount if due is not None else 0, stored_items, stored_tenders,
        [StoredFulfillment(f.type, f.state) for f in fulfillments], tuple(refunds),
        tuple(returns))


def encode_stored(order: StoredOrder) -> str:
    return _ENCODER.encode(order).decode()


def encode_order(order: Classifiable) -> str:
    """The order as `orders.order_json` keeps it (see `StoredOrder`)."""
    return encode_stored(stored_order(order))


def _slim(order: StoredOrder) -> OrderStruct:
    """The slim order a stored one was made from, less what no reader needs (ids, uids)."""
    def money(amount: int, currency: str) -> MoneyStruct:
        return MoneyStruct(amount, currency)
    return OrderStruct(
        id=order.id, location_id=order.location_id, state=order.state,
        created_at=order.created_at, reference_id=order.reference_id, version=order.version,
        source=SourceStruct(order.source_name) if order.source_name is not None else None,
        updated_at=order.updated_at, total_money=money(order.total_amount, order.currency),
        net_amount_due_money=money(order.amount_due, order.currency),
        tenders_=tuple(TenderStruct(type=t.type, amount_money=money(t.amount, t.currency),
                                    card_details=CardDetailsStruct(t.card_status)
                                    if t.card_status is not None else None)
                       for t in order.tenders) or None,
        fulfillments_=tuple(FulfillmentStruct(type=f.type, state=f.state)
                            for f in order.fulfillments) or None,
        line_items_=tuple(LineItemStruct(name=i.name, quantity=i.quantity,
                                         total_money=money(i.amount, i.currency))
                          for i in order.line_items) or None,
        refunds_=order.refunds or None, returns_=order.returns or None)


def order_document(data: str | bytes) -> dict[str, Any]:
    """`orders.order_json` as the detail panel reads it: the slim order's JSON object
    (Square's names, default values left out), whichever format the row has."""
    if _is_stored(data):
        document: dict[str, Any] = msgspec.to_builtins(_slim(_STORED_DECODER.decode(data)))
    else:
        document = msgspec.json.decode(data)
    return document
