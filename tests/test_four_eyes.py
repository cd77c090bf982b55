"""Four-eyes approval above a threshold (issue 14, point 4), on SQLite.

A batch of more than RECON_FOUR_EYES_ORDERS orders (here 5; default 200) or more than
RECON_FOUR_EYES_AMOUNT in any one currency (default 10,000.00) runs only once an operator other
than its preparer approved exactly that set, within RECON_APPROVAL_TTL_MINUTES (default 30).
The engine refuses it otherwise (services/completion/approvals.py, `Approvals.gate`), and
each order still gets the usual last look. Completed orders are judged against the emulator's
own order JSON with the independent oracle (tests/oracle)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Static

from console.safe_text import SafeText
from console.screens.approvals import ApprovalDecision, ApprovalsScreen
from console.screens.confirm import ConfirmScreen
from console.screens.progress import ProgressScreen
from console.screens.queue import QueueScreen
from services.completion import Outcome
from services.completion.approvals import FourEyesPolicy
from services.demo import consent_for, workspace_on_emulator
from services.errors import ApprovalRefused
from services.settings import ReconSettings
from services.square_gateway import RetryPolicy
from services.store import utc_text
from services.workspace import Preview, Workspace
from tests.conftest import Emulator, LoopbackServer
from tests.console_harness import (
    DISMISS,
    app_for,
    demo,
    hostile_names,
    merchants_loaded,
    wait_until,
)
from tests.crash_harness import cli_workdir
from tests.oracle import eligibility as oracle

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.1)
ENGINE = {"max_attempts": 3, "attempt_timeout_s": 2.0, "base_backoff_s": 0.01}


@pytest.fixture(autouse=True)
def four_eyes_over_five(monkeypatch: pytest.MonkeyPatch) -> None:
    """More than 5 orders needs a second operator here (conftest raises it for older tests);
    the amount and the expiry keep their defaults."""
    monkeypatch.setenv("RECON_FOUR_EYES_ORDERS", "5")
    monkeypatch.delenv("RECON_FOUR_EYES_AMOUNT")
    monkeypatch.delenv("RECON_APPROVAL_TTL_MINUTES", raising=False)


class Clock:
    """Injected into both operators' workspaces: expiry without sleeping."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Team:
    emulator: Emulator
    ana: Workspace       # prepares
    ben: Workspace       # approves
    clock: Clock
    documents: dict[str, list[dict[str, Any]]]

    def raw(self) -> dict[str, dict[str, Any]]:
        return {i: r.copy_doc() for i, r in self.emulator.square.orders.items()}

    def completed(self) -> set[str]:
        return {i for i, r in self.emulator.square.orders.items() if r.state == "COMPLETED"}

    def intents(self) -> int:
        # Every intent is written with its audit entry, in one transaction.
        return sum(1 for _ in self.ana.audit.entries(action="intent"))

    def actions(self) -> list[dict[str, Any]]:
        return list(self.ana.audit.entries())


