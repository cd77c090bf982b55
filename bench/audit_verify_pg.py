"""`audit verify` throughput on PostgreSQL against SQLite, in one run on the same machine.

Builds the same chain of N entries (default 200,000) in a SQLite file and in a throwaway
PostgreSQL cluster (services/postgres_cluster.py: the machine's initdb/pg_ctl, unix socket,
fsync off, which does not touch reads), then times `AuditTrail.verify()` on each: SQLite as the
console runs it (one process per core from 200,000 entries on) and in one process; PostgreSQL
streaming from a server-side cursor. Target: >= 100,000 entries/s on PostgreSQL.

    .venv/bin/python -m bench.audit_verify_pg [--entries 200000]
"""

from __future__ import annotations

import argparse
import os
import time

from bench._support import scratch_dir
from bench.completion import build_audit
from services.audit import AuditTrail, VerifyReport
from services.postgres_cluster import local_cluster
from services.store import Store


def timed(store: Store, **options: int) -> tuple[VerifyReport, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    report = AuditTrail(store).verify(**options)
    return report, time.perf_counter() - start, time.process_time() - cpu


def line(name: str, report: VerifyReport, seconds: float, cpu: float) -> str:
    # Per CPU second of this process too: on a shared machine the wall time includes waiting
    # for a core (worker processes' CPU, and the server's, are not in it).
    return (f"{name:<34} {report.entries:>9,} entries in {seconds:6.2f} s = "
            f"{report.entries / seconds:>9,.0f} entries/s wall, "
            f"{report.entries / max(cpu, 1e-9):>9,.0f}/s of this process's CPU  ok={report.ok}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=200_000)
    args = parser.parse_args()
    print(f"audit verify, {args.entries:,} entries; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    sqlite_path = scratch_dir("bench-verify-") / "audit.db"
    start = time.perf_counter()
    build_audit(sqlite_path, args.entries)
    print(f"built the SQLite chain in {time.perf_counter() - start:.1f} s")
    sqlite = Store(sqlite_path)
    results = [("SQLite (as the console runs it)", *timed(sqlite)),
               ("SQLite, one process", *timed(sqlite, parallel_from=10**12))]
    sqlite.close()
    with local_cluster(for_tests=True) as cluster:
        url = cluster.url()
        start = time.perf_counter()
        build_audit(url, args.entries)
        print(f"built the PostgreSQL chain in {time.perf_counter() - start:.1f} s")
        postgres = Store(url)
        try:
            results.append(("PostgreSQL, server-side cursor", *timed(postgres)))
            head = AuditTrail(postgres).checkpoint().head_hash
        finally:
            postgres.close()
    for name, report, seconds, cpu in results:
        print(line(name, report, seconds, cpu))
    same = {report.head_hash for _, report, _, _ in results} == {head}
    print(f"same head hash on both: {same}; target on PostgreSQL: >= 100,000 entries/s")


if __name__ == "__main__":
    main()
