"""The completion engine against the emulator, with every fault mode: afterwards every order the
emulator shows COMPLETED by the batch has an intent and an outcome; nothing outside the approved
set or ineligible at send time was completed; each completed order's version rose by exactly
one; the audit chain verifies."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.completion import ApprovedItem, BatchProgress, Outcome, idempotency_key
from services.completion.journal import Run
from services.completion.model import Intent
from services.demo import consent_for, workspace_on_emulator
from services.emulator import FaultPlan, SeedConfig
from services.errors import SquareAuthError
from services.processes import HOST
from services.square_gateway import RetryPolicy
from services.square_models import SquareOrder
from services.store import Lease, utc_text
from services.workspace import Preview, Workspace
from tests.conftest import Emulator, make_emulator

FAST_RETRY = RetryPolicy(attempts=8, base_delay_s=0.01, max_delay_s=1.0)
# A generous per-call timeout: on a loaded machine a short one times out healthy calls, which
# (rightly) leaves intents open. Tests of hung calls shorten it.
ENGINE = {"max_attempts": 6, "attempt_timeout_s": 5.0, "base_backoff_s": 0.01,
          "max_rate_limit_waits": 40}


async def ready_workspace(emulator: Emulator, tmp_path: Path, merchants: int | None = None
                          ) -> Workspace:
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, tmp_path / "recon.db",
                                      "tester", timeout_s=2.0, retry=FAST_RETRY)
    workspace.engine_options = dict(ENGINE)
    now = datetime.now(UTC)
    chosen = emulator.merchants[:merchants] if merchants else emulator.merchants
    path = tmp_path / "consents.json"
    path.write_text(json.dumps([consent_for(m, now) for m in chosen]))
    workspace.import_consent_files([path])
    await workspace.refresh()
    return workspace


def versions(emulator: Emulator) -> dict[str, tuple[str, int | None]]:
    return {r.id: (r.state, r.version) for r in emulator.square.orders.values()}


def assert_invariants(emulator: Emulator, workspace: Workspace,
                      before: dict[str, tuple[str, int | None]],
                      approved: list[ApprovedItem], *, settled: bool = True) -> set[str]:
    """The invariants of the issue; returns the ids completed by the batch."""
    after = versions(emulator)
    newly = {i for i, (state, _) in after.items()
             if state == "COMPLETED" and before.get(i, ("?", None))[0] != "COMPLETED"}
    by_order = {a.order_id: a for a in approved}
    intents = {row["order_id"]: row for row in workspace.store.db["intents"].rows}
    for order_id in newly:
        assert order_id in by_order, f"{order_id} completed outside the approved set"
        item = by_order[order_id]
        assert before[order_id][1] == item.version, "completed at a version not approved"
        assert after[order_id][1] == item.version + 1, "version did not rise by exactly one"
        intent = intents.get(order_id)
        assert intent is not None, f"{order_id} completed without an intent"
        if settled:
            assert intent["outcome"] == "completed", (order_id, intent["outcome"])
    completed_rows = {o for o, row in intents.items() if row["outcome"] == "completed"}
    assert completed_rows <= newly, "an outcome says completed but Square disagrees"
    if settled:
        assert workspace.open_intent_count() == 0
    report = workspace.verify()
    assert report.ok, report.sentence()
    return newly


async def run_batch(emulator: Emulator, tmp_path: Path, plan: FaultPlan | None = None,
                    *, on_progress: Any = None, cancel: asyncio.Event | None = None,
                    merchants: int | None = None, options: dict[str, Any] | None = None
                    ) -> tuple[Workspace, list[Any], dict[str, Any], list[ApprovedItem]]:
    workspace = await ready_workspace(emulator, tmp_path, merchants)
    workspace.engine_options.update(options or {})
    preview = workspace.preview()
    assert preview.count > 10
    before = versions(emulator)
    if plan is not None:
        emulator.app.set_faults(plan)
    _, results = await workspace.complete(preview, cancel=cancel, on_progress=on_progress)
    emulator.app.set_faults(FaultPlan())
    return workspace, results, before, preview.items


async def test_clean_batch_completes_everything(emulator: Emulator, tmp_path: Path) -> None:
    workspace, results, before, approved = await run_batch(emulator, tmp_path)
    try:
        assert {r.outcome for r in results} == {Outcome.COMPLETED}
        assert len(results) == len(approved)
        newly = assert_invariants(emulator, workspace, before, approved)
        assert newly == {a.order_id for a in approved}
        actions = [e["action"] for e in workspace.audit.entries()]
        assert actions.count("intent") == actions.count("outcome") == len(approved)
        assert actions.index("approval") < actions.index("intent")
        # Every fulfillment moved to COMPLETED with the order.
        for item in approved:
            doc = emulator.square.orders[item.order_id].doc
            assert all(f["state"] == "COMPLETED" for f in doc.get("fulfillments", []))
        # Completed orders leave the queue.
        assert not {o.order_id for o in workspace.queue()} & newly
    finally:
        await workspace.aclose()


@pytest.mark.parametrize("plan", [
    FaultPlan(server_error_rate=0.3, operations=["UpdateOrder"], seed=11),
    FaultPlan(hang_rate=0.15, hang_seconds=2, operations=["UpdateOrder"], seed=12),
    FaultPlan(lost_response_rate=0.3, operations=["UpdateOrder"], seed=13),
    FaultPlan(lost_response_rate=0.2, lost_response_mode="hang", hang_seconds=2,
              operations=["UpdateOrder"], seed=14),
    FaultPlan(rate_limit_rps=8, seed=15),
    FaultPlan(version_bump_rate=0.3, operations=["BatchRetrieveOrders", "UpdateOrder"], seed=16),
], ids=["5xx", "hung", "lost-response", "lost-response-hang", "429-storm", "version-bumps"])
async def test_fault_modes_keep_the_invariants(emulator: Emulator, tmp_path: Path,
                                               plan: FaultPlan) -> None:
    workspace, results, before, approved = await run_batch(
        emulator, tmp_path, plan, options={"attempt_timeout_s": 0.5})
    try:
        assert len(results) == len(approved)
        await workspace.recover()
        newly = assert_invariants(emulator, workspace, before, approved)
        assert newly, "nothing got through"
        if plan.version_bump_rate:
            assert any(r.reason == "VERSION_CHANGED" for r in results)
    finally:
        await workspace.aclose()


async def test_a_200_that_changed_nothing_is_a_failure(emulator: Emulator,
                                                       tmp_path: Path) -> None:
    workspace, results, before, approved = await run_batch(
        emulator, tmp_path, FaultPlan(noop_update_rate=1.0), merchants=1)
    try:
        assert {r.outcome for r in results} == {Outcome.FAILED}
        assert {r.reason for r in results} == {"NOT_COMPLETED"}
        assert assert_invariants(emulator, workspace, before, approved) == set()
    finally:
        await workspace.aclose()


async def test_only_the_approved_versions_are_touched(emulator: Emulator,
                                                      tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path)
    try:
        preview = workspace.preview()
        changed = preview.items[0]
        emulator.square.touch(emulator.square.orders[changed.order_id])  # changed after preview
        approved = preview.items[1:6]
        before = versions(emulator)
        _, results = await workspace.engine().run([changed, *approved])
        by_id = {r.order_id: r for r in results}
        assert by_id[changed.order_id].reason == "VERSION_CHANGED"
        assert emulator.square.orders[changed.order_id].state == "OPEN"
        newly = assert_invariants(emulator, workspace, before, [changed, *approved])
        assert newly == {a.order_id for a in approved}
    finally:
        await workspace.aclose()


async def test_consent_revoked_mid_batch_stops_that_merchant_only(emulator: Emulator,
                                                                  tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path)
    target = emulator.merchants[0].merchant.id
    consent_id = workspace.consents_for(target)[0][0].consent_id
    revoked = asyncio.Event()

    def progress(event: BatchProgress) -> None:
        if event.completed >= 3 and not revoked.is_set():
            revoked.set()
            workspace.revoke_consent(consent_id, "Owner", "changed their mind")

    try:
        preview = workspace.preview()
        before = versions(emulator)
        emulator.app.set_faults(FaultPlan(latency_ms=2))
        _, results = await workspace.complete(preview, on_progress=progress)
        assert revoked.is_set()
        mine = [r for r in results if r.merchant_id == target]
        others = [r for r in results if r.merchant_id != target]
        assert any(r.reason == "CONSENT_REVOKED" for r in mine)
        assert all(r.outcome is Outcome.COMPLETED for r in others)
        newly = assert_invariants(emulator, workspace, before, preview.items)
        revoked_at = workspace.consents_for(target)[0][0].revocation.revoked_at  # type: ignore
        for order_id in newly:
            record = emulator.square.orders[order_id]
            if record.merchant_id == target:
                closed = datetime.fromisoformat(record.closed_at.replace("Z", "+00:00"))
                assert closed <= revoked_at + __import__("datetime").timedelta(seconds=1)
    finally:
        await workspace.aclose()


async def complete_while_another_revokes(emulator: Emulator, workspace: Workspace,
                                         other: Workspace
                                         ) -> tuple[Preview, dict[str, tuple[str, int | None]]]:
    """A whole batch, during which `other` (another console's connection) revokes the first
    merchant's consent after the third completion: that merchant is then skipped as
    CONSENT_REVOKED and nothing more of it is sent. (preview, versions before), for the
    caller's invariants (SQLite's and PostgreSQL's tests)."""
    target = emulator.merchants[0].merchant.id
    consent_id = workspace.consents_for(target)[0][0].consent_id
    revoked: list[float] = []
    sent_after: list[str] = []  # the target's UpdateOrders that left after the revocation
    update_order = workspace.gateway.update_order

    async def watched(creds: Any, order_id: str, body: dict[str, Any],
                      timeout_s: float | None = None) -> Any:
        if revoked and creds.merchant_id == target:
            sent_after.append(order_id)
        return await update_order(creds, order_id, body, timeout_s=timeout_s)

    workspace.gateway.update_order = watched  # type: ignore[method-assign]

    def progress(event: BatchProgress) -> None:
        if event.completed >= 3 and not revoked:
            other.revoke_consent(consent_id, "Owner", "changed their mind")  # committed
            revoked.append(time.monotonic())

    preview = workspace.preview()
    mine_approved = [i for i in preview.items if i.merchant_id == target]
    assert len(mine_approved) > 6
    before = versions(emulator)
    emulator.app.set_faults(FaultPlan(latency_ms=2))
    _, results = await workspace.complete(preview, on_progress=progress)
    assert revoked
    mine = [r for r in results if r.merchant_id == target]
    assert any(r.reason == "CONSENT_REVOKED" for r in mine)
    assert sum(r.outcome is Outcome.COMPLETED for r in mine) < len(mine_approved)
    assert sent_after == []
    return preview, before


async def test_consent_revoked_by_another_console_stops_the_next_send(
        emulator: Emulator, tmp_path: Path) -> None:
    """The revocation comes through another connection (another console, another process):
    this run's consents, read once per chunk of 100 before the intents, are read again at
    each send, so nothing of the merchant is sent after the revocation is committed."""
    workspace = await ready_workspace(emulator, tmp_path)
    other = workspace_on_emulator(emulator.app, emulator.merchants, tmp_path / "recon.db",
                                  "other-operator", timeout_s=2.0, retry=FAST_RETRY)
    try:
        preview, before = await complete_while_another_revokes(emulator, workspace, other)
        assert_invariants(emulator, workspace, before, preview.items)
    finally:
        await other.aclose()
        await workspace.aclose()


async def test_consent_narrowed_mid_batch_is_not_relied_on(emulator: Emulator,
                                                           tmp_path: Path) -> None:
    """A new version of the consent (here: no longer covering Square Online) stops the
    orders of that merchant not yet sent, as a revocation does."""
    workspace = await ready_workspace(emulator, tmp_path)
    target = emulator.merchants[0].merchant.id
    record = workspace.consents_for(target)[0][0]
    document = record.to_document()
    document["scope"] = {**document["scope"], "order_sources": ["Some Other Channel"]}
    narrowed = tmp_path / "narrowed.json"
    narrowed.write_text(json.dumps(document))
    done = asyncio.Event()

    def progress(event: BatchProgress) -> None:
        if event.completed >= 3 and not done.is_set():
            done.set()
            workspace.import_consent_files([narrowed])

    try:
        preview = workspace.preview()
        mine_approved = [i for i in preview.items if i.merchant_id == target]
        assert len(mine_approved) > 6
        emulator.app.set_faults(FaultPlan(latency_ms=2))
        _, results = await workspace.complete(preview, on_progress=progress)
        assert done.is_set()
        mine = [r for r in results if r.merchant_id == target]
        assert any(r.reason == "NO_LONGER_ELIGIBLE" for r in mine)
        assert sum(r.outcome is Outcome.COMPLETED for r in mine) < len(mine_approved)
    finally:
        await workspace.aclose()


async def test_token_revoked_mid_batch_skips_that_merchant(emulator: Emulator,
                                                           tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path)
    target = emulator.merchants[1]
    done = asyncio.Event()

    def progress(event: BatchProgress) -> None:
        if event.done >= 2 and not done.is_set():
            done.set()
            emulator.square.revoke_token(target.token.token)

    try:
        preview = workspace.preview()
        before = versions(emulator)
        _, results = await workspace.complete(preview, on_progress=progress)
        mine = [r for r in results if r.merchant_id == target.merchant.id]
        assert any(r.reason in ("TOKEN_REJECTED", "ACCESS_TOKEN_REVOKED") for r in mine)
        assert all(r.outcome is Outcome.COMPLETED for r in results
                   if r.merchant_id != target.merchant.id)
        await workspace.recover()
        assert_invariants(emulator, workspace, before, preview.items, settled=False)
    finally:
        await workspace.aclose()


async def test_cancel_stops_new_calls_and_records_in_flight(emulator: Emulator,
                                                            tmp_path: Path) -> None:
    cancel = asyncio.Event()

    def progress(event: BatchProgress) -> None:
        if event.done >= 4:
            cancel.set()

    workspace, results, before, approved = await run_batch(
        emulator, tmp_path, FaultPlan(latency_ms=5), on_progress=progress, cancel=cancel)
    try:
        completed = [r for r in results if r.outcome is Outcome.COMPLETED]
        cancelled = [r for r in results if r.reason == "CANCELLED"]
        assert completed and cancelled and len(results) == len(approved)
        newly = assert_invariants(emulator, workspace, before, approved)
        assert newly == {r.order_id for r in completed}
        assert "cancel" in [e["action"] for e in workspace.audit.entries()]
    finally:
        await workspace.aclose()


async def test_retry_only_the_failed(emulator: Emulator, tmp_path: Path) -> None:
    workspace, results, before, approved = await run_batch(
        emulator, tmp_path, FaultPlan(server_error_rate=1.0, operations=["UpdateOrder"]),
        merchants=1)
    try:
        await workspace.recover()  # settles the unknown ones against Square
        failed = [ApprovedItem(r.merchant_id, r.order_id, r.version) for r in results
                  if r.outcome is Outcome.FAILED]
        assert failed
        _, retried = await workspace.engine().run(failed)
        assert {r.outcome for r in retried} <= {Outcome.COMPLETED, Outcome.SKIPPED}
        assert_invariants(emulator, workspace, before, approved)
    finally:
        await workspace.aclose()


async def test_recover_settles_every_kind_of_open_intent(emulator: Emulator,
                                                         tmp_path: Path) -> None:
    """Intents left open as a crash leaves them: applied, not applied, changed since."""
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        preview = workspace.preview()
        items = preview.items[:3]
        engine = workspace.engine()
        run = Run("crash-batch", "sha", 3)
        intents = [engine._check(i, SquareOrder.model_validate(
            emulator.square.orders[i.order_id].copy_doc())) for i in items]
        assert all(isinstance(i, Intent) for i in intents)
        assert engine.journal.write_intents(run, intents)  # type: ignore[arg-type]
        applied, untouched, moved = items
        emulator.square.update_order(applied.merchant_id, applied.order_id,
                                     intents[0].body)  # type: ignore[union-attr]
        emulator.square.touch(emulator.square.orders[moved.order_id])
        assert workspace.open_intent_count() == 3
        results = {r.order_id: r for r in await workspace.recover()}
        assert results[applied.order_id].outcome is Outcome.COMPLETED
        assert results[untouched.order_id].outcome is Outcome.COMPLETED  # resent, same key
        assert results[moved.order_id].reason == "VERSION_CHANGED"
        assert workspace.open_intent_count() == 0
        assert emulator.square.orders[applied.order_id].version == applied.version + 1
        assert workspace.verify().ok
    finally:
        await workspace.aclose()


def test_idempotency_key_is_derived_and_bounded() -> None:
    assert idempotency_key("ORDER1", 3) == "recon-complete:ORDER1:3"
    assert idempotency_key("ORDER1", 3) == idempotency_key("ORDER1", 3)
    assert idempotency_key("ORDER1", 3) != idempotency_key("ORDER1", 4)
    assert len(idempotency_key("X" * 300, 1)) <= 192


async def test_many_merchants_small_world(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=6, orders_per_location=15))
    workspace, results, before, approved = await run_batch(emulator, tmp_path)
    try:
        assert {r.merchant_id for r in results} == {m.merchant.id for m in emulator.merchants}
        assert_invariants(emulator, workspace, before, approved)
    finally:
        await workspace.aclose()