@pytest.fixture(params=["sqlite", "postgres"])
async def team(emulator: Emulator, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Two operators on one database: a SQLite file, or a PostgreSQL database."""
    db: Path | str = tmp_path / "recon.db"
    if request.param == "postgres":
        db = request.getfixturevalue("pg_url")
    clock = Clock()
    documents = {m.merchant.id: [consent_for(m, clock.now)] for m in emulator.merchants}
    path = tmp_path / "consents.json"
    path.write_text(json.dumps([d for docs in documents.values() for d in docs]))
    workspaces = []
    for operator in ("ana", "ben"):
        workspace = workspace_on_emulator(emulator.app, emulator.merchants,
                                          db, operator, timeout_s=2.0,
                                          retry=FAST_RETRY, home=tmp_path)
        workspace.engine_options = dict(ENGINE)
        workspace.clock = clock
        workspaces.append(workspace)
    ana, ben = workspaces
    ana.import_consent_files([path])
    await ana.refresh()
    yield Team(emulator, ana, ben, clock, documents)
    for workspace in workspaces:
        await workspace.aclose()


def big(team: Team, merchant: int = 0, count: int = 8) -> Preview:
    preview = team.ana.preview([team.emulator.merchants[merchant].merchant.id],
                               max_orders=count)
    assert preview.count == count
    assert team.ana.needs_second_operator(preview) is not None
    return preview


async def refused(workspace: Workspace, preview: Preview, batch_id: str | None) -> str:
    with pytest.raises(ApprovalRefused) as caught:
        await workspace.complete(preview, batch_id=batch_id)
    return caught.value.code


# ---------------------------------------------------------------------- the threshold
def test_default_thresholds_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RECON_FOUR_EYES_ORDERS", "RECON_FOUR_EYES_AMOUNT"):
        monkeypatch.delenv(name, raising=False)
    settings = ReconSettings()
    assert (settings.four_eyes_orders, settings.four_eyes_amount,
            settings.approval_ttl_minutes) == (200, Decimal("10000.00"), 30.0)
    policy = FourEyesPolicy()
    assert policy.why_needed(200, {"USD": 1_000_000}) is None
    assert policy.why_needed(201, {}) is not None                      # more than 200 orders
    assert policy.why_needed(1, {"USD": 1_000_001}) is not None        # more than 10,000.00
    assert policy.why_needed(1, {"EUR": 10, "USD": 1_000_001}) is not None  # any currency
    assert policy.why_needed(1, {"JPY": 10_000}) is None               # JPY has no minor unit
    assert policy.why_needed(1, {"JPY": 10_001}) is not None
    assert policy.why_needed(1, {}, unpriced=1) is not None            # cannot be totalled
    monkeypatch.setenv("RECON_FOUR_EYES_AMOUNT", "250.50")
    monkeypatch.setenv("RECON_APPROVAL_TTL_MINUTES", "5")
    settings = ReconSettings()
    assert settings.four_eyes_amount == Decimal("250.50")
    assert settings.approval_ttl_minutes == 5


async def test_below_the_threshold_runs_without_an_approval(team: Team) -> None:
    preview = team.ana.preview([team.emulator.merchants[0].merchant.id], max_orders=2)
    assert preview.count == 2 and team.ana.needs_second_operator(preview) is None
    _, results = await team.ana.complete(preview)
    assert {r.outcome for r in results} == {Outcome.COMPLETED}
    assert {i.order_id for i in preview.items} <= team.completed()
    assert not team.ana.store.approvals()


async def test_an_amount_over_the_threshold_needs_approval(team: Team) -> None:
    preview = team.ana.preview([team.emulator.merchants[0].merchant.id], max_orders=2)
    team.ana.settings.four_eyes_amount = Decimal("0.01")
    assert team.ana.needs_second_operator(preview) is not None
    assert await refused(team.ana, preview, None) == "APPROVAL_MISSING"


# ---------------------------------------------------------------------- refusals
async def test_missing_approval_is_refused_and_nothing_is_sent(team: Team) -> None:
    preview = big(team)
    before = team.completed()
    assert await refused(team.ana, preview, None) == "APPROVAL_MISSING"
    approval = team.ana.prepare_batch(preview)
    assert await refused(team.ana, preview, approval.batch_id) == "APPROVAL_PENDING"
    assert team.completed() == before and team.intents() == 0
    refusals = [e for e in team.actions() if e["action"] == "batch_refused"]
    assert [e["detail"].split(":")[0] for e in refusals] == ["APPROVAL_MISSING",
                                                             "APPROVAL_PENDING"]


async def test_self_approval_is_refused(team: Team) -> None:
    preview = big(team)
    approval = team.ana.prepare_batch(preview)
    # The workspace will not take the preparer's own decision...
    with pytest.raises(ApprovalRefused) as caught:
        team.ana.decide_batch(approval.batch_id, True, "looks fine to me")
    assert caught.value.code == "APPROVAL_SELF_GIVEN"
    assert team.ana.store.approval(approval.batch_id).status == "pending"  # type: ignore[union-attr]
    # ...and the engine refuses one written around it, straight into the database.
    with team.ana.store.transaction():
        team.ana.store.decide_approval(approval.batch_id, "approved", "ana",
                                       utc_text(team.clock()), "me",
                                       utc_text(team.clock() + timedelta(minutes=30)))
    before = team.completed()
    assert await refused(team.ana, preview, approval.batch_id) == "APPROVAL_SELF_GIVEN"
    assert team.completed() == before and team.intents() == 0


async def test_expired_approval_is_refused(team: Team) -> None:
    first, second = big(team, 0), big(team, 1)
    batches = [team.ana.prepare_batch(p).batch_id for p in (first, second)]
    for batch_id in batches:
        team.ben.decide_batch(batch_id, True, "checked")
    team.clock.advance(minutes=29)          # within 30 minutes: runs
    _, results = await team.ana.complete(first, batch_id=batches[0])
    assert {r.outcome for r in results} == {Outcome.COMPLETED}
    team.clock.advance(minutes=1, seconds=1)  # 30 minutes and a second after the approval
    before = team.completed()
    assert await refused(team.ana, second, batches[1]) == "APPROVAL_EXPIRED"
    assert team.completed() == before


async def test_expiry_is_configurable(team: Team) -> None:
    team.ben.settings.approval_ttl_minutes = 90
    preview = big(team)
    batch_id = team.ana.prepare_batch(preview).batch_id
    team.ben.decide_batch(batch_id, True, "checked")
    team.clock.advance(minutes=60)
    _, results = await team.ana.complete(preview, batch_id=batch_id)
    assert {r.outcome for r in results} == {Outcome.COMPLETED}


async def test_an_approval_of_another_set_is_refused(team: Team) -> None:
    preview = big(team)
    batch_id = team.ana.prepare_batch(preview).batch_id
    team.ben.decide_batch(batch_id, True, "checked")
    before = team.completed()
    # The set changed after the approval: one order fewer, or one more.
    fewer = team.ana.preview_of(preview.items[:-1])
    assert await refused(team.ana, fewer, batch_id) == "APPROVAL_OTHER_SET"
    more = team.ana.preview([team.emulator.merchants[0].merchant.id], max_orders=9)
    assert await refused(team.ana, more, batch_id) == "APPROVAL_OTHER_SET"
    assert team.completed() == before and team.intents() == 0
    # The approved set itself still runs (the refusals did not use the approval up).
    _, results = await team.ana.complete(preview, batch_id=batch_id)
    assert {r.outcome for r in results} == {Outcome.COMPLETED}


async def test_a_rejected_or_used_approval_does_not_run(team: Team) -> None:
    rejected = big(team, 0)
    batch_id = team.ana.prepare_batch(rejected).batch_id
    team.ben.decide_batch(batch_id, False, "totals look wrong")
    assert await refused(team.ana, rejected, batch_id) == "APPROVAL_REJECTED"
    with pytest.raises(ApprovalRefused) as caught:
        team.ben.decide_batch(batch_id, True, "changed my mind")
    assert caught.value.code == "APPROVAL_DECIDED"


# ---------------------------------------------------------------------- audit and success
async def test_approve_and_reject_are_audit_entries(team: Team) -> None:
    approved = team.ana.prepare_batch(big(team, 0))
    rejected = team.ana.prepare_batch(big(team, 1))
    team.ben.decide_batch(approved.batch_id, True, "totals match the tickets")
    team.ben.decide_batch(rejected.batch_id, False, "wrong merchant")
    entries = {(e["action"], e["batch_id"]): e for e in team.actions()}
    requested = entries["approval_requested", approved.batch_id]
    assert requested["operator"] == "ana"
    granted = entries["approval_granted", approved.batch_id]
    assert granted["operator"] == "ben" and granted["outcome"] == "approved"
    assert granted["approved_set_sha256"] == approved.approved_set_sha256
    assert "totals match the tickets" in granted["detail"] and "expires" in granted["detail"]
    denied = entries["approval_rejected", rejected.batch_id]
    assert denied["operator"] == "ben" and denied["outcome"] == "rejected"
    assert denied["approved_set_sha256"] == rejected.approved_set_sha256
    assert "wrong merchant" in denied["detail"]
    assert team.ana.verify().ok


async def test_a_second_operators_approval_then_complete_succeeds(team: Team) -> None:
    preview = big(team, 0, 8)
    before = team.raw()
    returned = oracle.returned_order_ids(before.values())
    merchant_of = {i: r.merchant_id for i, r in team.emulator.square.orders.items()}
    verdicts = {i: oracle.judge(doc, team.documents.get(merchant_of[i], []), team.clock(),
                                returned) for i, doc in before.items()}
    batch_id = team.ana.prepare_batch(preview).batch_id
    approval = team.ben.decide_batch(batch_id, True, "checked")
    assert approval.decided_by == "ben" and approval.status == "approved"
    # The preparer runs exactly the stored set, with the totals the approver saw.
    _, prepared = team.ana.prepared_batch(batch_id)
    assert prepared.items == sorted(preview.items) and prepared.totals == preview.totals
    ran, results = await team.ana.complete(prepared, batch_id=batch_id)
    assert ran == batch_id
    after = team.raw()
    newly = {i for i, doc in after.items()
             if doc["state"] == "COMPLETED" and before[i]["state"] != "COMPLETED"}
    assert newly == {i.order_id for i in preview.items}
    for order_id in newly:
        assert verdicts[order_id].eligible, (order_id, sorted(verdicts[order_id].reasons))
        assert after[order_id]["version"] == before[order_id]["version"] + 1
    assert {r.order_id for r in results if r.outcome is Outcome.COMPLETED} == newly
    assert team.ana.store.approval(batch_id).status == "used"  # type: ignore[union-attr]
    # An approval is good for one run.
    assert await refused(team.ana, prepared, batch_id) == "APPROVAL_USED"
    assert team.ana.verify().ok


async def test_an_approved_batch_still_gets_the_last_look(team: Team) -> None:
    """Approval does not replace the per-order checks: a consent revoked after the
    approval stops that merchant's orders."""
    merchants = [m.merchant.id for m in team.emulator.merchants[:2]]
    preview = team.ana.preview(merchants, max_orders=60)
    assert {i.merchant_id for i in preview.items} == set(merchants)
    batch_id = team.ana.prepare_batch(preview).batch_id
    team.ben.decide_batch(batch_id, True, "checked")
    team.ana.revoke_all_for_merchant(merchants[1], "Store owner", "in-house again")
    _, results = await team.ana.complete(preview, batch_id=batch_id)
    revoked = [r for r in results if r.merchant_id == merchants[1]]
    assert revoked and {r.reason for r in revoked} == {"CONSENT_REVOKED"}
    assert {r.outcome for r in results if r.merchant_id == merchants[0]} == {
        Outcome.COMPLETED}
    assert not {r.order_id for r in revoked} & team.completed()


# ---------------------------------------------------------------------- real processes
@pytest.fixture
def cli_env(loopback: LoopbackServer, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = cli_workdir(loopback.emulator, tmp_path, loopback.base_url)
    env.update(RECON_FOUR_EYES_ORDERS="5", RECON_CHECKPOINT_DIR=str(tmp_path / "checkpoints"))
    env.pop("RECON_FOUR_EYES_AMOUNT", None)
    yield env


def cli(env: dict[str, str], operator: str, *args: str) -> tuple[int, Any, str]:
    done = subprocess.run([sys.executable, "-m", "console.cli", *args], cwd=ROOT,
                          env=dict(env, RECON_OPERATOR=operator), capture_output=True,
                          text=True, timeout=120)
    document = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
    return done.returncode, document, done.stderr


def test_two_operators_in_real_processes(cli_env: dict[str, str],
                                         loopback: LoopbackServer) -> None:
    emulator = loopback.emulator
    merchant = emulator.merchants[0].merchant.id

    def completed() -> set[str]:
        return {i for i, r in emulator.square.orders.items() if r.state == "COMPLETED"}

    before = completed()
    code, document, stderr = cli(cli_env, "ana", "complete", "--merchant", merchant,
                                 "--max-orders", "8", "--yes", "--json")
    assert code == 3, stderr
    batch_id = document["batch_id"]
    assert document["approval"]["status"] == "pending" and document["results"] == []
    assert document["approval"]["approved_set_sha256"] == document["approved_set_sha256"]
    assert f"recon-console approve {batch_id}" in stderr

    code, document, stderr = cli(cli_env, "ana", "approve", batch_id, "--yes", "--json")
    assert code == 3 and document["refused"]["reason"] == "APPROVAL_SELF_GIVEN", stderr
    code, document, _ = cli(cli_env, "ana", "complete", "--batch", batch_id, "--yes", "--json")
    assert code == 3 and document["refused"]["reason"] == "APPROVAL_PENDING"
    assert completed() == before  # nothing was sent yet

    code, document, _ = cli(cli_env, "ben", "approve", "--json")
    assert code == 0 and [b["batch_id"] for b in document["batches"]] == [batch_id]
    assert document["batches"][0]["merchants"][0]["totals"][0].keys() == {"amount",
                                                                           "currency"}
    code, _, stderr = cli(cli_env, "ben", "approve", batch_id, "--reject")
    assert code == 2 and "--reason" in stderr
    code, _, stderr = cli(cli_env, "ben", "approve", "no-such-batch", "--yes")
    assert code == 2 and "Unknown batch" in stderr
    code, document, stderr = cli(cli_env, "ben", "approve", batch_id, "--yes", "--reason",
                                 "checked", "--json")
    assert code == 0, stderr
    assert document["status"] == "approved" and document["decided_by"] == "ben"
    approved = {(i["order_id"], i["version"]) for i in document["items"]}
    assert len(approved) == 8

    code, document, stderr = cli(cli_env, "ana", "complete", "--batch", batch_id, "--yes",
                                 "--json")
    assert code == 0, stderr
    assert document["batch_id"] == batch_id and document["summary"]["completed"] == 8
    assert {(r["order_id"], r["version"]) for r in document["results"]} == approved
    for order_id, _ in approved:
        assert emulator.square.orders[order_id].copy_doc()["state"] == "COMPLETED"
    code, document, _ = cli(cli_env, "ben", "complete", "--batch", batch_id, "--yes", "--json")
    assert code == 3 and document["refused"]["reason"] == "APPROVAL_USED"
    code, document, _ = cli(cli_env, "ben", "audit", "verify", "--json")
    assert code == 0 and document["ok"]


# ---------------------------------------------------------------------- the console
async def test_approvals_screen_shows_hostile_names_literally_and_approves(
        tmp_path: Path) -> None:
    environment = demo(tmp_path)
    names = hostile_names(environment)
    workspace = environment.workspace
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app), timeout=60)
        merchant = environment.merchants[0].merchant.id
        preview = workspace.preview([merchant], max_orders=6)
        assert preview.count == 6 and workspace.needs_second_operator(preview)
        prepared = workspace.approvals.prepare("batch-ana-1", preview.items, "ana",
                                               preview.totals, "6 orders, more than 5")
        await pilot.press("P")
        await wait_until(pilot, lambda: isinstance(app.screen, ApprovalsScreen))
        screen = app.screen
        table = screen.query_one("#approvals", DataTable)
        await wait_until(pilot, lambda: table.row_count == 1)
        row = table.get_row_at(0)
        assert all(isinstance(cell, SafeText) for cell in row)
        assert names[0] == DISMISS and DISMISS in row[5].plain   # shown, not parsed
        detail = str(screen.query_one("#approval-text").render())
        assert DISMISS in detail and "6 orders" in detail
        await pilot.press("a")
        await wait_until(pilot, lambda: isinstance(app.screen, ApprovalDecision))
        await pilot.click("#approval-decision-batch")   # clicking the names approves nothing
        assert isinstance(app.screen, ApprovalDecision)
        await pilot.press("9", "enter")                   # a wrong count
        assert isinstance(app.screen, ApprovalDecision)
        assert "not 6" in str(app.screen.query_one("#approval-error").render())
        assert workspace.store.approval(prepared.batch_id).status == "pending"  # type: ignore[union-attr]
        await pilot.press("6", "enter")
        assert app.screen.query_one("#approval-reason", Input).has_focus
        await pilot.press(*"ok", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ApprovalsScreen))
        approval = workspace.store.approval(prepared.batch_id)
        assert approval is not None and approval.status == "approved"
        assert approval.decided_by == workspace.operator != "ana"
        assert any(e["action"] == "approval_granted" and e["batch_id"] == "batch-ana-1"
                   for e in workspace.audit.entries())
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen))
        progress = app.screen
        assert isinstance(progress, ProgressScreen)
        await wait_until(pilot, lambda: progress.finished)
        assert {r.outcome for r in progress.results} == {Outcome.COMPLETED}
        assert len(progress.results) == 6
        square = environment.emulator.square
        assert all(square.orders[i.order_id].state == "COMPLETED" for i in preview.items)


