"""`complete` in a subprocess against the loopback emulator, killed with SIGKILL in the middle
of its batch, then `recover`: the invariants hold, judged from Square's (the emulator's) state
and the independent oracle (tests/crash_harness.py says which, and what "mid-batch" requires)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from services.audit import AuditTrail
from services.emulator import FaultPlan, SeedConfig
from services.store import Store
from tests.conftest import Emulator, LoopbackServer, make_emulator
from tests.crash_harness import KillPlan, cli_workdir, run_mid_batch_trial, run_trial, start_cli

# Each runs until one kill lands mid-batch: at least 20 real mid-batch kills per run.
MID_BATCH_KILLS = 20


@pytest.mark.loopback
@pytest.mark.parametrize("slot", range(MID_BATCH_KILLS))
def test_sigkill_mid_batch_then_recover(slot: int) -> None:
    result, retried = run_mid_batch_trial(slot)
    for missed in retried:  # counted apart, never as a pass; their invariants must hold too
        print(f"retried seed {missed.seed}: {missed.why_not}")
        assert not missed.violations, missed.violations
    assert result.mid_batch, f"no mid-batch kill in {len(retried) + 1} trials: {result.why_not}"
    # The moment of the kill, as the harness checked it.
    assert result.exit_code == -9
    assert result.intents_at_kill >= 1
    assert not result.violations, "\n".join(result.violations)
    assert result.completed >= result.completed_before_recover
    print(f"seed {result.seed} ({result.kill_mode}): {result.intents_at_kill} intents, "
          f"{result.open_at_kill} open at the kill; {result.completed_before_recover} completed "
          f"before recover, {result.settled_by_recover} settled by it, {result.completed} in all")


@pytest.mark.loopback
def test_a_kill_after_the_process_exited_is_not_counted_as_mid_batch() -> None:
    # The harness must tell: a "kill" long after the batch is not a mid-batch kill.
    result = run_trial(8, plan=KillPlan("delay", 0.0, 120.0, 0.0))  # 15 ms, no lost answers
    assert not result.mid_batch
    assert result.why_not == "the process had exited before the kill"
    assert result.exit_code == 0
    assert not result.violations, result.violations


# ---------------------------------------------------------------- issue 8, holes 4, 5 and 6
def _newly_completed(emulator: Emulator, before: dict[str, str]) -> set[str]:
    return {r.id for r in emulator.square.orders.values()
            if r.state == "COMPLETED" and before[r.id] != "COMPLETED"}


def _states(emulator: Emulator) -> dict[str, str]:
    return {r.id: r.state for r in emulator.square.orders.values()}


@pytest.mark.loopback
def test_hole4_complete_exits_1_and_names_the_unreachable_merchants(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(seed=3, merchants=2, orders_per_location=10))
    with LoopbackServer(emulator) as server:
        env = cli_workdir(emulator, tmp_path, server.base_url)
        emulator.app.set_faults(FaultPlan(server_error_rate=1.0,
                                          operations=["BatchRetrieveOrders"]))
        out, errors = start_cli(env, "complete", "--all-merchants", "--yes", "--json",
                                operator="alice").communicate(timeout=120)
        document = json.loads(out)
        assert document["results"]
        assert {r["reason"] for r in document["results"]} == {"SQUARE_UNREACHABLE"}
        assert "could not be reached" in errors
        assert document["summary"]["completed"] == 0


@pytest.mark.loopback
def test_hole5_complete_says_outcomes_not_recorded_and_exits_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from console.cli import main
    from services.store import SQLiteStore

    emulator = make_emulator(SeedConfig(seed=4, merchants=1, orders_per_location=10),
                             FaultPlan(latency_ms=5))
    with LoopbackServer(emulator) as server:
        env = cli_workdir(emulator, tmp_path, server.base_url)
        for name in ("RECON_DB", "RECON_SQUARE_BASE_URL", "RECON_CREDENTIALS",
                     "RECON_READ_RETRIES"):
            monkeypatch.setenv(name, env[name])
        before = _states(emulator)

        def locked(self: SQLiteStore, *args: object) -> None:
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(SQLiteStore, "settle_intents", locked)
        code = main(["complete", "--all-merchants", "--yes", "--json"])
        captured = capsys.readouterr()
        monkeypatch.undo()
        document = json.loads(captured.out)
        unrecorded = [r for r in document["results"] if r["reason"] == "OUTCOME_NOT_RECORDED"]
        assert code == 1
        assert f"{len(unrecorded)} outcomes not recorded: run `recon-console recover`" in \
            captured.err
        assert document["summary"]["completed"] == 0
        assert _newly_completed(emulator, before) <= {r["order_id"] for r in unrecorded}
        out, _ = start_cli(env, "recover", "--json", operator="alice").communicate(timeout=60)
        assert json.loads(out)["open_after"] == 0


def _wait_for_open_intent(db: Path, processes: list[subprocess.Popen[str]],
                          timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                if conn.execute("SELECT COUNT(*) FROM intents WHERE outcome IS NULL"
                                ).fetchone()[0]:
                    return True
        except sqlite3.Error:
            pass  # not migrated yet, or busy
        time.sleep(0.01)
    return False


@pytest.mark.loopback
@pytest.mark.parametrize("recovering", [False, True],
                         ids=["two-completes", "two-completes-and-a-console-start"])
def test_hole6_concurrent_runs_complete_each_order_once(tmp_path: Path,
                                                        recovering: bool) -> None:
    # Slow enough that a batch (about 3 s) outlasts a process start-up: the runs overlap.
    emulator = make_emulator(SeedConfig(seed=5, merchants=2, orders_per_location=40),
                             FaultPlan(latency_ms=300, seed=5))
    with LoopbackServer(emulator) as server:
        env = cli_workdir(emulator, tmp_path, server.base_url)
        before = _states(emulator)
        runs = [start_cli(env, "complete", "--all-merchants", "--yes", "--json", operator=name)
                for name in ("alice", "bob")]
        others = [start_cli(env, "recover", "--json", operator="carol")] if recovering else []
        late = None
        if recovering and _wait_for_open_intent(tmp_path / "recon.db", runs):
            # A console start while a batch is in flight: it must not touch that batch.
            late = start_cli(env, "recover", "--json", operator="dave")
        outputs = [p.communicate(timeout=180) for p in runs]
        for process in others:
            process.communicate(timeout=180)
        late_out = late.communicate(timeout=180)[0] if late else ""
    if late is not None:
        document = json.loads(late_out)
        assert document["results"] == [], "recover settled a live run's intents"
        if document["open_before"]:
            assert document["left_alone"], document
    documents = [json.loads(out) for out, _ in outputs]
    assert [p.returncode for p in runs] == [0, 0], [err for _, err in outputs]
    results = [r for d in documents for r in d["results"]]
    newly = _newly_completed(emulator, before)
    assert newly
    store = Store(tmp_path / "recon.db")
    try:
        completed = Counter(e["order_id"] for e in AuditTrail(store).entries(outcome="completed"))
        assert set(completed) == newly, "an order completed in Square without its outcome"
        assert max(completed.values()) == 1, completed.most_common(3)
        assert store.open_intent_count() == 0
        recoveries = [e for e in AuditTrail(store).entries(action="recovery")
                      if e["operator"] in ("carol", "dave")]
        assert recoveries == [], "a recover settled a live run's intents"
        assert AuditTrail(store).verify().ok
    finally:
        store.close()
    leased = [r for r in results if r["reason"] == "LEASED"]
    # The runs overlapped: one met the other's lease at send time (LEASED), or already at its
    # preview, which holds a merchant another live run is sending for (MERCHANT_LEASED).
    held = [err for _, err in outputs if "(MERCHANT_LEASED)" in err]
    assert leased or held, "the two runs did not overlap"
    assert all("since" in r["detail"] and "pid" in r["detail"] for r in leased)
