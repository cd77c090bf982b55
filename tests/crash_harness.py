"""Kill `recon-console complete` with SIGKILL at a random moment, then recover, then check the
invariants. Used by tests/test_crash_recovery.py (a few dozen trials) and bench/crash_trials.py
(hundreds)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.completion import ApprovedItem
from services.credentials import load_credentials
from services.demo import consent_for, write_demo_files
from services.emulator import FaultPlan, SeedConfig
from services.settings import ReconSettings
from services.square_gateway import RetryPolicy
from services.workspace import Workspace
from tests.conftest import LoopbackServer, make_emulator

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrialResult:
    killed_after_s: float
    exit_code: int | None
    approved: int
    completed_before_recover: int
    recovered: int
    completed: int


def _versions(square: object) -> dict[str, tuple[str, int | None]]:
    return {r.id: (r.state, r.version) for r in square.orders.values()}  # type: ignore[attr-defined]


def run_trial(seed: int, workdir: Path | None = None) -> TrialResult:
    rng = random.Random(seed)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="crash-"))
    emulator = make_emulator(SeedConfig(seed=seed, merchants=2, orders_per_location=40),
                             FaultPlan(latency_ms=10, jitter_ms=10, seed=seed))
    write_demo_files(workdir, emulator.merchants)
    consents = workdir / "consents.json"
    now = datetime.now(UTC)
    consents.write_text(json.dumps([consent_for(m, now) for m in emulator.merchants]))
    with LoopbackServer(emulator) as server:
        env = dict(os.environ, RECON_DB=str(workdir / "recon.db"),
                   RECON_SQUARE_BASE_URL=server.base_url,
                   RECON_CREDENTIALS=str(workdir / "credentials.toml"), RECON_OPERATOR="crash")
        settings = ReconSettings(db=workdir / "recon.db", square_base_url=server.base_url,
                                 credentials=workdir / "credentials.toml", operator="crash")
        workspace = Workspace.open(settings, retry=RetryPolicy(attempts=4, base_delay_s=0.01))
        workspace.import_consent_files([consents])
        before = _versions(emulator.square)
        process = subprocess.Popen(
            [sys.executable, "-m", "console.cli", "complete", "--all-merchants", "--yes",
             "--json"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        if rng.random() < 0.25:
            # Any moment at all: start-up, discovery, the batch, or after it.
            delay = rng.uniform(0.2, 2.5)
            time.sleep(delay)
        else:
            # A moment inside the batch: once the first intent is durable.
            began = time.monotonic()
            _wait_for_first_intent(workdir / "recon.db", process)
            time.sleep(rng.uniform(0.0, 0.6))
            delay = time.monotonic() - began
        process.send_signal(signal.SIGKILL)
        exit_code = process.wait()
        completed_before = sum(1 for i, (s, _) in _versions(emulator.square).items()
                               if s == "COMPLETED" and before[i][0] != "COMPLETED")
        recovered = asyncio.run(_recover(workspace))
        result = check_invariants(workspace, before, _versions(emulator.square))
        workspace.store.close()
    return TrialResult(delay, exit_code, result[0], completed_before, recovered, result[1])


def _wait_for_first_intent(db: Path, process: subprocess.Popen[bytes],
                           timeout: float = 20.0) -> None:
    import sqlite3
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                if conn.execute("SELECT COUNT(*) FROM intents").fetchone()[0]:
                    return
        except sqlite3.Error:
            pass  # not created yet, or busy
        time.sleep(0.005)


async def _recover(workspace: Workspace) -> int:
    workspace._credentials = load_credentials(workspace.settings.credentials)
    try:
        return len(await workspace.recover())
    finally:
        await workspace.gateway.aclose()


def check_invariants(workspace: Workspace, before: dict[str, tuple[str, int | None]],
                     after: dict[str, tuple[str, int | None]]) -> tuple[int, int]:
    approved: dict[str, ApprovedItem] = {}
    for row in workspace.store.db["batches"].rows:
        for merchant_id, order_id, version in json.loads(row["approved_json"]):
            approved[order_id] = ApprovedItem(merchant_id, order_id, version)
    # Every attempt is its own row: an order completed in Square has exactly one completed one.
    intents: dict[str, list[dict[str, object]]] = {}
    for row in workspace.store.db["intents"].rows:
        intents.setdefault(row["order_id"], []).append(row)
    newly = {i for i, (s, _) in after.items() if s == "COMPLETED" and before[i][0] != "COMPLETED"}
    for order_id in newly:
        assert order_id in approved, f"{order_id} completed outside any approved set"
        assert before[order_id][1] == approved[order_id].version
        assert after[order_id][1] == approved[order_id].version + 1  # type: ignore[operator]
        assert order_id in intents, f"{order_id} completed without an intent"
        outcomes = [row["outcome"] for row in intents[order_id]]
        assert outcomes.count("completed") == 1, outcomes
    assert workspace.open_intent_count() == 0, "an intent stayed open after recover"
    for order_id, rows in intents.items():
        if any(row["outcome"] == "completed" for row in rows):
            assert order_id in newly
    report = workspace.verify()
    assert report.ok, report.sentence()
    return len(approved), len(newly)


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
