"""Discovery at scale (issue 11): 200 merchants x 2 locations x 250 open orders (100,000) with
20 ms of injected latency on every request, over loopback (the emulator in its own process).

Each run times, from process start to exit:
- ours: `recon-console queue --json --include-ineligible` on an empty database (a full
  discovery: every order read, classified, stored and written out);
- the baseline: a plain httpx loop that sends the same requests (token status, merchant,
  locations, every SearchOrders page) with the same concurrency and only `json.loads` them;
- the same loop on aiohttp, the console's client: the requests and decoding alone, the floor
  under a discovery on this machine.
The medians of `--runs` runs are printed side by side, with the load average of the machine.

    .venv/bin/python -m bench.discovery [--merchants 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._peak import MARK as PEAK_MARK
from bench._support import ROOT, loopback_emulator, scratch_dir

LATENCY_MS = 20.0
QUERY = {"filter": {"state_filter": {"states": ["OPEN"]}},
         "sort": {"sort_field": "CREATED_AT", "sort_order": "ASC"}}


class _Merchant:
    def __init__(self, entry: dict[str, Any]) -> None:
        from types import SimpleNamespace
        self.merchant = SimpleNamespace(id=entry["merchant_id"],
                                        business_name=entry["business_name"])


def timed_process(argv: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL
                  ) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one process, start to exit. `python -m X` runs under
    bench._peak, which reports the process's own peak memory (see there)."""
    if argv[1:2] == ["-m"]:
        argv = [argv[0], "-m", "bench._peak", *argv[2:]]
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode not in (0,):
        raise RuntimeError(f"{argv[3:]} exited {process.returncode}: {stderr[-2000:]}")
    peaks = [line.split()[1] for line in stderr.splitlines() if line.startswith(PEAK_MARK)]
    peak_kb = int(peaks[-1]) if peaks else usage.ru_maxrss
    return wall, usage.ru_utime + usage.ru_stime, peak_kb / 1024


def prepare(manifest: dict[str, Any], concurrency: int = 16) -> tuple[Path, dict[str, str]]:
    """Consents for every merchant, and the environment `recon-console` runs in."""
    # Imported here: the baseline child runs this module too, and the product's imports
    # (~0.5 s of CPU) are no part of a plain httpx loop.
    from services.demo import consent_for

    directory = Path(manifest["directory"])
    consents = directory / "all-consents.json"
    now = datetime.now(UTC)
    consents.write_text(json.dumps([consent_for(_Merchant(m), now)  # type: ignore[arg-type]
                                    for m in manifest["merchants"]]))
    env = dict(os.environ, RECON_SQUARE_BASE_URL=manifest["base_url"],
               RECON_CREDENTIALS=str(directory / "credentials.toml"), RECON_OPERATOR="bench",
               RECON_MAX_CONCURRENT_MERCHANTS=str(concurrency))
    return consents, env


def fresh_db(env: dict[str, str], consents: Path, name: str) -> dict[str, str]:
    db = scratch_dir("bench-discovery-") / f"{name}.db"
    env = dict(env, RECON_DB=str(db))
    subprocess.run([sys.executable, "-m", "console.cli", "consent", "import", str(consents)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "console.cli", *args]


# `read(headers, method, url, body)`: one request, its answer `json.loads`ed.
Read = Callable[[dict[str, str], str, str, Any], Awaitable[Any]]


def square_headers(entry: dict[str, Any]) -> dict[str, str]:
    """A plain loop's headers for a manifest merchant's requests."""
    return {"Authorization": f"Bearer {entry['access_token']}",
            "Square-Version": "2026-09-16", "Content-Type": "application/json"}


@asynccontextmanager
async def plain_client(client: str, connections: int) -> AsyncIterator[Read]:
    """A plain loop's `Read` on httpx or on aiohttp (the console's client), with at most
    `connections` open at once: nothing but the request and `json.loads` of its answer."""
    if client == "httpx":
        import httpx
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections)) as http:
            async def read_httpx(headers: dict[str, str], method: str, url: str,
                                 body: Any = None) -> Any:
                response = await http.request(method, url, headers=headers, json=body)
                response.raise_for_status()
                return json.loads(response.content)
            yield read_httpx
        return
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def read_aiohttp(headers: dict[str, str], method: str, url: str,
                               body: Any = None) -> Any:
            async with session.request(method, url, headers=headers,
                                       data=None if body is None else json.dumps(body)
                                       ) as response:
                response.raise_for_status()
                return json.loads(await response.read())
        yield read_aiohttp


