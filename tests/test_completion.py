"""The completion engine against the emulator, with every fault mode: afterwards every order the
emulator shows COMPLETED by the batch has an intent and an outcome; nothing outside the approved
set or ineligible at send time was completed; each completed order's version rose by exactly
one; the audit chain verifies."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.completion import ApprovedItem, BatchProgress, Outcome, idempotency_key
from services.completion.journal import Run
from services.completion.model import Intent
from services.demo import consent_for, workspace_on_emulator
from services.emulator import FaultPlan, SeedConfig
from services.square_gateway import RetryPolicy
from services.square_models import SquareOrder
from services.workspace import Workspace
from tests.conftest import Emulator, make_emulator

FAST_RETRY = RetryPolicy(attempts=8, base_delay_s=0.01, max_delay_s=1.0)
ENGINE = {"max_attempts": 6, "attempt_timeout_s": 0.5, "base_backoff_s": 0.01,
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
                    merchants: int | None = None) -> tuple[Workspace, list[Any],
                                                           dict[str, Any], list[ApprovedItem]]:
    workspace = await ready_workspace(emulator, tmp_path, merchants)
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
    workspace, results, before, approved = await run_batch(emulator, tmp_path, plan)
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
