"""Team mode on PostgreSQL against SQLite, side by side from one run on the same machine (issue 14).

1. Completion: `complete --all-merchants --yes --json`, process start to exit, 5,000 orders
   across 50 merchants with 20 ms of injected latency over loopback, on SQLite and on PostgreSQL
   (a throwaway local cluster, services/postgres_cluster.py, run as the team demo runs it:
   password auth and fsync on), each against a fresh emulator with the same seed.
   Target: PostgreSQL within 20% of SQLite.
2. Two operators at once: two `complete --merchant ...` processes with different
   RECON_OPERATOR on disjoint halves of the merchants, started together; each one's wall time
   against the same half run alone (one after the other, on a fresh emulator and database of
   their own). Target: each within 20% of alone. On PostgreSQL, and on SQLite too unless
   `--postgres-only`.
3. Optionally (`--verify-entries N`), `audit verify` throughput on the same cluster
   (bench/audit_verify_pg.py's measurement). Target: >= 100,000 entries/s.

Four-eyes approval (a batch over 200 orders or 10,000.00 needs a second operator) would stop
every batch here at `prepared`: the bench sets RECON_FOUR_EYES_ORDERS and
RECON_FOUR_EYES_AMOUNT out of reach for the timed processes, so it measures completion, not the
approval step. Consent import and database creation are not timed. Each figure is the median of
`--rounds`; the load average is printed, since the machine may be shared. Client, emulator
and server CPU seconds are printed beside the completion times: client, emulator and server
share the machine's cores, so on a small machine two operators at once compete for CPU, and
the two-operator ratio then measures the cores, not the store.

    .venv/bin/python -m bench.team [--rounds 3] [--postgres-only | --completion-only]
                                   [--verify-entries 0]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._support import ROOT, loopback_emulator
from bench.audit_verify_pg import timed
from bench.completion import FOUR_EYES_OUT_OF_REACH, LATENCY_MS, build_audit, write_consents
from services.database_url import provide_password
from services.postgres_cluster import LocalCluster, local_cluster
from services.storage.postgres import create_database
from services.store import open_store

_databases = itertools.count(1)


@contextmanager
def workspace(args: argparse.Namespace, cluster: LocalCluster | None,
              latency_ms: float = LATENCY_MS) -> Iterator[tuple[dict[str, str], list[str]]]:
    """A fresh emulator (same seed every time) and a fresh database with the consents imported
    (not timed): the environment for `complete`, and the merchant ids in order."""
    with loopback_emulator("--seed", str(args.seed), "--merchants", str(args.merchants),
                           "--orders-per-location", str(args.orders_per_merchant // 2),
                           "--kinds", "online_paid_open=1",
                           "--latency-ms", str(latency_ms)) as manifest:
        directory = Path(manifest["directory"])
        credentials = directory / "credentials.toml"
        if cluster is None:
            db = str(directory / "recon.db")
        else:
            assert cluster.password is not None
            with open(credentials, "a") as handle:  # owner-only already (write_demo_files)
                handle.write(f'\n[database]\npassword = "{cluster.password}"\n')
            provide_password(cluster.url(), credentials)
            name = f"bench_{next(_databases)}"
            create_database(cluster.url(), name)
            db = cluster.url(name)
        consents = write_consents(manifest, directory / "bench-consents.json")
        env = {**os.environ, **FOUR_EYES_OUT_OF_REACH,
               "RECON_SQUARE_BASE_URL": manifest["base_url"],
               "RECON_CREDENTIALS": str(credentials), "RECON_DB": db,
               "RECON_OPERATOR": "bench-setup",
               "RECON_CHECKPOINT_DIR": str(directory / "checkpoints"),
               "XDG_DATA_HOME": str(directory / "data"), "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "console.cli", "consent", "import",
                        str(consents)], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        env["BENCH_EMULATOR_PID"] = str(manifest["pid"])  # read here only, for its CPU
        yield env, [m["merchant_id"] for m in manifest["merchants"]]


def complete(env: dict[str, str], operator: str, merchants: list[str] | None) -> dict[str, Any]:
    """One timed `complete` process, start to exit; its summary."""
    who = ["--all-merchants"] if merchants is None else ["--merchant", *merchants]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "console.cli", "complete", *who, "--yes",
                           "--json"], cwd=ROOT, env={**env, "RECON_OPERATOR": operator},
                          capture_output=True)
    wall = time.perf_counter() - start
    try:
        document = json.loads(done.stdout)
        summary = document["summary"]
    except (ValueError, KeyError):
        raise SystemExit(f"complete ({operator}) failed ({done.returncode}): "
                         f"{done.stderr.decode()[-2000:]}") from None
    # Why the others were not completed, so an odd run explains itself.
    reasons = collections.Counter(f"{r['outcome']} {r['reason']}"
                                  for r in document.get("results", [])
                                  if r["outcome"] != "completed")
    if document.get("refused"):
        reasons[f"refused {document['refused'].get('reason')}"] += 1
    return {"wall": wall, "completed": summary["completed"],
            "other": summary["skipped"] + summary["failed"],
            "why": ", ".join(f"{n} {why}" for why, n in reasons.most_common(3))}


def halves(merchants: list[str]) -> tuple[list[str], list[str]]:
    middle = len(merchants) // 2
    return merchants[:middle], merchants[middle:]


def _cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of a process (and of its children it has reaped, with `children`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu(cluster: LocalCluster | None) -> float:
    """The PostgreSQL server's CPU so far: the postmaster, the backends it reaped (one per
    client connection) and its live children (checkpointer, WAL writer, open backends)."""
    if cluster is None:
        return 0.0
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = _cpu(postmaster, children=True)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                total += _cpu(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # exited meanwhile
    return total


def completion(args: argparse.Namespace, cluster: LocalCluster | None) -> dict[str, Any]:
    """With CPU seconds beside the wall time: on a 2-core machine client, emulator and server
    share the cores, so a slower wall time may be CPU, not waiting."""
    with workspace(args, cluster) as (env, _):
        load = os.getloadavg()[0]
        emulator = int(env["BENCH_EMULATOR_PID"])
        before = (resource.getrusage(resource.RUSAGE_CHILDREN), _cpu(emulator),
                  server_cpu(cluster))
        result = complete(env, "bench", None)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {**result, "load": load,
                "client_cpu": (after.ru_utime + after.ru_stime
                               - before[0].ru_utime - before[0].ru_stime),
                "emulator_cpu": _cpu(emulator) - before[1],
                "server_cpu": server_cpu(cluster) - before[2]}


def two_operators(args: argparse.Namespace, cluster: LocalCluster | None
                  ) -> dict[str, dict[str, Any]]:
    """Each half alone (one after the other), then both halves at once on a fresh pair. For
    the pair, the CPU seconds of everything involved (both clients, the emulator, the
    server) against what the machine's cores could give in that wall time: near 100%, the
    two runs wait for the cores, not for each other."""
    latency = args.pair_latency_ms
    with workspace(args, cluster, latency) as (env, merchants):
        first, second = halves(merchants)
        emulator = int(env["BENCH_EMULATOR_PID"])
        alone = {}
        for half, operator, chosen in (("A", "alice", first), ("B", "bob", second)):
            before = (resource.getrusage(resource.RUSAGE_CHILDREN), _cpu(emulator),
                      server_cpu(cluster))
            alone[half] = complete(env, operator, chosen)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # Everything the run made the machine do: its client, the emulator, the server.
            alone[half]["cpu"] = (after.ru_utime + after.ru_stime - before[0].ru_utime
                                  - before[0].ru_stime + _cpu(emulator) - before[1]
                                  + server_cpu(cluster) - before[2])
    with workspace(args, cluster, latency) as (env, merchants):
        first, second = halves(merchants)
        emulator = int(env["BENCH_EMULATOR_PID"])
        before = (resource.getrusage(resource.RUSAGE_CHILDREN), _cpu(emulator),
                  server_cpu(cluster))
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:  # subprocess.run waits without the GIL
            a = pool.submit(complete, env, "alice", first)
            b = pool.submit(complete, env, "bob", second)
            together = {"A": a.result(), "B": b.result()}
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime - before[0].ru_utime - before[0].ru_stime
               + _cpu(emulator) - before[1] + server_cpu(cluster) - before[2])
    busy = {"wall": wall, "cpu": cpu, "busy": cpu / (wall * (os.cpu_count() or 1))}
    return {**{f"{half} {kind}": result[half] for kind, result in
               (("alone", alone), ("together", together)) for half in "AB"}, "pair": busy}


def med(runs: list[dict[str, Any]], key: str = "wall") -> float:
    return statistics.median(float(r[key]) for r in runs)


def verdict(ratio: float) -> str:
    return "met" if ratio <= 1.2 else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=50)
    parser.add_argument("--orders-per-merchant", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pair-latency-ms", type=float, default=LATENCY_MS,
                        help="the emulator's latency for the two-operator runs")
    parser.add_argument("--postgres-only", action="store_true",
                        help="two operators on PostgreSQL only (not on SQLite)")
    parser.add_argument("--completion-only", action="store_true",
                        help="part 1 only: no two-operator runs")
    parser.add_argument("--verify-entries", type=int, default=0,
                        help="also time `audit verify` over this many entries on PostgreSQL")
    args = parser.parse_args()
    stores = ["PostgreSQL"] if args.postgres_only else ["SQLite", "PostgreSQL"]
    if args.completion_only:
        stores = []
    loads = [os.getloadavg()[0]]
    full: dict[str, list[dict[str, Any]]] = {"SQLite": [], "PostgreSQL": []}
    pairs: dict[str, list[dict[str, dict[str, Any]]]] = {name: [] for name in stores}
    verify_line = ""
    with local_cluster(for_tests=False) as cluster:
        for _ in range(args.rounds):  # interleaved, so both stores see the same machine
            full["SQLite"].append(completion(args, None))
            full["PostgreSQL"].append(completion(args, cluster))
            for name in stores:
                pairs[name].append(two_operators(args, cluster if name == "PostgreSQL"
                                                 else None))
            loads.append(os.getloadavg()[0])
        if args.verify_entries:
            url = cluster.url("bench_verify")
            create_database(cluster.url(), "bench_verify")
            provide_password(url, Path(full_credentials(cluster)))
            start = time.perf_counter()
            build_audit(url, args.verify_entries)
            built = time.perf_counter() - start
            store = open_store(url)
            try:
                report, seconds, _ = timed(store)
            finally:
                store.close()
            verify_line = (f"audit verify on PostgreSQL: {report.entries:,} entries in "
                           f"{seconds:.2f} s = {report.entries / seconds:,.0f} entries/s "
                           f"(target >= 100,000/s: "
                           f"{'met' if report.entries / seconds >= 100_000 else 'MISSED'}; "
                           f"ok={report.ok}; building them took {built:.1f} s)")
    total = args.merchants * args.orders_per_merchant
    print(f"team mode: {total:,} orders, {args.merchants} merchants, {LATENCY_MS} ms latency, "
          f"emulator seed {args.seed}, loopback, process start to exit; median of "
          f"{args.rounds} round(s); {os.cpu_count()} cores; load average (1 min) "
          f"{', '.join(f'{x:.1f}' for x in loads)} (start, after each round)")
    print("four-eyes thresholds set out of reach (RECON_FOUR_EYES_ORDERS/_AMOUNT)")
    print()
    print("1. complete --all-merchants --yes --json")
    sqlite, postgres = med(full["SQLite"]), med(full["PostgreSQL"])
    for name in ("SQLite", "PostgreSQL"):
        runs = full[name]
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"   {name:<11} {med(runs):6.2f} s  (runs: {walls}; completed "
              f"{runs[0]['completed']}, other {runs[0]['other']}; CPU s: client "
              f"{med(runs, 'client_cpu'):.1f}, emulator {med(runs, 'emulator_cpu'):.1f}, "
              f"server {med(runs, 'server_cpu'):.1f})")
    print(f"   PostgreSQL / SQLite = {postgres / sqlite:.2f}  (target: PostgreSQL within 20% "
          f"of SQLite, <= 1.20: {verdict(postgres / sqlite)})")
    if not stores:  # --completion-only
        if verify_line:
            print(f"\n3. {verify_line}")
        return
    print()
    first, second = halves([f"m{i}" for i in range(args.merchants)])
    print(f"2. two operators at once on disjoint halves ({len(first)} + {len(second)} "
          f"merchants, `complete --merchant ...`, {args.pair_latency_ms:g} ms latency), each "
          f"against its half alone")
    print(f"   {'store':<11} {'half':<5} {'alone':>8} {'together':>9} {'ratio':>6}  target "
          f"(<= 1.20)   completed together")
    for name in stores:
        for half in "AB":
            alone = med([p[f"{half} alone"] for p in pairs[name]])
            together = med([p[f"{half} together"] for p in pairs[name]])
            # The worst round's: a round that did not complete everything is not hidden.
            done = min((p[f"{half} together"] for p in pairs[name]),
                       key=lambda r: r["completed"])
            print(f"   {name:<11} {half:<5} {alone:7.2f}s {together:8.2f}s "
                  f"{together / alone:6.2f}  {verdict(together / alone):<13} "
                  f"{done['completed']} (other {done['other']}"
                  f"{': ' + done['why'] if done['why'] else ''})")
        # The cores' floor: both runs' CPU cannot take less wall time than it fills on all
        # cores, so no store and no code can bring a half below this ratio on this machine.
        floor = med([{"wall": (p["A alone"]["cpu"] + p["B alone"]["cpu"])
                      / (os.cpu_count() or 1)} for p in pairs[name]])
        best = max(floor / med([p[f"{h} alone"] for p in pairs[name]]) for h in "AB")
        print(f"   {name:<11} alone: A {med([p['A alone'] for p in pairs[name]], 'cpu'):.1f} + "
              f"B {med([p['B alone'] for p in pairs[name]], 'cpu'):.1f} CPU s (client, "
              f"emulator, server); at once they need >= {floor:.2f} s of all "
              f"{os.cpu_count()} cores: the lowest ratio this machine allows is {best:.2f}")
        pair = [p["pair"] for p in pairs[name]]
        print(f"   {name:<11} together: {med(pair, 'cpu'):.1f} CPU s (clients, emulator, "
              f"server) in {med(pair):.2f} s on {os.cpu_count()} cores = "
              f"{100 * med(pair, 'busy'):.0f}% of the machine busy")
    if verify_line:
        print()
        print(f"3. {verify_line}")


def full_credentials(cluster: LocalCluster) -> str:
    """A credentials file holding only the cluster's password, owner-only, in its directory."""
    path = cluster.directory / "bench-credentials.toml"
    if not path.exists():
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(f'[database]\npassword = "{cluster.password}"\n')
    return str(path)


if __name__ == "__main__":
    main()
