"""Crash trials: `recon-console complete` in a subprocess against the loopback emulator, killed
with SIGKILL in the MIDDLE of its batch, then `recover`, then the invariants.

A kill counts as mid-batch only if, read right before the signal with a separate sqlite
connection, at least one intent row was committed and the batch was not finished, the process
had not exited (`poll() is None`), and `wait()` then says SIGKILL ended it (-9). A trial where
any of that did not hold is reported as such (`mid_batch` False, `why_not`): callers retry it
with another seed and count it apart, never as a pass.

The kill moment varies within the batch: as soon as the first intent is durable, once a
random fraction of the intents is settled, or a random delay after the first intent.

The invariants are judged from the emulator's raw order JSON (before and after) and the
independent oracle (tests/oracle), never the product's own `classify`:
  - every order COMPLETED in Square by the run was in an approved set (whose digest the
    audit's approval entry carries), at the approved version, and is now at version + 1;
  - it was eligible by the oracle at approval time (raw order JSON, raw consent documents);
  - it has exactly one `completed` intent and exactly one `completed` audit outcome, and no
    order has a `completed` outcome that Square does not show completed by the run;
  - no intent stays open after recover;
  - the chain verifies against a signed checkpoint that covers all of it.

Used by tests/test_crash_recovery.py (a few dozen kills) and bench/crash_trials.py (1,000)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.completion import ApprovedItem, approved_set_sha256
from services.credentials import load_credentials
from services.demo import consent_for, write_demo_files
from services.emulator import FaultPlan, SeedConfig
from services.settings import ReconSettings
from services.square_gateway import RetryPolicy
from services.workspace import Workspace
from tests.conftest import Emulator, LoopbackServer, make_emulator
from tests.oracle import eligibility as oracle

ROOT = Path(__file__).resolve().parents[1]
CLI_ARGS = ["complete", "--all-merchants", "--yes", "--json"]
KILL_MODES = ("first-intent", "settled-fraction", "delay")

def wait_idle(server: LoopbackServer, timeout: float = 30.0) -> None:
    """Until the emulator has no connection and no request task left: a killed client's last
    requests are still handled (as Square would), so the state is read only after them."""
    state = server.server.server_state
    deadline = time.monotonic() + timeout
    while state.connections or state.tasks:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(state.tasks)} emulator requests still running")
        time.sleep(0.005)


class Child:
    """The `complete` process, with Popen's poll/kill/wait. Most trials fork it from a fork
    server that has the console imported (tests/crash_child.py); every fifth is a plain
    `python -m console.cli` subprocess, so the real entry point is killed too."""

    _context: Any = None

    def __init__(self, env: dict[str, str], exec_cli: bool) -> None:
        self.popen: subprocess.Popen[bytes] | None = None
        self.process: Any = None
        if exec_cli:
            self.popen = subprocess.Popen([sys.executable, "-m", "console.cli", *CLI_ARGS],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            return
        if Child._context is None:
            Child._context = multiprocessing.get_context("forkserver")
            Child._context.set_forkserver_preload(["tests.crash_child"])
        from tests.crash_child import run_cli
        self.process = Child._context.Process(target=run_cli, args=(env, CLI_ARGS))
        self.process.start()

    def poll(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if self.process.is_alive() else self.process.exitcode

    def kill(self) -> None:
        if self.popen is not None:
            self.popen.kill()
        else:
            self.process.kill()

    def wait(self) -> int | None:
        if self.popen is not None:
            return self.popen.wait()
        self.process.join()
        return self.process.exitcode


@dataclass(frozen=True)
class DbState:
    """What a separate connection reads from the trial's database."""

    intents: int = 0
    open: int = 0
    settled: int = 0
    batch_running: bool = False


def read_state(db: Path) -> DbState:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return DbState()
    try:
        intents, open_ = conn.execute(
            "SELECT COUNT(*), COUNT(*) - COUNT(outcome) FROM intents").fetchone()
        running = conn.execute("SELECT COUNT(*) FROM batches WHERE finished_at IS NULL"
                               ).fetchone()[0]
        return DbState(intents, open_, intents - open_, bool(running))
    except sqlite3.Error:
        return DbState()  # not migrated yet, or busy
    finally:
        conn.close()


