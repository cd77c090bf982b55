"""The order as `orders.order_json` stores it (issue 11: a compact array, `StoredOrder`) gives
the same queue, the same verdicts and the same detail panel as the slim order stored before.

`tests/data/stored_orders_before.json` was written by this file's `observe` run on the code
before the change (main at 759eb62, where `order_json` held the slim order as a JSON object):
per order its queue row, the detail panel's text and that `order_json`. The orders are
Square's JSON as a SearchOrders page brings it: refunds, returns, uncaptured and mixed
tenders, partial payments, several fulfillments, missing and null fields, hostile text, for
merchants with and without a consent that covers them.

    # rewrite the file from another checkout (only ever from the code before the change):
    RECORD_BEFORE=1 python -c "import sys; sys.path.insert(0, '<checkout>'); import runpy; \\
        runpy.run_path('tests/test_stored_orders.py', run_name='record')"
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from console.widgets.order_detail import OrderDetail
from services.consent import ConsentRecord
from services.discovery import order_values
from services.eligibility import ConsentView, classify
from services.square_models import decode_order, decode_search_page
from services.storage import open_store
from services.store import SQLiteStore, Store

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SEEN_AT = "2026-11-26T12:00:00.000000Z"
DATA = Path(__file__).parent / "data"
BEFORE = DATA / "stored_orders_before.json"


def hostile() -> list[str]:
    """tests/data/hostile_strings.txt, the longest cut to their ends (both are hostile)."""
    lines = (DATA / "hostile_strings.txt").read_text().splitlines()
    found = [json.loads(line) for line in lines if line.strip() and not line.startswith("#")]
    return [s if len(s) <= 200 else s[:100] + s[-100:] for s in found]


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def money(amount: int, currency: str = "USD") -> dict[str, Any]:
    return {"amount": amount, "currency": currency}


def card(status: str | None, amount: int, n: int = 1) -> dict[str, Any]:
    tender: dict[str, Any] = {"id": f"T{n}", "type": "CARD", "amount_money": money(amount),
                              "payment_id": f"P{n}", "transaction_id": "ignored"}
    if status is not None:
        tender["card_details"] = {"status": status, "card": {"last_4": "1111"}}
    return tender


def base_order(order_id: str) -> dict[str, Any]:
    return {"id": order_id, "location_id": "L1", "reference_id": f"ref-{order_id}",
            "state": "OPEN", "version": 3, "source": {"name": "Square Online"},
            "customer_id": "C1", "created_at": stamp(NOW - timedelta(days=3)),
            "updated_at": stamp(NOW - timedelta(days=2)), "total_money": money(2500),
            "net_amount_due_money": money(0), "tenders": [card("CAPTURED", 2500)],
            "fulfillments": [{"uid": "F1", "type": "PICKUP", "state": "PROPOSED"}],
            "line_items": [{"uid": "I1", "name": "Widget", "quantity": "2",
                            "base_price_money": money(1250), "total_money": money(2500)}],
            "net_amounts": {"total_money": money(2500)}, "metadata": {"k": "v"}}


DROP = "<left out>"


def variants() -> list[dict[str, Any]]:
    """Changes to `base_order`, one order each (`DROP`: the key left out)."""
    text = hostile()
    three_days = NOW - timedelta(days=3)
    cases: list[dict[str, Any]] = [
        {},
        {"refunds": [{"id": "RF1", "status": "PENDING", "amount_money": money(500),
                      "reason": text[0]}]},
        {"returns": [{"uid": "RT1", "return_line_items": [{"name": "Widget",
                                                            "quantity": "1"}]}]},
        {"refunds": [], "returns": None},
        {"tenders": [card("AUTHORIZED", 2500)]},
        {"tenders": [card("VOIDED", 2500)]},
        {"tenders": [card("FAILED", 2500)]},
        {"tenders": [card("CAPTURED", 1500), card("AUTHORIZED", 1000, 2)]},
        {"tenders": [card(None, 2500)]},
        {"tenders": [{"type": "CASH", "amount_money": money(1000)}, card("CAPTURED", 500, 2)],
         "net_amount_due_money": money(1000)},
        {"tenders": [{"type": "CASH", "amount_money": money(2500)}]},
        {"tenders": None},
        {"tenders": []},
        {"tenders": DROP, "fulfillments": DROP, "line_items": DROP, "version": DROP,
         "source": DROP, "net_amount_due_money": DROP, "updated_at": DROP},
        {"net_amount_due_money": None},
        {"version": None},
        {"fulfillments": [{"uid": "F1", "type": "PICKUP", "state": "PROPOSED"},
                          {"uid": "F2", "type": "SHIPMENT", "state": "COMPLETED"},
                          {"uid": "F3", "type": "DELIVERY", "state": "CANCELED"},
                          {"uid": "F4", "type": "DIGITAL", "state": "FAILED"}]},
        {"fulfillments": None, "line_items": []},
        {"fulfillments": [{"uid": "F1"}], "line_items": [{"uid": "I1"}]},
        {"line_items": [{"name": "No money"}, {"quantity": "0.5", "total_money": {}},
                        {"name": "Other currency", "total_money": money(7, "JPY")}]},
        {"source": {"name": "Point of Sale"}},
        {"source": None},
        {"source": {}},
        {"created_at": stamp(NOW - timedelta(hours=1))},
        {"created_at": stamp(NOW - timedelta(hours=24))},
        {"created_at": "2026-11-26T12:30:00+02:00"},
        {"total_money": money(600000), "tenders": [card("CAPTURED", 600000)]},
        {"total_money": money(2500, "CAD"), "net_amount_due_money": money(0, "CAD")},
        {"total_money": None},
        {"location_id": "L2"},
        {"created_at": stamp(three_days), "updated_at": None, "reference_id": None},
        # Hostile text wherever Square's text reaches the queue and the panel.
        {"reference_id": text[1], "source": {"name": text[2]}},
        {"line_items": [{"uid": f"I{i}", "name": s, "quantity": s[:5],
                         "total_money": money(i, "USD")} for i, s in enumerate(text)],
         "tenders": [{"type": text[3], "amount_money": money(2500, text[4][:8]),
                      "card_details": {"status": text[5]}}],
         "fulfillments": [{"uid": "F1", "type": text[6], "state": text[7]},
                          {"uid": "F2", "type": "SHIPMENT", "state": text[-1]}]},
        {"reference_id": "\u202eevil", "line_items": [{"name": "", "quantity": ""}]},
    ]
    return cases


def orders(merchant_id: str) -> list[dict[str, Any]]:
    found = []
    for n, changes in enumerate(variants()):
        order = base_order(f"{merchant_id}-{n:02d}")
        for key, value in changes.items():
            if value == DROP:
                del order[key]
            else:
                order[key] = value
        found.append(order)
    return found


def consents() -> dict[str, list[ConsentRecord]]:
    """M1 covers everything (24 h, 5,000.00 USD a batch); M2 has none; M3's is revoked; M4's
    covers one location and two sources, with a limit in EUR; M5's is not yet in force."""
    full = json.loads((DATA / "consent" / "valid" / "full.json").read_text())

    def record(merchant_id: str, **changes: Any) -> ConsentRecord:
        document = dict(full, merchant_id=merchant_id,
                        consent_id=str(uuid.uuid5(uuid.NAMESPACE_URL, merchant_id)))
        document.update(changes)
        return ConsentRecord.model_validate(document)

    scope = dict(full["scope"], order_sources=["Square Online", "Point of Sale"],
                 min_order_age_hours=0, max_amount_per_batch=money(100000, "EUR"))
    return {
        "M1": [record("M1")],
        "M2": [],
        "M3": [record("M3", revocation={"revoked_at": "2026-11-20T00:00:00Z",
                                        "revoked_by": "Owner", "reason": hostile()[8]})],
        "M4": [record("M4", location_ids=["L1"], scope=scope)],
        "M5": [record("M5", effective_from="2026-12-01T00:00:00Z")],
    }


