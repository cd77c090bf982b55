"""Refresh by change at scale (issue 11): the 100,000-order queue of bench/discovery.py after 1%
of its orders were completed and 1% edited in Square (UpdateOrder, 20 ms latency, loopback).

Each run: change 2% of the orders in the emulator (not timed), then time, from process start to
exit, `recon-console queue --json --include-ineligible` (a refresh by change) and then, as the
baseline, `queue --json --include-ineligible --full` (a full discovery) on the same database.
Last, the same refresh again with nothing changed in Square: the floor every refresh pays
whatever changed (the process and its imports, a round trip per merchant, the whole queue
written out), so the refresh's cost of the changes themselves is the difference. Beside
them, a plain loop in a process of its own: the requests a refresh must make (each
merchant's token status, profile, locations and orders changed since, asked at once, as
many merchants at once), `json.loads` of each answer, nothing else. It uses aiohttp, as the
console does: a plain httpx loop took 2.0 s for these 800 requests (7.1 s with a pool of 64
connections), so it would measure httpx, not the floor.
The refresh must drop every completed order and show every edited one at its new version. The
medians of `--runs` runs are printed side by side, with the machine's load average.

    .venv/bin/python -m bench.refresh [--merchants 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._support import loopback_emulator
from bench.discovery import (
    Read,
    cli,
    emulator_args,
    fresh_db,
    median,
    plain_client,
    prepare,
    square_headers,
    timed_process,
)


async def plain_refresh(manifest: dict[str, Any], concurrency: int, since: str) -> int:
    """The baseline: a refresh's requests and `json.loads` of each answer (see above)."""
    base = manifest["base_url"]
    gate = asyncio.Semaphore(concurrency)
    changed = 0
    query = {"filter": {"state_filter": {"states": ["OPEN", "COMPLETED", "CANCELED", "DRAFT"]},
                        "date_time_filter": {"updated_at": {"start_at": since}}},
             "sort": {"sort_field": "UPDATED_AT", "sort_order": "ASC"}}

    async def one(read: Read, entry: dict[str, Any]) -> None:
        nonlocal changed
        headers = square_headers(entry)
        async with gate:
            async def search(cursor: str | None) -> dict[str, Any]:
                body: dict[str, Any] = {"location_ids": entry["location_ids"], "query": query,
                                        "limit": 1000}
                if cursor:
                    body["cursor"] = cursor
                page: dict[str, Any] = await read(headers, "POST", f"{base}/v2/orders/search",
                                                  body)
                return page
            answers = await asyncio.gather(
                read(headers, "POST", f"{base}/oauth2/token/status", None),
                read(headers, "GET", f"{base}/v2/merchants/me", None),
                read(headers, "GET", f"{base}/v2/locations", None), search(None))
            page: dict[str, Any] = answers[3]
            while True:
                changed += len(page.get("orders", []))
                if not page.get("cursor"):
                    break
                page = await search(page["cursor"])

    # The four requests of each merchant at once: as many connections.
    async with plain_client("aiohttp", concurrency * 4) as read:
        await asyncio.gather(*(one(read, m) for m in manifest["merchants"]))
    return changed


async def change_orders(manifest: dict[str, Any], queue: list[dict[str, Any]], share: float,
                        rng: random.Random) -> tuple[set[str], dict[str, int]]:
    """Complete `share` of the queued orders and edit (reference_id) as many others, through
    UpdateOrder as a merchant would. Returns (completed ids, edited id -> new version)."""
    import httpx
    tokens = {m["merchant_id"]: m["access_token"] for m in manifest["merchants"]}
    count = int(len(queue) * share)
    chosen = rng.sample(queue, 2 * count)
    to_complete, to_edit = chosen[:count], chosen[count:]
    gate = asyncio.Semaphore(32)
    base = manifest["base_url"]
    completed: set[str] = set()
    edited: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, order: dict[str, Any], complete: bool) -> None:
        headers = {"Authorization": f"Bearer {tokens[order['merchant_id']]}",
                   "Square-Version": "2026-09-16"}
        async with gate:
            doc = (await client.get(f"{base}/v2/orders/{order['order_id']}",
                                    headers=headers)).json()["order"]
            sparse: dict[str, Any] = {"location_id": doc["location_id"],
                                      "version": doc["version"]}
            if complete:
                sparse.update(state="COMPLETED", fulfillments=[
                    {"uid": f["uid"], "state": "COMPLETED"} for f in doc.get("fulfillments", [])
                    if f["state"] not in ("COMPLETED", "CANCELED", "FAILED")])
            else:
                sparse["reference_id"] = f"edited-{rng.randint(0, 10**9)}"
            response = await client.put(
                f"{base}/v2/orders/{order['order_id']}", headers=headers,
                json={"idempotency_key": f"bench-{order['order_id']}-{doc['version']}",
                      "order": sparse})
            response.raise_for_status()
            if complete:
                completed.add(order["order_id"])
            else:
                edited[order["order_id"]] = response.json()["order"]["version"]

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one(client, o, True) for o in to_complete),
                             *(one(client, o, False) for o in to_edit))
    return completed, edited