async def test_the_console_prepares_a_large_batch_instead_of_sending_it(
        tmp_path: Path) -> None:
    environment = demo(tmp_path)
    workspace = environment.workspace
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app), timeout=60)
        before = {i for i, r in environment.emulator.square.orders.items()
                  if r.state == "COMPLETED"}
        await pilot.press("Q")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        await pilot.press("a", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen)
        # Said before the count is typed: confirming only prepares the batch.
        said = " ".join(" ".join(str(confirm.query_one(part, Static).render()).split())
                        for part in ("#confirm-text", "#confirm-hint"))
        assert said.startswith(f"Prepare {confirm.preview.count:,} orders for a second operator?")
        assert "needs a second operator" in said and "nothing is sent now" in said
        assert "press Enter to prepare it" in said
        await pilot.press(*str(confirm.preview.count), "enter")
        await wait_until(pilot, lambda: bool(workspace.store.approvals()))
        [approval] = workspace.store.approvals()
        assert approval.status == "pending" and approval.prepared_by == workspace.operator
        assert approval.approved_set_sha256 == confirm.preview.sha256
        assert not isinstance(app.screen, ProgressScreen)
        after = {i for i, r in environment.emulator.square.orders.items()
                 if r.state == "COMPLETED"}
        assert after == before  # nothing was sent
