"""What an index on orders costs discovery's writes and what it saves the queue's reads: the
SQL behind bench/orders_index.py (issue 11's orders_created_at_index)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from services.storage.sqlite import SQLiteStore

__all__ = ["ALTERNATIVES", "MIGRATION_INDEX", "fresh_store", "query_plan", "timed_writes"]

MIGRATION_INDEX = "orders_merchant_created_at"
# Indexes a measurement may put in the migration's place (name -> columns).
ALTERNATIVES = {"orders_created_at": "created_at, order_id"}


def fresh_store(path: Path, with_migration_index: bool, instead: str | None = None
                ) -> SQLiteStore:
    """A new database with every migration; without the migration's index when asked, and
    with one of ALTERNATIVES `instead`."""
    store = SQLiteStore(path)
    if not with_migration_index:
        store.conn.execute(f"DROP INDEX {MIGRATION_INDEX}")
    if instead is not None:
        store.conn.execute(f"CREATE INDEX {instead} ON orders({ALTERNATIVES[instead]})")
    return store


def timed_writes(store: SQLiteStore, batches: Sequence[Sequence[Sequence[object]]]) -> float:
    """Seconds to write each batch of rows (in ORDER_COLUMNS order) in a transaction of its
    own, one executemany each, as discovery writes a merchant."""
    start = time.perf_counter()
    for rows in batches:
        with store.transaction():
            store.write_orders(rows)
    return time.perf_counter() - start


def query_plan(store: SQLiteStore, read: Callable[[SQLiteStore], object]) -> str:
    """EXPLAIN QUERY PLAN of the last statement `read` runs on the store."""
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    try:
        read(store)
    finally:
        store.conn.set_trace_callback(None)
    return " | ".join(row[3] for row in store.conn.execute("EXPLAIN QUERY PLAN " +
                                                           statements[-1]))
