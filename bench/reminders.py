"""Reminders at scale: preparing reminders for 2,000 merchants (plan and render, target <= 2 s)
and sending 2,000 to a local SMTP server over one connection (target <= 10 s), each beside a
baseline from the same run: reading the same rows with one query, and plain smtplib sending
the same messages with no outbox and no audit.

    .venv/bin/python -m bench.reminders [--merchants 2000]
"""

from __future__ import annotations

import argparse
import json
import smtplib
import subprocess
import sys
import time
from datetime import UTC, datetime

from bench._support import ROOT, scratch_dir
from services.audit import AuditTrail
from services.reminders import ReminderService, SmtpTarget
from services.store import Store
from tests.reminders_support import fill

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def serve(port: int) -> None:
    """The SMTP server, in its own process so client and server do not share a GIL."""
    from services.reminders.local_server import LocalSmtpServer, Mailbox
    server = LocalSmtpServer(Mailbox())
    server._listen_on(port)
    server.start()
    print(f"ready {server.port}", flush=True)   # the port it got, should it have moved
    sys.stdin.read()          # until the parent closes our stdin
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merchants", type=int, default=2000)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    from services.reminders.local_server import _free_port
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.reminders", "--serve", str(port)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stdout is not None
    word, port_text = server.stdout.readline().split()
    assert word == b"ready"
    port = int(port_text)
    try:
        report = run(args.merchants, port)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)
    print(json.dumps(report, indent=2))


def run(merchants: int, port: int) -> dict[str, object]:
    directory = scratch_dir("bench-remind-")
    store = Store(directory / "recon.db")
    fill(store, merchants, NOW, zones=["Europe/London", "UTC", "Africa/Lagos"])
    service = ReminderService(store, AuditTrail(store, lambda: NOW),
                              sender="Reconciliation Team <recon@ledgerline.example>",
                              consent_link="https://ledgerline.example/consent",
                              consents=dict, clock=lambda: NOW, operator="bench",
                              smtp=SmtpTarget.parse(f"smtp://127.0.0.1:{port}"))
    started = time.perf_counter()
    rows = store.queued_orders(ordered=False)
    read_s = time.perf_counter() - started

    started = time.perf_counter()
    cpu = time.process_time()
    plans = service.plan()
    plan_s = time.perf_counter() - started
    service.prepare(plans)                 # render every message: what `send` will send
    prepare_s = time.perf_counter() - started
    # CPU time too: on a shared machine the wall time includes waiting for a core.
    prepare_cpu_s = time.process_time() - cpu
    assert len(plans) == merchants and all(p.due for p in plans)
    rendered = [data.encode() for data in service._prepared.values()]

    # Baseline: the same bytes over one connection, nothing recorded.
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        for plan, data in zip(plans, rendered, strict=True):
            smtp.sendmail("recon@ledgerline.example", list(plan.recipients), data)
    raw_s = time.perf_counter() - started

    started = time.perf_counter()
    results = service.send(plans)
    send_s = time.perf_counter() - started
    assert all(r.status == "sent" for r in results), {r.status for r in results}
    return {
        "merchants": merchants, "orders_read": len(rows),
        "prepare_s": round(prepare_s, 3), "prepare_cpu_s": round(prepare_cpu_s, 3),
        "prepare_target_s": 2.0,
        "of_which_planning_s": round(plan_s, 3),
        "baseline_reading_the_rows_s": round(read_s, 3),
        "send_s": round(send_s, 3), "send_target_s": 10.0,
        "send_per_s": round(merchants / send_s),
        "baseline_plain_smtplib_s": round(raw_s, 3),
        "connections": 1,
    }


if __name__ == "__main__":
    main()
