"""`queue --json`'s output and the backlog snapshot at 100,000 orders (issue 11), today's code
against the per-order code it replaced, in the same run on the same database.

- output: the whole `queue --json` document of 100,000 orders written to a sink; before, every
  row became a QueuedOrder, then a dict, then orjson (`print_json_stream`); now the database
  writes each order's JSON (`queued_orders_json`, `print_json_objects`);
- backlog: `Workspace.record_backlog` for 200 merchants, a first snapshot (today and 29 days
  rebuilt) and a later one; before, every candidate's `created_at` was parsed in Python.

CPU seconds of this process (the machine is shared), medians of `--runs`, both sides alternated.
With `--postgres` the same on a throwaway PostgreSQL cluster (its server's CPU is not counted).

    .venv/bin/python -m bench.queue_output [--orders 100000] [--runs 3] [--postgres]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from console.output import print_json_objects
from services.settings import ReconSettings
from services.square_gateway import SquareGateway
from services.storage import ORDER_COLUMNS, open_store
from services.storage.base import Store
from services.timestamps import parse_time
from services.workspace import Workspace, _micros
from tests.test_queue_output import per_order_document

MERCHANTS = 200


def square_time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fill(store: Store, orders: int) -> None:
    """`orders` open orders over MERCHANTS merchants, as discovery writes them (Square's time
    form, about a third not eligible, a short order_json)."""
    rng = random.Random(1)
    now = datetime.now(UTC)
    by_merchant: dict[str, list[tuple[object, ...]]] = {}
    for index in range(orders):
        merchant_id = f"M{index % MERCHANTS:03d}"
        eligible = rng.random() < 0.7
        values = {"order_id": f"ORD{index:08d}XYZ", "merchant_id": merchant_id,
                  "location_id": f"L{merchant_id}{index % 2}", "version": rng.randint(1, 9),
                  "state": "OPEN", "source": "Square Online",
                  "reference_id": str(100000000 + index),
                  "total_amount": rng.randint(500, 50000), "currency": "USD",
                  "due_amount": 0 if eligible else 100,
                  "created_at": square_time(now - timedelta(minutes=rng.randint(10, 40000))),
                  "updated_at": None, "eligible": int(eligible),
                  "reason": None if eligible else "NOT_FULLY_PAID", "detail": "",
                  "consent_id": None, "fulfillments": "SHIPMENT:PROPOSED",
                  "order_json": "x" * 600, "seen_at": square_time(now)}
        by_merchant.setdefault(merchant_id, []).append(tuple(values[c] for c in ORDER_COLUMNS))
    for rows in by_merchant.values():
        with store.transaction():
            store.write_orders(rows)


class _Sink:
    """stdout for the writers: counts the bytes (and keeps them if asked)."""

    def __init__(self, keep: bool) -> None:
        self.size = 0
        self.buffer = self
        self.kept: list[bytes] | None = [] if keep else None

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.kept is not None:
            self.kept.append(data)
        return len(data)

    def flush(self) -> None:
        pass


@contextmanager
def sink(keep: bool = False) -> Iterator[_Sink]:
    target, saved = _Sink(keep), sys.stdout
    sys.stdout = target  # type: ignore[assignment]
    try:
        yield target
    finally:
        sys.stdout = saved


def per_order_output(store: Store, refreshed: set[str]) -> None:
    """`queue --json` as it was before issue 11's change: the test's reference, measured."""
    per_order_document(store, refreshed, False, None, {"merchants": []})


def database_output(store: Store, refreshed: set[str]) -> None:
    print_json_objects("orders", store.queued_orders_json(sorted(refreshed)), {"merchants": []})


def per_candidate_backlog(workspace: Workspace, merchant_ids: list[str], days: int = 30
                          ) -> None:
    """`Workspace.record_backlog` as it was before issue 11's change: every candidate's time
    parsed in Python, sorted, bisected."""
    store, now = workspace.store, workspace.clock()
    today = now.astimezone(UTC).date()
    recorded, rebuilt = [], []
    day = 86_400_000_000

    def buckets(created: list[int], end: int, existing_only: bool) -> tuple[int, ...]:
        edges = [bisect_right(created, end - d * day) for d in (14, 7, 3, 1)]
        last = bisect_right(created, end) if existing_only else len(created)
        return (last - edges[3], edges[3] - edges[2], edges[2] - edges[1],
                edges[1] - edges[0], edges[0])
    for merchant_id in merchant_ids:
        created = sorted(_micros(parse_time(text))
                         for text in store.candidate_created_at(merchant_id))
        if not store.has_backlog_history(merchant_id):
            for back in range(1, days):
                moment = now - timedelta(days=back)
                rebuilt.append(((today - timedelta(days=back)).isoformat(), merchant_id,
                                buckets(created, _micros(moment), True)))
        recorded.append((today.isoformat(), merchant_id, buckets(created, _micros(now), False)))
    store.record_backlog(recorded, "bench")  # type: ignore[arg-type]
    store.record_backlog(rebuilt, "bench", rebuilt=True)  # type: ignore[arg-type]


def cpu(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def measure(store: Store, runs: int, label: str) -> None:
    merchants = [f"M{n:03d}" for n in range(MERCHANTS)]
    refreshed = set(merchants[:-5])  # a few stale merchants, as after an unreachable one
    settings = ReconSettings(db=":memory:", credentials="/nonexistent")
    workspace = Workspace(settings=settings, store=store,
                          gateway=SquareGateway(settings.base_url))

    sides: dict[str, dict[str, list[float]]] = {
        figure: {"per order (before)": [], "by the database (now)": []}
        for figure in ("output", "backlog, first snapshot", "backlog, later snapshot")}
    backlogs = (("per order (before)", per_candidate_backlog),
                ("by the database (now)", Workspace.record_backlog))
    # A first snapshot happens once per merchant: each run of each side takes its own share of
    # the merchants (scaled up to all of them).
    shares = 2 * runs
    for run in range(runs):
        for offset, (name, backlog) in enumerate(backlogs):
            share = merchants[2 * run + offset::shares]
            sides["backlog, first snapshot"][name].append(
                cpu(lambda b=backlog, m=share: b(workspace, m)) * len(merchants) / len(share))
    sizes = {}
    for _ in range(runs):
        for name, work in (("per order (before)", per_order_output),
                           ("by the database (now)", database_output)):
            with sink() as out:
                sides["output"][name].append(cpu(lambda w=work: w(store, refreshed)))
            sizes[name] = out.size
        for name, backlog in backlogs:
            sides["backlog, later snapshot"][name].append(
                cpu(lambda b=backlog: b(workspace, merchants)))
    print(f"{label}: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(shared); CPU s of this process, medians of {runs} (a first snapshot: each run "
          f"on 1/{2 * runs} of the merchants, scaled)")
    for figure, results in sides.items():
        before, now = (statistics.median(v) for v in results.values())
        print(f"  {figure:<24} before {before:6.3f} s   now {now:6.3f} s   "
              f"now/before {now / before * 100:5.1f} %")
    print(f"  output bytes: before {sizes['per order (before)']:,}, "
          f"now {sizes['by the database (now)']:,}")


def same_documents(store: Store) -> bool:
    """The two outputs parse to the same document (checked once, outside the timing)."""
    refreshed = {f"M{n:03d}" for n in range(MERCHANTS - 5)}
    documents = []
    for work in (per_order_output, database_output):
        with sink(keep=True) as out:
            work(store, refreshed)
        documents.append(orjson.loads(b"".join(out.kept or [])))
    return documents[0] == documents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres", action="store_true",
                        help="also on a throwaway PostgreSQL cluster")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-queue-output-") as directory:
        store = open_store(str(Path(directory) / "queue.db"))
        fill(store, args.orders)
        print(f"SQLite, {args.orders:,} orders over {MERCHANTS} merchants: the same document "
              f"both ways: {same_documents(store)}")
        measure(store, args.runs, "SQLite")
        store.close()
    if args.postgres:
        from services.postgres_cluster import local_cluster
        with local_cluster(for_tests=True) as cluster:
            store = open_store(cluster.url())
            fill(store, args.orders)
            print(f"PostgreSQL: the same document both ways: {same_documents(store)}")
            measure(store, args.runs, "PostgreSQL")
            store.close()


if __name__ == "__main__":
    main()
