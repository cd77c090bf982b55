"""What the orders_created_at_index migration costs discovery's writes, and what it saves the
console's reads (issue 11): 100,000 orders written as discovery writes them (a transaction
per merchant, one `executemany` of INSERT OR REPLACE; a file database with WAL and
synchronous=FULL) into a fresh database, with and without the index; then the queue's reads
(the store's own methods), with the EXPLAIN QUERY PLAN of their SQL. An index by age first,
which the migration does not add, is measured beside them for comparison.

    .venv/bin/python -m bench.orders_index [--orders 100000] [--runs 3] [--json-bytes 700]

The rows are written with the store's own write (services/storage/index_cost.py holds the
measurement's SQL), so only the index differs between the sides."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.storage import ORDER_COLUMNS
from services.storage.index_cost import fresh_store, query_plan, timed_writes
from services.storage.sqlite import SQLiteStore

MERCHANTS = 200
# Each side: with the migration's index or not, and an index in its place (None: none).
SIDES: dict[str, tuple[bool, str | None]] = {
    "without": (False, None),
    "with the migration's index": (True, None),
    "by age first instead (not added)": (False, "orders_created_at"),
}


def rows(orders: int, json_bytes: int) -> dict[str, list[tuple[object, ...]]]:
    rng = random.Random(1)
    now = datetime.now(UTC)
    by_merchant: dict[str, list[tuple[object, ...]]] = {}
    for index in range(orders):
        merchant_id = f"M{index % MERCHANTS:03d}"
        values = {"order_id": f"ORD{index:08d}XYZ", "merchant_id": merchant_id,
                  "location_id": f"L{merchant_id}", "version": 2, "state": "OPEN",
                  "source": "Square Online", "reference_id": str(100000000 + index),
                  "total_amount": rng.randint(500, 50000), "currency": "USD", "due_amount": 0,
                  "created_at": (now - timedelta(minutes=rng.randint(180, 40000))).isoformat(),
                  "updated_at": None, "eligible": 1, "reason": None, "detail": "",
                  "consent_id": None, "fulfillments": "SHIPMENT:PROPOSED",
                  "order_json": "x" * json_bytes, "seen_at": now.isoformat()}
        by_merchant.setdefault(merchant_id, []).append(tuple(values[c] for c in ORDER_COLUMNS))
    return by_merchant


READS: dict[str, Callable[[SQLiteStore], object]] = {
    "first screenful, all merchants": lambda store: store.oldest_orders(None, 300),
    "first screenful, one merchant": lambda store: store.oldest_orders("M003", 300),
    "queue ordered, one merchant": lambda store: store.queued_orders("M003"),
    "queue ordered, all merchants": lambda store: store.queued_orders(),
}


def reads(store: SQLiteStore, runs: int) -> dict[str, tuple[float, str]]:
    """Each read as the store does it: its median time, and the plan of its SQL."""
    out = {}
    for name, read in READS.items():
        plan = query_plan(store, read)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            read(store)
            times.append(time.perf_counter() - start)
        out[name] = (statistics.median(times), plan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json-bytes", type=int, default=700,
                        help="order_json per order (a Square order is about 600 bytes)")
    args = parser.parse_args()
    data = rows(args.orders, args.json_bytes)
    writes: dict[str, list[float]] = {side: [] for side in SIDES}
    found: dict[str, dict[str, tuple[float, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-index-") as directory:
        for run in range(args.runs):
            for number, side in enumerate(SIDES):  # alternated: the load hits every side
                path = Path(directory) / f"{run}-{number}.db"
                store = fresh_store(path, *SIDES[side])
                writes[side].append(timed_writes(store, list(data.values())))
                if run == args.runs - 1:
                    found[side] = reads(store, args.runs)
                store.close()
                path.unlink()
    print(f"{args.orders:,} orders over {MERCHANTS} merchants, order_json of "
          f"{args.json_bytes} bytes; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores (shared); medians of {args.runs}")
    base = statistics.median(writes["without"])
    print(f"discovery's writes (a transaction per merchant): without the index "
          f"{base * 1000:,.0f} ms")
    for side in list(SIDES)[1:]:
        took = statistics.median(writes[side])
        print(f"  {side}: {took * 1000:,.0f} ms ({(took - base) * 1000:+,.0f} ms, "
              f"{(took / base - 1) * 100:+.0f} %)")
    for name in READS:
        print(f"{name}: " + ", ".join(f"{side} {found[side][name][0] * 1000:,.1f} ms"
                                       for side in SIDES))
        for side in SIDES:
            print(f"    {side}: {found[side][name][1]}")


if __name__ == "__main__":
    main()
