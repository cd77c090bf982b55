"""Issue 14, team mode on a real PostgreSQL: a lease holder SIGKILLed mid-batch (another
operator is refused while its lease lives, takes over once it expired, and `recover` settles
the dead one's intents), and a console that shows another operator's batch within 2 s.

The killed operator runs in a UTS namespace of its own (`unshare -u`) with another host name:
its lease then reads as held on another machine, whose process this host cannot see, so only
expiry frees it (on one host a dead pid frees a lease at once, see `holder_gone`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from textual.pilot import Pilot

from services.audit import AuditTrail
from services.demo import consent_for, write_demo_files
from services.emulator import FaultPlan, SeedConfig
from services.settings import ReconSettings
from services.storage import open_store
from services.timestamps import parse_time
from services.workspace import Workspace
from tests.conftest import Emulator, LoopbackServer, make_emulator
from tests.crash_harness import ROOT, newly_completed, raw_orders, start_cli, wait_idle
from tests.oracle import eligibility as oracle

LEASE_TTL_S = 8.0  # short, so the takeover after expiry fits the test's budget
OTHER_HOST = "host-of-ann"


def read(url: str, sql: str, params: list[Any] | dict[str, Any] | None = None
         ) -> list[tuple[Any, ...]]:
    """A connection of the test's own: what the other processes committed."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def await_condition(condition: Callable[[], bool], timeout: float, what: str,
                    process: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process ended first: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.005)


def team_env(emulator: Emulator, tmp_path: Path, url: str, base_url: str) -> dict[str, str]:
    """Consents imported into the team's database; the environment of its CLI processes."""
    write_demo_files(tmp_path, emulator.merchants)
    consents = tmp_path / "all-consents.json"
    documents = [consent_for(m, datetime.now(UTC)) for m in emulator.merchants]
    consents.write_text(json.dumps(documents))
    settings = ReconSettings(db=url, square_base_url=base_url,
                             credentials=tmp_path / "credentials.toml", operator="setup")
    workspace = Workspace.open(settings)
    workspace.import_consent_files([consents])
    workspace.store.close()
    return dict(os.environ, RECON_DB=url, RECON_SQUARE_BASE_URL=base_url,
                RECON_CREDENTIALS=str(tmp_path / "credentials.toml"), RECON_READ_RETRIES="1",
                RECON_LEASE_TTL_S=str(LEASE_TTL_S), XDG_DATA_HOME=str(tmp_path / "data"))


