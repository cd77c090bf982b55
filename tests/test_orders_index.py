"""The orders_created_at_index migration (issue 11): the queue's ordered reads and its first
screenful are served by the index (no sort of the whole queue), and the first screenful of
every merchant, picked from the index, is exactly the top of the queue by age."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.storage import ORDER_COLUMNS
from services.storage.index_cost import query_plan
from services.storage.postgres import MIGRATIONS
from services.storage.sqlite import SQLiteStore

INDEX = "orders_merchant_created_at"


def filled(path: Path, orders: int = 600, seed: int = 3) -> SQLiteStore:
    rng = random.Random(seed)
    store = SQLiteStore(path)
    rows = []
    for index in range(orders):
        # Few distinct instants: ties on created_at are broken by order id.
        values = {"order_id": f"O{rng.randrange(10**9):09d}-{index}",
                  "merchant_id": f"M{rng.randrange(7)}", "location_id": "L", "version": 1,
                  "state": "OPEN", "source": None, "reference_id": None,
                  "total_amount": 100, "currency": "USD", "due_amount": 0,
                  "created_at": f"2026-11-{rng.randrange(1, 6):02d}T10:00:00Z",
                  "updated_at": None, "eligible": rng.randrange(2), "reason": None,
                  "detail": "", "consent_id": None, "fulfillments": "", "order_json": "{}",
                  "seen_at": "2026-11-26T00:00:00Z"}
        rows.append([values[c] for c in ORDER_COLUMNS])
    with store.transaction():
        store.write_orders(rows)
    return store


def plan(store: SQLiteStore, read: str, *args: object) -> str:
    return query_plan(store, lambda s: getattr(s, read)(*args))


def test_the_migration_is_applied_under_its_name_in_both_stores(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "recon.db")
    applied = [r[0] for r in store.conn.execute(
        "SELECT name FROM _sqlite_migrations ORDER BY applied_at, rowid")]
    assert applied.count("orders_created_at_index") == 1
    assert [name for name, _ in MIGRATIONS].count("orders_created_at_index") == 1
    assert INDEX in dict(MIGRATIONS)["orders_created_at_index"]


@pytest.mark.parametrize("merchant", [None, "M3"])
def test_first_screenful_is_the_top_of_the_queue_by_age(tmp_path: Path,
                                                       merchant: str | None) -> None:
    store = filled(tmp_path / "recon.db")
    everything = store.queued_orders(merchant, ordered=False)
    by_age = sorted(everything, key=lambda o: (o.created_at, o.order_id))
    for limit in (1, 37, 300, len(everything) + 5):
        assert store.oldest_orders(merchant, limit) == by_age[:limit]


def test_the_queue_reads_are_served_by_the_index(tmp_path: Path) -> None:
    store = filled(tmp_path / "recon.db")
    store.conn.execute("ANALYZE")
    for read, args in (("oldest_orders", ("M3", 300)), ("queued_orders", ("M3",)),
                       ("queued_orders", ())):
        found = plan(store, read, *args)
        assert INDEX in found and "TEMP B-TREE" not in found, (read, args, found)
    # Every merchant's oldest: chosen from the index's narrow entries, not the rows.
    assert f"COVERING INDEX {INDEX}" in plan(store, "oldest_orders", None, 300)