@dataclass(frozen=True)
class KillPlan:
    mode: str
    fraction: float
    delay_s: float
    jitter_s: float

    @classmethod
    def draw(cls, rng: random.Random) -> KillPlan:
        return cls(rng.choices(KILL_MODES, [1, 2, 1])[0], rng.uniform(0.05, 0.9),
                   rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.01))


def wait_for_kill_moment(db: Path, process: Child, plan: KillPlan,
                         timeout: float = 60.0) -> bool:
    """Wait (on the database, never a fixed sleep) for the plan's moment inside the batch.
    False if the process exited (or the time ran out) first."""
    deadline = time.monotonic() + timeout
    first: float | None = None
    while time.monotonic() < deadline and process.poll() is None:
        state = read_state(db)
        if state.intents:
            first = first or time.monotonic()
            if plan.mode == "first-intent":
                break
            if plan.mode == "settled-fraction" and (
                    state.settled >= max(1, int(plan.fraction * state.intents))
                    or not state.open):
                break
            if plan.mode == "delay" and time.monotonic() - first >= plan.delay_s:
                break
        time.sleep(0.003)
    else:
        return False
    time.sleep(plan.jitter_s)
    return True


@dataclass
class TrialResult:
    seed: int
    kill_mode: str
    mid_batch: bool
    why_not: str | None
    exit_code: int | None
    intents_at_kill: int
    open_at_kill: int
    approved: int
    completed_before_recover: int   # COMPLETED in Square when the process died
    recorded_before_recover: int    # of those, with a durable `completed` outcome
    settled_by_recover: int         # intents recover gave an outcome
    completed: int                  # COMPLETED in Square by the run, in the end
    seconds: float
    violations: list[str] = field(default_factory=list)


def consent_documents(emulator: Emulator, seed: int, now: datetime) -> list[dict[str, Any]]:
    """One merchant's consent covers only its first location in odd seeds, so the oracle's
    scope rule decides something."""
    documents = []
    for index, merchant in enumerate(emulator.merchants):
        locations: str | list[str] = "ALL"
        if index == 1 and seed % 2:
            locations = [merchant.locations[0].id]
        documents.append(consent_for(merchant, now, locations=locations))
    return documents


def raw_orders(emulator: Emulator) -> dict[str, dict[str, Any]]:
    return {order_id: record.copy_doc() for order_id, record in emulator.square.orders.items()}


def run_trial(seed: int, workdir: Path | None = None, plan: KillPlan | None = None
              ) -> TrialResult:
    """One trial; `plan` overrides the seed's kill moment (the seed still draws one). Without
    a `workdir`, one in the temporary directory, deleted afterwards unless the trial broke an
    invariant or raised (its database is then the evidence); every suite run left ~45 MB."""
    if workdir is not None:
        return _trial(seed, workdir, plan)
    own = Path(tempfile.mkdtemp(prefix="crash-"))
    result = None
    try:
        result = _trial(seed, own, plan)
        return result
    finally:
        if result is not None and not result.violations:
            shutil.rmtree(own, ignore_errors=True)