@pytest.mark.loopback
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare -u (root) to give the killed holder another host")
def test_a_killed_lease_holder_is_taken_over_after_expiry_and_recovered(
        pg_url: str, tmp_path: Path) -> None:
    # UpdateOrder takes 0.4 s: ann's batch is mid-way for seconds. She sends for 6 of the
    # merchant's orders: bob has the rest to complete once he took over.
    emulator = make_emulator(SeedConfig(seed=5, merchants=2, orders_per_location=10),
                             FaultPlan(latency_ms=400, operations=["UpdateOrder"]))
    merchant = emulator.merchants[0].merchant.id
    documents = [consent_for(m, datetime.now(UTC)) for m in emulator.merchants]
    before = raw_orders(emulator)
    returned = oracle.returned_order_ids(before.values())
    with LoopbackServer(emulator) as server:
        env = team_env(emulator, tmp_path, pg_url, server.base_url)
        ann = subprocess.Popen(
            ["unshare", "-u", "sh", "-c", f'hostname {OTHER_HOST} && exec "$0" "$@"',
             sys.executable, "-m", "console.cli", "complete", "--merchant", merchant, "--yes",
             "--max-orders", "6", "--json"], cwd=ROOT, env=dict(env, RECON_OPERATOR="ann"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Right before the signal: an intent is durable, and ann is still running.
            await_condition(lambda: read(pg_url, "SELECT count(*) FROM intents")[0][0] > 0,
                            60, "ann's first intent", ann)
            durable = read(pg_url, "SELECT count(*), count(*) - count(outcome) FROM intents")[0]
            alive = ann.poll() is None
            ann.send_signal(signal.SIGKILL)
            assert ann.wait() == -signal.SIGKILL
        finally:
            if ann.poll() is None:
                ann.kill()
                ann.wait()
        assert durable[0] > 0 and alive, (durable, alive)
        wait_idle(server)  # ann's last requests land, as Square would apply them
        [(holder, host, expires)] = read(pg_url, "SELECT operator, host, expires_at FROM "
                                                 "leases WHERE merchant_id = %s", [merchant])
        assert (holder, host) == ("ann", OTHER_HOST)
        open_intents = read(pg_url, "SELECT count(*) FROM intents WHERE outcome IS NULL")[0][0]

        # bob, while ann's lease lives: `recover` leaves her intents alone, and `complete`
        # sends nothing for that merchant.
        bob = start_cli(env, "recover", "--json", operator="bob")
        out, err = bob.communicate(timeout=60)
        left = json.loads(out)
        assert left["results"] == [] and left["open_after"] == open_intents, (out, err)
        assert left["left_alone"] and "left alone" in err, (out, err)
        bob = start_cli(env, "complete", "--merchant", merchant, "--yes", "--json",
                        operator="bob")
        out, err = bob.communicate(timeout=60)
        assert "MERCHANT_LEASED" in out + err, (bob.returncode, out, err)
        assert datetime.now(UTC) < parse_time(expires), "bob came after the expiry: too slow"
        assert not read(pg_url, "SELECT 1 FROM batches WHERE operator = 'bob'")
        assert read(pg_url, "SELECT operator FROM leases WHERE merchant_id = %s",
                    [merchant]) == [("ann",)]
        assert read(pg_url, "SELECT count(*) FROM intents WHERE outcome IS NULL"
                    )[0][0] == open_intents

        # Once it expired, bob takes the merchant over: `recover` settles ann's open
        # intents, then he completes what she never reached.
        await_condition(lambda: datetime.now(UTC) >= parse_time(expires), LEASE_TTL_S + 5,
                        "ann's lease expiry")
        emulator.app.set_faults(FaultPlan())
        bob = start_cli(env, "recover", "--json", operator="bob")
        out, err = bob.communicate(timeout=60)
        settled = json.loads(out)
        assert bob.returncode == 0 and settled["open_after"] == 0, (out, err)
        assert len(settled["results"]) == open_intents, out
        bob = start_cli(env, "complete", "--merchant", merchant, "--yes", "--json",
                        operator="bob")
        out, err = bob.communicate(timeout=60)
        assert bob.returncode == 0, err
        assert any(r["outcome"] == "completed" for r in json.loads(out)["results"]), out
        wait_idle(server)
        after = raw_orders(emulator)

    # The judges: Square's own state, and the independent oracle.
    newly = newly_completed(before, after)
    assert newly
    store = open_store(pg_url)
    try:
        trail = AuditTrail(store)
        completed = Counter(e["order_id"] for e in trail.entries(outcome="completed"))
        assert set(completed) == newly, "completed in Square without its outcome, or the reverse"
        assert max(completed.values()) == 1, completed.most_common(3)
        assert store.open_intent_count() == 0
        report = trail.verify()
        assert report.ok, report.sentence()
    finally:
        store.close()
    anns = read(pg_url, "SELECT i.outcome FROM intents i JOIN batches b USING (batch_id) "
                        "WHERE b.operator = 'ann'")
    assert anns and all(outcome is not None for (outcome,) in anns), anns
    intents = Counter(order_id for (order_id,) in read(
        pg_url, "SELECT order_id FROM intents WHERE outcome = 'completed'"))
    assert set(intents) == newly and max(intents.values()) == 1
    consents = [d for d in documents if d["merchant_id"] == merchant]
    for order_id in newly:
        assert after[order_id]["version"] == before[order_id]["version"] + 1, order_id
        verdict = oracle.judge(before[order_id], consents, datetime.now(UTC), returned)
        assert verdict.eligible, (order_id, verdict.reasons)


@pytest.mark.loopback
async def test_a_batch_completed_by_another_console_shows_in_this_queue_within_2s(
        pg_url: str, tmp_path: Path) -> None:
    """Two consoles on one PostgreSQL: ann's console (Pilot) has a merchant's queue open;
    bob's console, a real `recon-console complete` process, completes that merchant's batch.
    Ann's queue drops the completed orders within 2 s of bob's commit, woken by NOTIFY: her
    console's own tick is set far longer than 2 s, so a poll of the counter cannot do it."""

    from console.app import ReconApp
    from console.screens.queue import QueueScreen
    from tests.console_harness import merchants_loaded, wait_until

    emulator = make_emulator(SeedConfig(seed=3, merchants=2, orders_per_location=6),
                             FaultPlan(latency_ms=200, operations=["UpdateOrder"]))
    merchant = emulator.merchants[0].merchant.id
    with LoopbackServer(emulator) as server:
        env = team_env(emulator, tmp_path, pg_url, server.base_url)
        settings = ReconSettings(db=pg_url, square_base_url=server.base_url,
                                 credentials=tmp_path / "credentials.toml", operator="ann")
        workspace = Workspace.open(settings)
        workspace.credentials(required=False)
        app = ReconApp(workspace)

        async with app.run_test(size=(160, 45)) as pilot:
            await wait_until(pilot, merchants_loaded(app), timeout=60)
            app.push_screen(QueueScreen(merchant))
            await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
            queue = app.screen
            assert isinstance(queue, QueueScreen)
            candidates = queue._kind_counts["candidate"]
            assert candidates > 0

            assert app.changes is not None
            seen = app.changes_loaded
            bob = start_cli(env, "complete", "--merchant", merchant, "--yes", "--json",
                            operator="bob")
            # bob's batch has committed: no eligible order of that merchant, no lease.
            done = await committed(pilot, pg_url, bob, (
                "SELECT NOT EXISTS (SELECT 1 FROM orders WHERE merchant_id = %(m)s AND "
                "eligible = 1) AND NOT EXISTS (SELECT 1 FROM leases WHERE merchant_id = "
                "%(m)s) AND EXISTS (SELECT 1 FROM batches WHERE operator = 'bob' AND "
                "finished_at IS NOT NULL)"), {"m": merchant})
            while any(o.eligible for o in queue.orders.values()):
                assert time.monotonic() - done < 2.0, "bob's batch not shown within 2 s"
                await pilot.pause(0.02)
            print(f"bob's batch shown after {time.monotonic() - done:.2f} s")
            assert queue._kind_counts["candidate"] == 0
            # It came through the change feed: the console reloaded at a newer version.
            assert app.changes_loaded > seen
            out, err = bob.communicate(timeout=30)
            assert bob.returncode == 0, err
            completed = [r for r in json.loads(out)["results"] if r["outcome"] == "completed"]
            assert len(completed) == candidates
        await workspace.aclose()


async def committed(pilot: Pilot[object], url: str, process: subprocess.Popen[str],
                    sql: str, params: dict[str, Any], timeout: float = 60.0) -> float:
    """Until the test's own connection reads `sql` true (what the other process committed);
    the monotonic time then. The console keeps running meanwhile."""
    deadline = time.monotonic() + timeout
    while not read(url, sql, params)[0][0]:
        if process.poll() is not None and process.returncode != 0:
            raise AssertionError(process.communicate()[1])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"never committed: {sql}")
        await pilot.pause(0.01)
    return time.monotonic()