def render(order: Any, document: dict[str, Any] | None) -> list[str]:
    """Every text the detail panel shows: its lines, each table's title and cells."""
    detail = OrderDetail()
    shown: list[Any] = []
    detail.update = shown.append  # type: ignore[method-assign]
    detail.show(order, document, "Merchant")
    plain: list[str] = []
    for part in shown[0].renderables:
        if hasattr(part, "columns"):
            plain.append(str(part.title))
            plain.extend(f"{column.header}={cell.plain}" for column in part.columns
                         for cell in column.cells)
        else:
            plain.append(part.plain)
    return plain


def observe(directory: Path, store: Store | None = None) -> list[dict[str, Any]]:
    """What discovery writes for these orders, read back as the queue and the panel do."""
    store = store or SQLiteStore(directory / "orders.db")
    every = consents()
    try:
        for merchant_id, records in every.items():
            view = ConsentView.build(records, NOW)
            page = decode_search_page(json.dumps({"orders": orders(merchant_id)}).encode())
            rows = [order_values(o, merchant_id, records, NOW, SEEN_AT, view)
                    for o in page.orders]
            with store.transaction():
                store.write_orders(rows)
        documents = {order_id: document for merchant_id in every
                     for order_id, document in store.orders_json(merchant_id)}
        return [{"row": list(msgspec.structs.astuple(queued)),
                 "panel": render(queued, store.order_json(queued.order_id)),
                 "order_json": documents[queued.order_id]} for queued in store.queued_orders()]
    finally:
        store.close()


