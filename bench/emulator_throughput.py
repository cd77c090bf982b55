"""Is the emulator ever the bottleneck?

UpdateOrder and SearchOrders requests per second over loopback with no injected latency, against
a bare uvicorn app that answers fixed JSON (the ceiling of the server and client on this machine,
measured in the same run); and the time and memory to seed 100,000 orders.

    .venv/bin/python -m bench.emulator_throughput
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from bench._support import ROOT, loopback_emulator, scratch_dir

CONNECTIONS = 32
DURATION_S = 4


def wrk(url: str, request_file: Path) -> tuple[float, int]:
    """Requests/s and non-200 answers, with wrk replaying the file."""
    if shutil.which("wrk") is None:
        raise SystemExit("This benchmark needs wrk (a load generator): apt-get install wrk")
    out = subprocess.run(["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{DURATION_S}s", "-s",
                          str(Path(__file__).with_name("wrk_requests.lua")), url, "--",
                          str(request_file), "2"], capture_output=True, text=True,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = int(re.search(r"NON200 (\d+)", out).group(1))  # type: ignore[union-attr]
    return rps, bad


def bare_server() -> tuple[str, uvicorn.Server]:
    body = json.dumps({"order": {"id": "x", "state": "COMPLETED", "version": 2}}).encode()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def seed_cost(runs: int = 3) -> dict[str, float]:
    """The median of a few runs: this machine's timing noise is +-15 %."""
    results = sorted((_seed_once() for _ in range(runs)), key=lambda r: r["seconds"])
    median = results[len(results) // 2]
    median["all_seconds"] = [round(r["seconds"], 1) for r in results]  # type: ignore[assignment]
    return median


def _seed_once() -> dict[str, float]:
    code = ("import time,resource;t=time.perf_counter();"
            "from services.emulator import seed_square, SeedConfig;"
            "sq,_=seed_square(SeedConfig(merchants=200, orders_per_location=250));"
            "print(time.perf_counter()-t, len(sq.orders), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    base = ("import time,resource;import services.emulator;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    idle = float(subprocess.run([sys.executable, "-c", base], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout)
    return {"seconds": float(out[0]), "orders": float(out[1]), "peak_mb": float(out[2]),
            "interpreter_and_imports_mb": idle}


def main() -> None:
    workdir = scratch_dir("bench-wrk-")
    bare_url, bare = bare_server()
    (workdir / "bare.txt").write_text("PUT\t/v2/orders/x\tnone\t{}\n")
    ceiling, _ = wrk(bare_url, workdir / "bare.txt")
    bare.should_exit = True
    with loopback_emulator("--merchants", "8", "--orders-per-location", "2000",
                           "--kinds", "online_paid_open=1") as manifest:
        base_url = manifest["base_url"]
        updates, searches = [], []
        with httpx.Client(timeout=60) as client:
            for merchant in manifest["merchants"]:
                token = merchant["access_token"]
                query = {"filter": {"state_filter": {"states": ["OPEN"]},
                                    "source_filter": {"source_names": ["Square Online"]}},
                         "sort": {"sort_field": "CREATED_AT", "sort_order": "ASC"}}
                body = {"location_ids": merchant["location_ids"][:2], "query": query,
                        "limit": 1000}
                cursor = None
                while True:
                    page = client.post(base_url + "/v2/orders/search",
                                       json=dict(body, cursor=cursor) if cursor else body,
                                       headers={"Authorization": "Bearer " + token}).json()
                    for order in page.get("orders", []):
                        updates.append("\t".join(["PUT", f"/v2/orders/{order['id']}", token,
                                                   json.dumps({
                            "idempotency_key": f"bench-{order['id']}",
                            "order": {"location_id": order["location_id"],
                                      "version": order["version"], "reference_id": "bench"}})]))
                    cursor = page.get("cursor")
                    if not cursor:
                        break
                searches.append("\t".join(["POST", "/v2/orders/search", token, json.dumps(
                    dict(body, limit=100))]))
        (workdir / "updates.txt").write_text("\n".join(updates) + "\n")
        (workdir / "searches.txt").write_text("\n".join(searches) + "\n")
        update_rps, update_bad = wrk(base_url, workdir / "updates.txt")
        search_rps, search_bad = wrk(base_url, workdir / "searches.txt")
    seeding = seed_cost()
    print(f"wrk, {CONNECTIONS} connections, {DURATION_S} s each, emulator in its own process")
    print(f"bare uvicorn ceiling (fixed JSON answer):    {ceiling:8.0f} req/s")
    print(f"UpdateOrder (applied, version +1):            {update_rps:8.0f} req/s "
          f"= {update_rps / ceiling:.2f} x ceiling; {update_bad} non-200 of "
          f"{len(updates)} distinct orders (target >= 1,000 req/s)")
    print(f"SearchOrders (100 orders a page):             {search_rps:8.0f} req/s "
          f"= {search_rps / ceiling:.2f} x ceiling; {search_bad} non-200 "
          "(target >= 1,000 req/s)")
    print(f"seed 100,000 orders: median {seeding['seconds']:.1f} s of {seeding['all_seconds']} "
          f"(target < 15 s), peak RSS "
          f"{seeding['peak_mb']:.0f} MB, of which {seeding['interpreter_and_imports_mb']:.0f} MB "
          f"is the interpreter and imports (target < 600 MB); {seeding['orders']:.0f} orders "
          "(refunds add return orders)")


if __name__ == "__main__":
    main()