# ---------------------------------------------------------------- issue 8, hole 4
async def test_hole4_a_failed_reread_skips_the_merchant_as_unreachable(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace, results, before, approved = await run_batch(
        emulator, tmp_path, FaultPlan(server_error_rate=1.0,
                                      operations=["BatchRetrieveOrders"]), merchants=1)
    try:
        assert len(results) == len(approved)
        assert {(r.outcome, r.reason) for r in results} == {
            (Outcome.SKIPPED, "SQUARE_UNREACHABLE")}, {r.reason for r in results}
        assert all("re-read" in r.detail for r in results)
        assert workspace.store.db["intents"].count == 0  # not attempted at all
        assert assert_invariants(emulator, workspace, before, approved) == set()
        assert len(workspace.queue(include_ineligible=False)) >= len(approved)  # still queued
    finally:
        await workspace.aclose()


async def test_hole4_consecutive_failures_stop_sending_to_the_merchant(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        preview = workspace.preview()
        assert preview.count > 20
        before = versions(emulator)
        seen = emulator.app.requests_seen
        emulator.app.set_faults(FaultPlan(server_error_rate=1.0, operations=["UpdateOrder"]))
        _, results = await workspace.complete(preview)
        sent = emulator.app.requests_seen - seen
        emulator.app.set_faults(FaultPlan())
        unreachable = [r for r in results if r.reason == "SQUARE_UNREACHABLE"]
        # 3 consecutive failures open the breaker; the few in flight then stop too.
        assert sent <= 3 + 2 * workspace.engine().per_merchant, sent
        assert len(unreachable) >= preview.count - 2 * workspace.engine().per_merchant
        assert all("consecutive failures" in r.detail for r in unreachable)
        await workspace.recover()
        assert_invariants(emulator, workspace, before, preview.items)
    finally:
        await workspace.aclose()


# ---------------------------------------------------------------- issue 8, hole 5
def _completed_outcomes(workspace: Workspace, order_id: str) -> list[str]:
    return [e["outcome"] for e in workspace.audit.entries(order_id=order_id)
            if e["action"] in ("outcome", "recovery")]


async def test_hole5_a_retry_that_loses_its_answer_is_an_intent_recover_settles(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        items = workspace.preview().items[:3]
        before = versions(emulator)
        emulator.app.set_faults(FaultPlan(noop_update_rate=1.0))  # 200, still OPEN
        _, first = await workspace.engine().run(items)
        assert {r.reason for r in first} == {"NOT_COMPLETED"}
        emulator.app.set_faults(FaultPlan(lost_response_rate=1.0, operations=["UpdateOrder"]))
        _, retried = await workspace.engine().run(items)  # retry-failed; answers lost
        emulator.app.set_faults(FaultPlan())
        assert {r.reason for r in retried} == {"OUTCOME_UNKNOWN"}
        assert workspace.open_intent_count() == len(items)  # every retry is an open intent
        settled = await workspace.recover()
        assert {r.outcome for r in settled} == {Outcome.COMPLETED}
        assert workspace.open_intent_count() == 0
        newly = assert_invariants(emulator, workspace, before, items)
        assert newly == {i.order_id for i in items}
        for item in items:
            outcomes = _completed_outcomes(workspace, item.order_id)
            assert outcomes[-1] == "completed" and outcomes.count("completed") == 1, outcomes
            keys = [row["idempotency_key"] for row in workspace.store.db["intents"].rows_where(
                "order_id = ?", [item.order_id], order_by="attempt")]
            # A new attempt has a new key: Square would replay the first (OPEN) answer.
            assert keys == [idempotency_key(item.order_id, item.version),
                            idempotency_key(item.order_id, item.version, 2)]
    finally:
        await workspace.aclose()


async def test_hole5_an_outcome_the_database_refuses_is_never_reported_completed(
        emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        preview = workspace.preview()
        before = versions(emulator)

        def locked(*args: object) -> None:
            raise sqlite3.OperationalError("database is locked")

        # On the class: the journal writes through its own store (a second connection).
        monkeypatch.setattr(type(workspace.store), "settle_intents", locked)
        emulator.app.set_faults(FaultPlan(latency_ms=5))
        _, results = await workspace.complete(preview)
        emulator.app.set_faults(FaultPlan())
        monkeypatch.undo()
        assert len(results) == len(preview.items)
        assert not [r for r in results if r.outcome is Outcome.COMPLETED]
        unrecorded = {r.order_id for r in results if r.reason == "OUTCOME_NOT_RECORDED"}
        stopped = [r for r in results if r.reason == "DATABASE_UNWRITABLE"]
        assert unrecorded and stopped, "it went on sending after the database refused"
        newly = {i for i, (s, _) in versions(emulator).items()
                 if s == "COMPLETED" and before[i][0] != "COMPLETED"}
        assert newly <= unrecorded | {r.order_id for r in results
                                      if r.reason == "OUTCOME_UNKNOWN"}
        assert workspace.open_intent_count() >= len(newly)
        await workspace.recover()
        assert_invariants(emulator, workspace, before, preview.items)
        for order_id in newly:
            assert _completed_outcomes(workspace, order_id).count("completed") == 1
    finally:
        await workspace.aclose()


# ---------------------------------------------------------------- issue 8, hole 6
def _hold_lease(workspace: Workspace, merchant_id: str) -> None:
    """Another live holder: this host, the parent process (alive), not expired."""
    now = datetime.now(UTC)
    workspace.store.take_lease(Lease(
        merchant_id, "bob", HOST, os.getppid(), utc_text(now), utc_text(now),
        utc_text(now + timedelta(minutes=5)), "bobs-token"), lambda lease: True)


async def test_hole6_a_leased_merchant_is_not_sent_and_stays_queued(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=2)
    try:
        preview = workspace.preview()
        leased = emulator.merchants[0].merchant.id
        _hold_lease(workspace, leased)
        before = versions(emulator)
        _, results = await workspace.complete(preview)
        mine = [r for r in results if r.merchant_id == leased]
        assert mine and {(r.outcome, r.reason) for r in mine} == {
            (Outcome.SKIPPED, "LEASED")}
        assert f"bob on {HOST} (pid {os.getppid()}) since" in mine[0].detail
        assert all(r.outcome is Outcome.COMPLETED for r in results if r.merchant_id != leased)
        assert {r.order_id for r in mine} <= {o.order_id for o in workspace.queue()}
        assert_invariants(emulator, workspace, before, preview.items)
        assert workspace.leased_merchants().keys() == {leased}
        assert [lease.merchant_id for lease in workspace.store.leases()] == [leased]  # ours gone
    finally:
        await workspace.aclose()


async def test_hole6_recover_leaves_a_live_holders_intents_alone(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        items = workspace.preview().items[:3]
        merchant_id = items[0].merchant_id
        engine = workspace.engine()
        intents = [engine._check(i, SquareOrder.model_validate(
            emulator.square.orders[i.order_id].copy_doc())) for i in items]
        assert engine.journal.write_intents(Run("live-batch", "sha", 3), intents)  # type: ignore[arg-type]
        _hold_lease(workspace, merchant_id)  # the process that wrote them is alive
        assert await workspace.recover() == []
        assert workspace.open_intent_count() == 3
        assert workspace.recover_left_alone and "bob on" in workspace.recover_left_alone[0]
        assert workspace.open_intent_count(settleable_only=True) == 0
        workspace.store.release_lease(merchant_id, "bobs-token")  # the holder is gone
        assert len(await workspace.recover()) == 3
        assert workspace.open_intent_count() == 0
    finally:
        await workspace.aclose()


async def test_hole6_an_expired_or_dead_holders_lease_is_taken_over(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        preview = workspace.preview()
        merchant_id = preview.items[0].merchant_id
        now = datetime.now(UTC)
        workspace.store.take_lease(Lease(
            merchant_id, "gone", "another-host", 1, utc_text(now - timedelta(minutes=2)),
            utc_text(now - timedelta(minutes=2)), utc_text(now - timedelta(minutes=1)), "old"),
            lambda lease: True)
        _, results = await workspace.complete(preview)
        assert {r.outcome for r in results} == {Outcome.COMPLETED}
    finally:
        await workspace.aclose()


async def test_hole6_the_heartbeat_keeps_a_long_batch_leased(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    # A TTL long enough that a loaded CI machine's stalls can't outlast it (0.3 s did), and a
    # batch made to last at least three TTLs: without the heartbeat the lease expires mid-way.
    ttl = 1.0
    workspace.engine_options.update(lease_ttl_s=ttl, heartbeat_s=0.1, per_merchant=1,
                                    max_per_merchant=1)
    try:
        preview = workspace.preview()
        emulator.app.set_faults(FaultPlan(latency_ms=1000 * 3 * ttl / len(preview.items)))
        started = time.monotonic()
        _, results = await workspace.complete(preview)
        emulator.app.set_faults(FaultPlan())
        assert {r.outcome for r in results} == {Outcome.COMPLETED}
        assert time.monotonic() - started > 3 * ttl  # it did outlast the TTL
    finally:
        await workspace.aclose()


async def test_a_token_filed_under_another_merchant_shows_its_own_code(
        emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway refuses such a token before any call (SquareAuthError with the code
    TOKEN_MERCHANT_MISMATCH); the engine passes the code through as the skip reason."""
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        preview = workspace.preview()

        async def refused(*args: object, **kwargs: object) -> None:
            raise SquareAuthError(status=401, code="TOKEN_MERCHANT_MISMATCH",
                                  detail="The token belongs to another merchant.")

        monkeypatch.setattr(workspace.gateway, "batch_retrieve", refused)
        _, results = await workspace.complete(preview)
        assert {(r.outcome, r.reason) for r in results} == {
            (Outcome.SKIPPED, "TOKEN_MERCHANT_MISMATCH")}
        assert workspace.store.db["intents"].count == 0
    finally:
        await workspace.aclose()


async def test_every_intent_is_committed_before_its_update_order_arrives(
        emulator: Emulator, tmp_path: Path) -> None:
    """Intents are group-committed on a writer thread: whenever Square receives an
    UpdateOrder, another connection (what survives a crash) already sees its intent, and the
    audit entry that says so."""
    workspace = await ready_workspace(emulator, tmp_path, merchants=3)
    missing: list[str] = []
    seen: list[str] = []
    square = emulator.square
    update_order = square.update_order

    def checked(merchant_id: str, order_id: str, body: dict[str, Any]) -> Any:
        with sqlite3.connect(tmp_path / "recon.db") as other:
            key = body["idempotency_key"]
            intent = other.execute("SELECT 1 FROM intents WHERE idempotency_key = ?",
                                   [key]).fetchone()
            audited = other.execute("SELECT 1 FROM audit WHERE action = 'intent' AND "
                                    "idempotency_key = ?", [key]).fetchone()
        if intent is None or audited is None:
            missing.append(order_id)
        seen.append(order_id)
        return update_order(merchant_id, order_id, body)

    square.update_order = checked  # type: ignore[method-assign]
    try:
        preview = workspace.preview()
        before = versions(emulator)
        _, results = await workspace.complete(preview)
        assert len(seen) == preview.count > 50
        assert missing == []
        assert {r.outcome for r in results} == {Outcome.COMPLETED}
        assert_invariants(emulator, workspace, before, preview.items)
    finally:
        square.update_order = update_order  # type: ignore[method-assign]
        await workspace.aclose()


def test_per_merchant_concurrency_grows_only_while_answers_are_fast_and_unthrottled() -> None:
    from services.completion.limits import AdaptiveLimit
    limit = AdaptiveLimit(16, 4)
    assert limit.limit == 4
    for _ in range(4):
        limit.succeeded(0.02)
    assert limit.limit == 5
    for _ in range(20):
        limit.succeeded(AdaptiveLimit.FAST_S + 1)  # slow answers: no growth
    assert limit.limit == 5
    limit.rate_limited(60.0)
    assert limit.limit == 2
    for _ in range(20):
        limit.succeeded(0.02)  # while backing off after a 429: no growth
    assert limit.limit == 2
    limit.backing_off_until = 0.0
    for _ in range(200):
        limit.succeeded(0.02)
    assert limit.limit == 16  # never past the maximum
