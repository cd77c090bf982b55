"""Discovery at scale: 200 merchants x 2 locations x 250 open orders (100,000) with 20 ms of
injected latency on every request, over loopback, against a sequential baseline in the same run
(one merchant and one page at a time, the same gateway and SDK).

    .venv/bin/python -m bench.discovery [--merchants 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._support import loopback_emulator, rss_mb
from services.credentials import load_credentials
from services.demo import consent_for
from services.settings import ReconSettings
from services.workspace import Workspace

LATENCY_S = 0.020


class _Merchant:
    def __init__(self, entry: dict[str, object]) -> None:
        from types import SimpleNamespace
        self.merchant = SimpleNamespace(id=entry["merchant_id"],
                                        business_name=entry["business_name"])


async def run(base_url: str, credentials: Path, db: Path, concurrency: int,
              consents: Path) -> tuple[float, int, int]:
    settings = ReconSettings(db=db, square_base_url=base_url, credentials=credentials,
                             operator="bench", max_concurrent_merchants=concurrency)
    workspace = Workspace.open(settings)
    workspace.import_consent_files([consents])
    start = time.perf_counter()
    reports = await workspace.refresh()
    elapsed = time.perf_counter() - start
    orders = sum(r.orders for r in reports)
    errors = sum(1 for r in reports if r.error)
    await workspace.aclose()
    return elapsed, orders, errors


async def sdk_sequential(manifest: dict[str, object], sample: int, db: Path,
                         consents: Path) -> tuple[float, int]:
    """The plain way: the official SDK's own calls and decoding, one merchant and one page at
    a time, then the same classification and storage. Run on `sample` merchants."""
    import httpx
    from square import AsyncSquare

    from services.discovery import OPEN_ORDERS_QUERY, order_row
    from services.square_models import SquareOrder
    from services.store import Store, utc_text
    settings = ReconSettings(db=db, square_base_url=str(manifest["base_url"]),
                             credentials=Path(str(manifest["directory"])) / "credentials.toml",
                             operator="bench")
    workspace = Workspace.open(settings)
    workspace.import_consent_files([consents])
    store: Store = workspace.store
    merchants = list(manifest["merchants"])[:sample]  # type: ignore[call-overload]
    orders = 0
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as http:
        for entry in merchants:
            client = AsyncSquare(base_url=str(manifest["base_url"]),
                                 token=entry["access_token"], httpx_client=http)
            await client.o_auth.retrieve_token_status()
            await client.merchants.get("me")
            locations = (await client.locations.list()).locations or []
            consent_records = [c for c, _ in workspace.consents_for(entry["merchant_id"])]
            now = datetime.now(UTC)
            rows = []
            cursor = None
            while True:
                response = await client.orders.search(
                    location_ids=[loc.id for loc in locations if loc.status == "ACTIVE"],
                    query=OPEN_ORDERS_QUERY, limit=1000, **({"cursor": cursor} if cursor else {}))
                for order in response.orders or []:
                    slim = SquareOrder.model_validate(order.model_dump())
                    rows.append(order_row(slim, entry["merchant_id"], consent_records, now,
                                          utc_text(now)))
                cursor = response.cursor
                if not cursor:
                    break
            store.replace_orders(entry["merchant_id"], rows)
            orders += len(rows)
    elapsed = time.perf_counter() - start
    await workspace.aclose()
    return elapsed, orders


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=LATENCY_S * 1000,
                        help="0 shows the CPU floor: the same work with no waiting at all")
    parser.add_argument("--sdk-sample", type=int, default=6,
                        help="merchants the plain-SDK baseline runs on (it is sequential, so "
                             "its time scales linearly to all merchants)")
    args = parser.parse_args()
    with loopback_emulator("--merchants", str(args.merchants), "--orders-per-location", "250",
                           "--locations-per-merchant", "2", "--kinds", "online_paid_open=1",
                           "--latency-ms", str(args.latency_ms)) as manifest:
        directory = Path(manifest["directory"])
        now = datetime.now(UTC)
        consents = directory / "all-consents.json"
        consents.write_text(json.dumps([consent_for(_Merchant(m), now)  # type: ignore[arg-type]
                                        for m in manifest["merchants"]]))
        credentials = directory / "credentials.toml"
        assert len(load_credentials(credentials)) == args.merchants
        work = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
        ours, orders, errors = asyncio.run(run(manifest["base_url"], credentials,
                                               work / "ours.db", args.concurrency, consents))
        peak = rss_mb()
        baseline, base_orders, base_errors = asyncio.run(run(
            manifest["base_url"], credentials, work / "baseline.db", 1, consents))
        sdk_time, sdk_orders = asyncio.run(sdk_sequential(manifest, args.sdk_sample,
                                                          work / "sdk.db", consents))
    sdk_full = sdk_time * args.merchants / args.sdk_sample
    # Per merchant: token status, merchant, locations, one SearchOrders page (500 <= 1000).
    requests = args.merchants * 4
    bound = requests * args.latency_ms / 1000 / args.concurrency
    print(f"{args.merchants} merchants, {orders} open orders, {args.latency_ms:.0f} ms latency, "
          f"{requests} requests, concurrency {args.concurrency}")
    print(f"concurrent discovery: {ours:6.2f} s  ({orders / ours:,.0f} orders/s, {errors} "
          "merchant errors)")
    print(f"sequential baseline:  {baseline:6.2f} s  ({base_orders} orders, {base_errors} "
          "merchant errors)")
    print(f"speed-up vs sequential (same fast path): {baseline / ours:5.1f}x")
    print(f"plain SDK, sequential: {sdk_time:.2f} s for {args.sdk_sample} merchants "
          f"({sdk_orders} orders, {sdk_time / max(1, sdk_orders) * 1000:.2f} ms/order) -> "
          f"{sdk_full:.0f} s for all {args.merchants}")
    print(f"speed-up vs plain-SDK sequential baseline: {sdk_full / ours:5.1f}x (target >= 8x)")
    if bound:
        print(f"lower bound (requests x latency / concurrency): {bound:.2f} s; ours is "
              f"{ours / bound:.1f}x the bound (target <= 2x)")
    print(f"peak memory: {peak:.0f} MB RSS of the process, interpreter and imports included "
          "(target < 400 MB)")


if __name__ == "__main__":
    main()