async def plain_discovery(manifest: dict[str, Any], concurrency: int, client: str) -> int:
    """The baseline: the same requests, `json.loads` of each answer, nothing else (on httpx,
    the issue's baseline, or on aiohttp, the floor under a discovery)."""
    base = manifest["base_url"]
    gate = asyncio.Semaphore(concurrency)
    orders = 0

    async def one(read: Read, entry: dict[str, Any]) -> None:
        nonlocal orders
        headers = square_headers(entry)
        async with gate:
            await read(headers, "POST", f"{base}/oauth2/token/status", None)
            await read(headers, "GET", f"{base}/v2/merchants/me", None)
            locations = await read(headers, "GET", f"{base}/v2/locations", None)
            active = [loc["id"] for loc in locations.get("locations", [])
                      if loc.get("status") == "ACTIVE"]
            cursor = None
            while True:
                body: dict[str, Any] = {"location_ids": active, "query": QUERY, "limit": 1000}
                if cursor:
                    body["cursor"] = cursor
                page = await read(headers, "POST", f"{base}/v2/orders/search", body)
                orders += len(page.get("orders", []))
                cursor = page.get("cursor")
                if not cursor:
                    break

    async with plain_client(client, concurrency) as read:
        await asyncio.gather(*(one(read, m) for m in manifest["merchants"]))
    return orders


def median(values: list[float]) -> float:
    return statistics.median(values)


def emulator_args(merchants: int) -> list[str]:
    return ["--merchants", str(merchants), "--orders-per-location", "250",
            "--locations-per-merchant", "2", "--kinds", "online_paid_open=1",
            "--latency-ms", str(LATENCY_MS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="merchants at once, ours (max_concurrent_merchants) and baseline")
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-client", choices=("httpx", "aiohttp"), default="httpx",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:  # the baseline in a process of its own, timed from outside
        manifest = json.loads(Path(args.baseline_child).read_text())
        print(asyncio.run(plain_discovery(manifest, args.concurrency, args.baseline_client)))
        return
    with loopback_emulator(*emulator_args(args.merchants)) as manifest:
        consents, env = prepare(manifest, args.concurrency)
        manifest_file = Path(manifest["directory"]) / "bench-manifest.json"
        manifest_file.write_text(json.dumps(manifest))
        ours: list[tuple[float, float, float]] = []
        base: list[tuple[float, float, float]] = []
        floor: list[tuple[float, float, float]] = []
        loads = [os.getloadavg()[0]]
        for run in range(args.runs):
            for client, rows in (("httpx", base), ("aiohttp", floor)):
                rows.append(timed_process(
                    [sys.executable, "-m", "bench.discovery", "--baseline-child",
                     str(manifest_file), "--baseline-client", client,
                     "--concurrency", str(args.concurrency)], env))
            run_env = fresh_db(env, consents, f"run{run}")
            with open(Path(run_env["RECON_DB"]).with_suffix(".json"), "wb") as out:
                ours.append(timed_process(cli("queue", "--json", "--include-ineligible"),
                                          run_env, out))
            document = json.loads(Path(run_env["RECON_DB"]).with_suffix(".json").read_text())
            assert len(document["orders"]) == args.merchants * 500, len(document["orders"])
            loads.append(os.getloadavg()[0])
    print(f"{args.merchants} merchants x 2 locations, {args.merchants * 500:,} open orders, "
          f"{LATENCY_MS:.0f} ms latency, {args.concurrency} merchants at once; median of "
          f"{args.runs} runs; load average (1 min) "
          f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs (shared machine)")
    print(f"{'':38}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}")
    for name, rows in (("queue --json (full discovery)", ours),
                       ("baseline: plain httpx + json.loads", base),
                       ("plain aiohttp + json.loads", floor)):
        print(f"{name:38}{median([r[0] for r in rows]):8.2f}{median([r[1] for r in rows]):8.2f}"
              f"{median([r[2] for r in rows]):9.0f}")
    print("targets: queue --json <= 3 s wall, <= 400 MB")


if __name__ == "__main__":
    main()