def _trial(seed: int, workdir: Path, plan: KillPlan | None) -> TrialResult:
    began = time.monotonic()
    rng = random.Random(seed)
    plan = KillPlan.draw(rng) if plan is None else (KillPlan.draw(rng), plan)[1]
    latency = rng.choice([15.0, 25.0, 40.0])
    # Some trials lose answers to UpdateOrder: resends under the same key, uncertain outcomes.
    lost = rng.choice([0.0, 0.0, 0.1])
    emulator = make_emulator(SeedConfig(seed=seed, merchants=2, orders_per_location=40),
                             FaultPlan(latency_ms=latency, jitter_ms=latency,
                                       lost_response_rate=lost, operations=["UpdateOrder"],
                                       seed=seed))
    write_demo_files(workdir, emulator.merchants)
    documents = consent_documents(emulator, seed, datetime.now(UTC))
    consents = workdir / "consents.json"
    consents.write_text(json.dumps(documents))
    db = workdir / "recon.db"
    with LoopbackServer(emulator) as server:
        env = dict(os.environ, RECON_DB=str(db), RECON_SQUARE_BASE_URL=server.base_url,
                   RECON_CREDENTIALS=str(workdir / "credentials.toml"), RECON_OPERATOR="crash")
        settings = ReconSettings(db=db, square_base_url=server.base_url,
                                 credentials=workdir / "credentials.toml", operator="crash")
        workspace = Workspace.open(settings, retry=RetryPolicy(attempts=4, base_delay_s=0.01))
        try:
            workspace.import_consent_files([consents])
            before = raw_orders(emulator)
            process = Child(env, exec_cli=seed % 5 == 0)
            try:
                reached = wait_for_kill_moment(db, process, plan)
                # Right before the signal: what is durable, and is the process still there?
                at_kill = read_state(db)
                alive = process.poll() is None
                process.kill()
                exit_code = process.wait()
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            why_not = None
            if not reached or not alive:
                why_not = "the process had exited before the kill"
            elif exit_code != -9:
                why_not = f"the process exited with {exit_code}, not by SIGKILL"
            elif not at_kill.intents:
                why_not = "no intent was durable at the kill"
            elif not at_kill.batch_running:
                why_not = "the batch had finished before the kill"
            wait_idle(server)  # the dead client's last requests, as Square would apply them
            at_death = raw_orders(emulator)
            completed_before = newly_completed(before, at_death)
            recorded_before = _completed_intents(db)
            open_before = workspace.store.open_intent_count()
            # Recover once Square answers again (a lost answer would rightly leave it open).
            emulator.app.set_faults(FaultPlan())
            asyncio.run(_recover(workspace))
            wait_idle(server)
            settled = open_before - workspace.store.open_intent_count()
            after = raw_orders(emulator)
            violations = check_invariants(workspace, emulator, documents, before, after)
            violations += [f"emulator internal error: {e.splitlines()[0]}"
                           for e in emulator.app.internal_errors]
            approved = _approved(workspace)
        finally:
            workspace.store.close()
    return TrialResult(seed, plan.mode, why_not is None, why_not, exit_code, at_kill.intents,
                       at_kill.open, len(approved), len(completed_before),
                       len(recorded_before & completed_before), settled,
                       len(newly_completed(before, after)), time.monotonic() - began,
                       violations)


def run_mid_batch_trial(seed: int, attempts: int = 4, stride: int = 100_003
                        ) -> tuple[TrialResult, list[TrialResult]]:
    """Trials from `seed` on (then seed + stride, ...) until one kill is mid-batch. Returns it
    and the trials that were not (retried, to be counted apart). The last result may still not
    be mid-batch if every attempt missed: callers must check."""
    retried: list[TrialResult] = []
    for n in range(attempts):
        result = run_trial(seed + n * stride)
        if result.mid_batch:
            return result, retried
        retried.append(result)
    return retried[-1], retried[:-1]


