"""Bytes per row on the real schemas, SQLite and PostgreSQL, for docs/scaling.md.

A real workspace on the in-process emulator (the realistic order mix): consents imported, the
queue refreshed, every candidate completed (intents, outcomes, the audit chain). The SQLite file
is then copied table for table into a throwaway PostgreSQL cluster (the `db migrate` copy, plus
the orders cache), and each table's size with its indexes (and TOAST) is divided by its rows.

    .venv/bin/python -m bench.storage_sizes [--merchants 4] [--orders-per-location 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from services.demo import consent_for, workspace_on_emulator
from services.emulator import SeedConfig, build_app, seed_square
from services.postgres_cluster import local_cluster
from services.storage.postgres import PostgresStore, create_database
from services.storage.sizes import postgres_table_sizes, sqlite_table_sizes
from services.storage.sqlite import SQLiteStore
from services.storage.transfer import MOVED_TABLES, copy_tables

TABLES = ("orders", "intents", "audit", "batches", "consents", "merchants")


async def build(directory: Path, merchants: int, per_location: int) -> Path:
    square, seeded = seed_square(SeedConfig(seed=7, merchants=merchants,
                                            orders_per_location=per_location))
    app = build_app(square)
    db = directory / "recon.db"
    workspace = workspace_on_emulator(app, seeded, db, "bench")
    try:
        consents = directory / "consents.json"
        now = datetime.now(UTC)
        consents.write_text(json.dumps([consent_for(m, now, limits={
            "max_orders_per_batch": 100_000}) for m in seeded]))
        workspace.import_consent_files([consents])
        await workspace.refresh()
        preview = workspace.preview()
        # Complete half the candidates: the other half stays queued as order rows.
        await workspace.complete(workspace.preview_of(preview.items[::2]))
    finally:
        await workspace.aclose()
    return db


def measure(db: Path) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """(SQLite sizes, PostgreSQL sizes) of the same rows."""
    source = SQLiteStore(db, migrate=False)
    try:
        lite = sqlite_table_sizes(source, TABLES)
        with local_cluster(for_tests=True) as cluster:
            create_database(cluster.url(), "sizes")
            target = PostgresStore(cluster.url("sizes"))
            try:
                copy_tables(source, target, tables=[*MOVED_TABLES, "orders"])
                return lite, postgres_table_sizes(target, TABLES)
            finally:
                target.close()
    finally:
        source.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merchants", type=int, default=4)
    parser.add_argument("--orders-per-location", type=int, default=300)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        db = asyncio.run(build(Path(directory), args.merchants, args.orders_per_location))
        lite, pg = measure(db)
    print(f"{'table':<10} {'rows':>7} {'SQLite B/row':>13} {'PostgreSQL B/row':>17}")
    for table in TABLES:
        rows = lite[table][1]
        print(f"{table:<10} {rows:>7} {lite[table][0] / max(rows, 1):>13.0f} "
              f"{pg[table][0] / max(pg[table][1], 1):>17.0f}")
    audit_per_intent = lite["audit"][1] / max(lite["intents"][1], 1)
    print(f"audit entries per intent: {audit_per_intent:.2f}; "
          f"built and measured in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
