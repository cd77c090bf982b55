"""`queue --json` built by the database (issue 11) against the per-order path it replaced, on
both stores, with hostile text in every text field: the same document (keys, their order,
values, `stale`, the merchants section), and nothing a terminal would act on in the bytes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console.output import print_json_objects, print_json_stream
from services.storage import open_store
from services.storage.base import ORDER_COLUMNS, QueuedOrder, Store
from services.storage.sqlite import SQLiteStore
from tests.pg_support import set_template_setup

set_template_setup(lambda url: open_store(url).close())  # test databases start migrated

# What json_inert escapes (and orjson does not): DEL, C1, bidi marks/overrides/isolates, the
# line and paragraph separators. None may reach the bytes raw.
UNSAFE = [chr(c) for c in range(0x7F, 0xA0)] + [
    "\u061c", "\u200e", "\u200f", "\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A))]
HOSTILE = ("Tea\x9b2J\x1b]52;c;x\x07 \u202egnp.exe\u202c \u2066x\u2069\u200f\u061c\x7f"
           "\u2028\u2029\x85 \"q\" \\ \\u0041 \t\r\n\x01\x1f 🙂 𝄞 [@click=app.quit]x[/]"
           " [b]bold[/b] ✓ é")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened: Store = SQLiteStore(tmp_path / "queue.db")
    else:
        opened = open_store(request.getfixturevalue("pg_url"))
    yield opened
    opened.close()


def per_order_document(store: Store, refreshed: set[str], eligible_only: bool,
                       merchant_ids: list[str] | None, rest: dict[str, Any]) -> None:
    """The path `queue --json` took before issue 11, kept here as the reference: every row a
    QueuedOrder, then a dict, then orjson."""
    def to_json(o: QueuedOrder) -> dict[str, Any]:
        return {"merchant_id": o.merchant_id, "order_id": o.order_id,
                "location_id": o.location_id, "version": o.version, "state": o.state,
                "source": o.source,
                "total_money": {"amount": o.total_amount, "currency": o.currency},
                "net_amount_due_money": {"amount": o.due_amount, "currency": o.currency},
                "created_at": o.created_at, "eligible": bool(o.eligible),
                "reason": o.reason, "stale": o.merchant_id not in refreshed,
                "fetched_at": o.fetched_at}
    orders = [o for o in store.queued_orders(eligible_only=eligible_only)
              if not merchant_ids or o.merchant_id in merchant_ids]
    print_json_stream("orders", map(to_json, orders), rest)


def hostile_rows(nul: bool) -> list[tuple[Any, ...]]:
    """Orders of three merchants with hostile text in every text column (and NUL where the
    store can hold it: PostgreSQL text cannot)."""
    rows = []
    text = HOSTILE + ("\x00" if nul else "")
    for index in range(12):
        merchant = ["M1", f"M2 {text}", "M3"][index % 3]
        values = {"order_id": f"O{index:02d} {text}", "merchant_id": merchant,
                  "location_id": f"L {text}", "version": None if index == 4 else index,
                  "state": "OPEN" if index % 5 else f"OPEN {text}",
                  "source": None if index == 7 else f"Square Online {text}",
                  "reference_id": text, "total_amount": 2**62 + index if index == 3 else index,
                  "currency": "USD" if index % 2 else f"U{text}", "due_amount": index % 2,
                  # Out of order, equal times (ties by id), and hostile text as a time.
                  "created_at": ([f"2026-11-{20 - index % 4:02d}T10:00:00.000Z",
                                  "2026-11-19T10:00:00.000Z", text])[index % 3],
                  "updated_at": None, "eligible": index % 2, "reason":
                  None if index % 2 else f"NOT_FULLY_PAID {text}", "detail": text,
                  "consent_id": None, "fulfillments": text, "order_json": "{}",
                  "seen_at": f"2026-11-26T12:00:0{index % 3}.000Z {text}"}
        rows.append(tuple(values[c] for c in ORDER_COLUMNS))
    return rows


@pytest.mark.parametrize(("refreshed", "eligible_only", "merchant_ids", "chunk"), [
    ({"M1", "M3"}, False, None, 5000),
    (set(), False, None, 2),
    ({"M1", f"M2 {HOSTILE}"}, True, None, 1),
    ({"M3"}, False, ["M1", f"M2 {HOSTILE}"], 3),
    ({"M1"}, False, ["nobody"], 5000),
])
def test_database_built_queue_json_is_the_per_order_document(
        store: Store, refreshed: set[str], eligible_only: bool, merchant_ids: list[str] | None,
        chunk: int, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    nul = isinstance(store, SQLiteStore)
    with store.transaction():
        store.write_orders(hostile_rows(nul))
    # A later sync time than an order's seen_at: fetched_at is the later of the two.
    store.save_order_sync("M3", "2026-11-26T13:00:00.000Z", None)
    if merchant_ids and nul:
        merchant_ids = [m + "\x00" if m.startswith("M2") else m for m in merchant_ids]
    refreshed = {m + "\x00" if m.startswith("M2") and nul else m for m in refreshed}
    rest = {"merchants": [{"merchant_id": "M1", "business_name": HOSTILE, "error": None,
                           "open_orders": 4, "stale": False}]}

    per_order_document(store, refreshed, eligible_only, merchant_ids, rest)
    old = capsysbinary.readouterr().out
    print_json_objects("orders", store.queued_orders_json(
        sorted(refreshed), eligible_only=eligible_only, merchant_ids=merchant_ids,
        chunk=chunk), rest)
    new = capsysbinary.readouterr().out

    text = new.decode()
    for char in UNSAFE:
        assert char not in text, f"{char!r} reached the output raw"
    assert not any(ord(c) < 0x20 for c in text.replace("\n", "")), "a raw C0 control"
    # Parsed keeping every object's keys in their order: the same document, order included.
    def pairs(data: bytes) -> Any:
        return json.loads(data, object_pairs_hook=list)
    assert pairs(new) == pairs(old)
    document = json.loads(new)
    expected = 12 if merchant_ids is None else (0 if merchant_ids == ["nobody"] else 8)
    if eligible_only:
        expected //= 2
    assert len(document["orders"]) == expected
    if expected:  # the hostile text came through exactly, not merely escaped away
        assert any(HOSTILE in o["order_id"] for o in document["orders"])
    if refreshed == {"M1", "M3"}:
        assert {o["stale"] for o in document["orders"]} == {True, False}


@pytest.mark.parametrize("eligible_only", [False, True])
def test_orders_joined_per_merchant_are_the_orders_json_bytes(store: Store,
                                                              eligible_only: bool) -> None:
    """`queued_orders_json_joined` (merchants' objects in one text: what `queue --json`'s
    worker writes, console/commands.py) is `queued_orders_json`, byte for byte: merchant by
    merchant in the order asked, each one's `stale` as given, ties by id, hostile text."""
    nul = isinstance(store, SQLiteStore)
    with store.transaction():
        store.write_orders(hostile_rows(nul))
    store.save_order_sync("M3", "2026-11-26T13:00:00.000Z", None)
    hostile = "M2 " + HOSTILE + ("\x00" if nul else "")
    assert store.merchants_with_orders() == sorted(["M1", hostile, "M3"])
    separator = ",\n    "
    asked = [("M3", False), ("nobody", False), (hostile, True), ("M1", True)]
    joined = store.queued_orders_json_joined(asked, separator, eligible_only)
    expected = []
    for merchant_id, stale in asked:
        refreshed = [] if stale else [merchant_id]
        expected.extend(text for chunk in store.queued_orders_json(
            refreshed, eligible_only, merchant_ids=[merchant_id], chunk=1) for text in chunk)
    assert len(expected) == (6 if eligible_only else 12)
    assert joined == separator.encode().join(expected)
    assert store.queued_orders_json_joined([], separator, eligible_only) == b""
    assert store.queued_orders_json_joined([("nobody", True)], separator, eligible_only) == b""


def test_plain_ascii_output_still_has_del_escaped() -> None:
    """json_inert's shortcut for plain ASCII must not skip DEL, the one ASCII it escapes."""
    from services.text_safety import json_inert
    assert json_inert(b'{"a": "x\x7fy"}') == b'{"a": "x\\u007fy"}'
    assert json_inert(b'{"a": "xy"}') == b'{"a": "xy"}'