def _completed_intents(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {row[0] for row in conn.execute(
            "SELECT order_id FROM intents WHERE outcome = 'completed'")}
    finally:
        conn.close()


async def _recover(workspace: Workspace) -> int:
    workspace._credentials = load_credentials(workspace.settings.credentials)
    try:
        return len(await workspace.recover())
    finally:
        await workspace.gateway.aclose()


def newly_completed(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
                    ) -> set[str]:
    return {i for i, doc in after.items()
            if doc.get("state") == "COMPLETED" and before[i].get("state") != "COMPLETED"}


def _approved(workspace: Workspace) -> dict[str, tuple[ApprovedItem, str]]:
    """order id -> (approved item, the batch's approval time), from every batch."""
    approved: dict[str, tuple[ApprovedItem, str]] = {}
    for row in workspace.store.db["batches"].rows:
        for merchant_id, order_id, version in json.loads(row["approved_json"]):
            approved[order_id] = (ApprovedItem(merchant_id, order_id, version),
                                  row["created_at"])
    return approved


def check_invariants(workspace: Workspace, emulator: Emulator,
                     documents: list[dict[str, Any]], before: dict[str, dict[str, Any]],
                     after: dict[str, dict[str, Any]]) -> list[str]:
    """Every broken invariant, in words (empty: all hold)."""
    broken: list[str] = []
    store = workspace.store
    approvals = {e["batch_id"]: e["approved_set_sha256"]
                 for e in workspace.audit.entries(action="approval")}
    for row in store.db["batches"].rows:
        items = [ApprovedItem(*i) for i in json.loads(row["approved_json"])]
        if approvals.get(row["batch_id"]) != approved_set_sha256(items) or \
                row["approved_set_sha256"] != approved_set_sha256(items):
            broken.append(f"batch {row['batch_id']}: approved set does not match its audit "
                          "approval digest")
    approved = _approved(workspace)
    merchant_of = {i: r.merchant_id for i, r in emulator.square.orders.items()}
    consents_of: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        consents_of.setdefault(document["merchant_id"], []).append(document)
    returned = oracle.returned_order_ids(before.values())
    intents: dict[str, list[dict[str, Any]]] = {}
    for row in store.db["intents"].rows:
        intents.setdefault(row["order_id"], []).append(row)
    audit_completed = Counter(e["order_id"] for e in workspace.audit.entries(outcome="completed"))
    newly = newly_completed(before, after)
    for order_id in sorted(newly):
        if order_id not in approved:
            broken.append(f"{order_id} COMPLETED in Square outside any approved set")
            continue
        item, approved_at = approved[order_id]
        if before[order_id].get("version") != item.version:
            broken.append(f"{order_id} approved at version {item.version}, was "
                          f"{before[order_id].get('version')}")
        if after[order_id].get("version") != item.version + 1:
            broken.append(f"{order_id} completed at version {after[order_id].get('version')}, "
                          f"approved {item.version}: more than one update applied")
        verdict = oracle.judge(before[order_id], consents_of.get(merchant_of[order_id], []),
                               datetime.fromisoformat(approved_at.replace("Z", "+00:00")),
                               returned)
        if not verdict.eligible:
            broken.append(f"{order_id} completed but not eligible by the oracle at approval: "
                          f"{sorted(verdict.reasons)}")
        outcomes = [row["outcome"] for row in intents.get(order_id, [])]
        if outcomes.count("completed") != 1:
            broken.append(f"{order_id} COMPLETED in Square with intents {outcomes}")
        if audit_completed[order_id] != 1:
            broken.append(f"{order_id} COMPLETED in Square with {audit_completed[order_id]} "
                          "completed audit outcomes")
    for order_id in sorted(set(audit_completed) - newly):
        broken.append(f"{order_id} recorded completed but Square does not show it completed "
                      "by the run")
    open_after = store.open_intent_count()
    if open_after:
        broken.append(f"{open_after} intent(s) still open after recover")
    report = workspace.verify()
    if not report.ok:
        broken.append(f"audit chain: {report.sentence()}")
    elif report.checkpoint is None or report.checkpoint["size"] != report.entries:
        broken.append(f"audit chain of {report.entries} entries not anchored by a signed "
                      f"checkpoint covering it: {report.against()}")
    return broken


def cli_workdir(emulator: object, workdir: Path, base_url: str) -> dict[str, str]:
    """A credentials file (0600), consents imported for every seeded merchant, and the
    environment for `recon-console` processes on that database and emulator."""
    merchants = emulator.merchants  # type: ignore[attr-defined]
    write_demo_files(workdir, merchants)
    consents = workdir / "consents.json"
    consents.write_text(json.dumps([consent_for(m, datetime.now(UTC)) for m in merchants]))
    settings = ReconSettings(db=workdir / "recon.db", square_base_url=base_url,
                             credentials=workdir / "credentials.toml", operator="setup")
    workspace = Workspace.open(settings)
    workspace.import_consent_files([consents])
    workspace.store.close()
    return dict(os.environ, RECON_DB=str(workdir / "recon.db"), RECON_SQUARE_BASE_URL=base_url,
                RECON_CREDENTIALS=str(workdir / "credentials.toml"), RECON_OPERATOR="cli",
                RECON_READ_RETRIES="1")


def start_cli(env: dict[str, str], *args: str, operator: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "console.cli", *args], cwd=ROOT,
                            env=dict(env, RECON_OPERATOR=operator), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
