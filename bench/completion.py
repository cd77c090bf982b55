"""Completing at scale: 5,000 orders across 50 merchants with 20 ms of injected latency, over
loopback, against a sequential baseline (one order at a time, same engine and SDK) in the same
run; the audit's share of the wall time; and `verify` throughput on 1,000,000 audit entries.

    .venv/bin/python -m bench.completion [--baseline-orders 500] [--verify-entries 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from bench._support import loopback_emulator
from services.audit import AUDIT_FIELDS, GENESIS, AuditTrail
from services.completion import Outcome
from services.demo import consent_for
from services.settings import ReconSettings
from services.store import Store
from services.workspace import Workspace

LATENCY_S = 0.020


def timed_store(store: Store, spent: list[float]) -> None:
    """Count the wall time spent inside database transactions (intents, outcomes, audit)."""
    original = store.transaction

    @contextmanager
    def transaction():  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        with original() as conn:
            yield conn
        spent[0] += time.perf_counter() - start

    store.transaction = transaction  # type: ignore[method-assign]


async def complete(manifest: dict[str, Any], db: Path, consents: Path, merchants: list[str],
                   per_merchant: int, overall: int) -> dict[str, float]:
    settings = ReconSettings(db=db, square_base_url=manifest["base_url"],
                             credentials=Path(manifest["directory"]) / "credentials.toml",
                             operator="bench")
    workspace = Workspace.open(settings)
    workspace.engine_options = {"per_merchant": per_merchant, "overall": overall}
    workspace.import_consent_files([consents])
    await workspace.refresh(merchants)
    preview = workspace.preview(merchants)
    spent = [0.0]
    timed_store(workspace.store, spent)
    start = time.perf_counter()
    _, results = await workspace.complete(preview)
    wall = time.perf_counter() - start
    completed = sum(1 for r in results if r.outcome is Outcome.COMPLETED)
    report = workspace.verify()
    await workspace.aclose()
    return {"wall": wall, "orders": len(results), "completed": completed,
            "db_share": spent[0] / wall, "chain_ok": float(report.ok)}


def build_audit(path: Path, entries: int) -> None:
    store = Store(path)
    prev = GENESIS
    batch = []
    columns = (*AUDIT_FIELDS, "hash")
    sql = (f"INSERT INTO audit ({', '.join(columns)}) VALUES "
           f"({', '.join('?' for _ in columns)})")
    store.conn.execute("BEGIN")
    for seq in range(1, entries + 1):
        entry = {"seq": seq, "at": "2026-11-26T08:00:00.000000Z", "operator": "bench",
                 "action": "outcome", "merchant_id": f"M{seq % 50}", "order_id": f"O{seq}",
                 "version": 2, "amount": 1234, "currency": "USD", "consent_id": "c",
                 "consent_sha256": "s" * 64, "batch_id": "b", "approved_set_sha256": "a" * 64,
                 "idempotency_key": f"recon-complete:O{seq}:2", "outcome": "completed",
                 "square_code": None, "detail": "COMPLETED at version 3.", "prev_hash": prev}
        entry["hash"] = hashlib.sha256(orjson.dumps(
            {k: entry[k] for k in AUDIT_FIELDS}, option=orjson.OPT_SORT_KEYS)).hexdigest()
        prev = entry["hash"]
        batch.append([entry[k] for k in columns])
        if len(batch) == 50_000:
            store.conn.executemany(sql, batch)
            batch.clear()
    if batch:
        store.conn.executemany(sql, batch)
    store.conn.execute("COMMIT")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=55,
                        help="the first few serve the sequential baseline, the rest (50) ours")
    parser.add_argument("--orders-per-merchant", type=int, default=100)
    parser.add_argument("--baseline-orders", type=int, default=500,
                        help="orders the sequential baseline completes (it scales linearly)")
    parser.add_argument("--verify-entries", type=int, default=1_000_000)
    args = parser.parse_args()
    per_location = args.orders_per_merchant // 2
    with loopback_emulator("--merchants", str(args.merchants), "--orders-per-location",
                           str(per_location), "--kinds", "online_paid_open=1",
                           "--latency-ms", str(LATENCY_S * 1000)) as manifest:
        now = datetime.now(UTC)
        directory = Path(manifest["directory"])
        consents = directory / "all-consents.json"
        consents.write_text(json.dumps([
            consent_for(SimpleNamespace(merchant=SimpleNamespace(  # type: ignore[arg-type]
                id=m["merchant_id"], business_name=m["business_name"])), now,
                limits={"min_order_age_hours": 0, "max_orders_per_batch": 100000})
            for m in manifest["merchants"]]))
        ids = [m["merchant_id"] for m in manifest["merchants"]]
        work = Path(tempfile.mkdtemp(prefix="bench-complete-"))
        sample = max(1, args.baseline_orders // args.orders_per_merchant)
        ours = asyncio.run(complete(manifest, work / "ours.db", consents, ids[sample:], 4, 64))
        base = asyncio.run(complete(manifest, work / "base.db", consents, ids[:sample], 1, 1))
    per_order_base = base["wall"] / base["orders"]
    base_full = per_order_base * ours["orders"]
    print(f"{ours['orders']:.0f} orders across {args.merchants - sample} merchants, "
          f"{LATENCY_S * 1000:.0f} ms latency, loopback")
    print(f"concurrent engine: {ours['wall']:6.2f} s ({ours['orders'] / ours['wall']:.0f} "
          f"orders/s), {ours['completed']:.0f} completed, chain ok: {bool(ours['chain_ok'])}")
    print(f"sequential baseline: {base['wall']:.2f} s for {base['orders']:.0f} orders "
          f"({per_order_base * 1000:.1f} ms/order) -> {base_full:.1f} s for "
          f"{ours['orders']:.0f}")
    print(f"speed-up: {base_full / ours['wall']:.1f}x (target >= 10x)")
    print(f"audit and intent/outcome writes (fsync'd transactions): "
          f"{ours['db_share'] * 100:.0f}% of the wall time")
    audit_db = work / "audit-1m.db"
    start = time.perf_counter()
    build_audit(audit_db, args.verify_entries)
    built = time.perf_counter() - start
    store = Store(audit_db)
    start = time.perf_counter()
    report = AuditTrail(store).verify()
    verify_s = time.perf_counter() - start
    print(f"verify {report.entries:,} entries: {verify_s:.2f} s = "
          f"{report.entries / verify_s:,.0f} entries/s (target >= 100,000/s; ok={report.ok}); "
          f"building them took {built:.1f} s")


if __name__ == "__main__":
    main()