def test_queue_verdicts_and_panel_are_as_before(tmp_path: Path) -> None:
    before = json.loads(BEFORE.read_text())
    now = observe(tmp_path)
    assert len(now) == len(before) == 5 * len(variants())
    for seen, was in zip(now, before, strict=True):
        assert seen["row"] == was["row"], seen["row"][0]
        assert seen["panel"] == was["panel"], seen["row"][0]
    # Every reason classification can give from an order is among them.
    reasons = {was["row"][12] for was in before}
    assert {"REFUNDED", "PAYMENT_NOT_CAPTURED", "NOT_FULLY_PAID", "MANUAL_ONLY",
            "OUTSIDE_CONSENT_SCOPE", "TOO_RECENT", "OVER_AMOUNT_LIMIT", "NO_CONSENT",
            "CONSENT_REVOKED", "CONSENT_NOT_YET_EFFECTIVE", None} <= reasons
    # And the new documents are smaller than the old ones.
    assert sum(len(s["order_json"]) for s in now) < sum(len(w["order_json"]) for w in before) / 2


def test_rows_stored_before_still_read_the_same(tmp_path: Path) -> None:
    """A database written before the change keeps its slim-order documents: refresh
    re-classifies them, the panel shows them, exactly as before."""
    before = json.loads(BEFORE.read_text())
    every = consents()
    for was in before:
        merchant_id = was["row"][1]
        order = decode_order(was["order_json"])
        verdict = classify(order, every[merchant_id], NOW)
        assert (int(verdict.eligible), verdict.reason, verdict.detail) == (
            was["row"][11], was["row"][12], was["row"][13])
    store = SQLiteStore(tmp_path / "old.db")
    try:
        with store.transaction() as conn:
            for was in before:
                conn.execute("INSERT INTO orders (order_id, merchant_id, location_id, version, "
                             "state, source, reference_id, total_amount, currency, due_amount, "
                             "created_at, eligible, reason, detail, consent_id, fulfillments, "
                             "seen_at, order_json) VALUES "
                             f"({', '.join('?' * 18)})", [*was["row"][:16], SEEN_AT,
                                                          was["order_json"]])
        for queued, was in zip(store.queued_orders(), before, strict=True):
            assert render(queued, store.order_json(queued.order_id)) == was["panel"]
    finally:
        store.close()


def test_stored_documents_classify_as_their_rows(tmp_path: Path) -> None:
    """Refresh by change classifies unchanged rows again from `order_json` alone."""
    now = observe(tmp_path)
    every = consents()
    for seen in now:
        row = seen["row"]
        verdict = classify(decode_order(seen["order_json"]), every[row[1]], NOW)
        assert (int(verdict.eligible), verdict.reason, verdict.detail) == (
            row[11], row[12], row[13])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_both_stores_give_the_panel_and_the_verdicts_as_before(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = (SQLiteStore(tmp_path / "o.db") if backend == "sqlite"
             else open_store(request.getfixturevalue("pg_url")))
    before = json.loads(BEFORE.read_text())
    now = observe(tmp_path, store)  # closes the store
    every = consents()
    assert [seen["row"][:16] for seen in now] == [was["row"][:16] for was in before]
    assert [seen["panel"] for seen in now] == [was["panel"] for was in before]
    for seen in now:
        verdict = classify(decode_order(seen["order_json"]), every[seen["row"][1]], NOW)
        assert (int(verdict.eligible), verdict.reason, verdict.detail) == tuple(
            seen["row"][11:14])


if __name__ == "record" and os.environ.get("RECORD_BEFORE"):
    with tempfile.TemporaryDirectory() as scratch:
        BEFORE.write_text("[\n" + ",\n".join(json.dumps(seen) for seen in observe(Path(scratch)))
                          + "\n]\n")