def _with_locations(manifest: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """The manifest with each merchant's locations (as the queue shows them), for the plain
    loop, which asks the changes at these."""
    locations: dict[str, set[str]] = {}
    for order in document["orders"]:
        locations.setdefault(order["merchant_id"], set()).add(order["location_id"])
    return dict(manifest, merchants=[
        dict(m, location_ids=sorted(locations.get(m["merchant_id"], ())))
        for m in manifest["merchants"]])


def queue_json(env: dict[str, str], *extra: str) -> tuple[tuple[float, float, float],
                                                          dict[str, Any]]:
    out_path = Path(env["RECON_DB"]).with_suffix(".json")
    with open(out_path, "wb") as out:
        figures = timed_process(cli("queue", "--json", "--include-ineligible", *extra), env,
                                out)
    return figures, json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--share", type=float, default=0.01)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="merchants at once (max_concurrent_merchants)")
    parser.add_argument("--baseline-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:  # the plain loop in a process of its own, timed from outside
        manifest_path, since = args.baseline_child
        print(asyncio.run(plain_refresh(json.loads(Path(manifest_path).read_text()),
                                        args.concurrency, since)))
        return
    rng = random.Random(11)
    with loopback_emulator(*emulator_args(args.merchants)) as manifest:
        consents, env = prepare(manifest, args.concurrency)
        env = fresh_db(env, consents, "refresh")
        _, document = queue_json(env)  # the first discovery (not timed)
        refreshes: list[tuple[float, float, float]] = []
        fulls: list[tuple[float, float, float]] = []
        floors: list[tuple[float, float, float]] = []
        plains: list[tuple[float, float, float]] = []
        manifest_file = Path(manifest["directory"]) / "bench-manifest.json"
        manifest_file.write_text(json.dumps(_with_locations(manifest, document)))
        loads = [os.getloadavg()[0]]
        for _ in range(args.runs):
            since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
            completed, edited = asyncio.run(change_orders(manifest, document["orders"],
                                                          args.share, rng))
            figures, document = queue_json(env)
            refreshes.append(figures)
            versions = {o["order_id"]: o["version"] for o in document["orders"]}
            assert not completed & set(versions), "a completed order is still queued"
            assert all(versions[o] == v for o, v in edited.items()), "an edit was missed"
            figures, full = queue_json(env, "--full")
            fulls.append(figures)
            # Versions, not verdicts: an order can pass the consent's minimum age between
            # the two runs (tests/test_refresh_by_change.py compares everything).
            assert versions == {o["order_id"]: o["version"] for o in full["orders"]}, \
                "refresh and full discovery disagree"
            document = full
            plains.append(timed_process(
                [sys.executable, "-m", "bench.refresh", "--baseline-child", str(manifest_file),
                 since, "--concurrency", str(args.concurrency)], env))
            figures, same = queue_json(env)
            floors.append(figures)
            assert versions == {o["order_id"]: o["version"] for o in same["orders"]}, \
                "a refresh with nothing changed changed the queue"
            loads.append(os.getloadavg()[0])
    wall = median([r[0] for r in refreshes])
    full_wall = median([r[0] for r in fulls])
    print(f"{len(document['orders']):,} queued orders, {args.share:.0%} completed and "
          f"{args.share:.0%} edited before each refresh, {args.concurrency} merchants at once; "
          f"median of {args.runs} runs; load "
          f"average (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs "
          "(shared machine)")
    print(f"{'':38}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}")
    for name, rows in (("queue --json (refresh by change)", refreshes),
                       ("baseline: queue --json --full", fulls),
                       ("floor: the refresh, nothing changed", floors),
                       ("plain aiohttp: its requests alone", plains)):
        print(f"{name:38}{median([r[0] for r in rows]):8.2f}{median([r[1] for r in rows]):8.2f}"
              f"{median([r[2] for r in rows]):9.0f}")
    print(f"refresh / full discovery: {wall / full_wall:.0%} (targets: <= 1 s and <= 15%)")
    floor = median([r[0] for r in floors])
    print(f"the changes' own cost (refresh - floor): {wall - floor:.2f} s; the floor is "
          f"{floor / full_wall:.0%} of a full discovery")


if __name__ == "__main__":
    main()
