"""Recovery (`services.completion.recovery`) against the emulator: intents left open as a crash
leaves them are settled against what Square shows now, each with its reason, an audit entry
under the batch that wrote it, and never a second completion. What cannot be settled (no
token, Square unreachable, another live holder, no answer) stays open. Whether an order was
completed is read from the emulator."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.completion import ApprovedItem, Outcome
from services.completion.journal import Run
from services.completion.model import Intent
from services.emulator import FaultPlan, SeedConfig
from services.processes import HOST
from services.square_models import SquareOrder
from services.store import Lease, utc_text
from services.workspace import Workspace
from tests.conftest import Emulator, make_emulator
from tests.test_completion import ready_workspace


def write_open_intents(emulator: Emulator, workspace: Workspace, items: list[ApprovedItem],
                       batch_id: str = "crashed-batch") -> list[Intent]:
    """What a crash between the intents' commit and the answers leaves."""
    engine = workspace.engine()
    intents = [engine._check(i, SquareOrder.model_validate(
        emulator.square.orders[i.order_id].copy_doc())) for i in items]
    assert all(isinstance(i, Intent) for i in intents)
    assert engine.journal.write_intents(Run(batch_id, "sha", len(items)), intents)  # type: ignore[arg-type]
    return intents  # type: ignore[return-value]


def state(emulator: Emulator, order_id: str) -> tuple[str, int | None]:
    record = emulator.square.orders[order_id]
    return record.state, record.version


def results_by_order(results: list[Any]) -> dict[str, tuple[Outcome, str | None, str]]:
    return {r.order_id: (r.outcome, r.reason, r.detail) for r in results}


async def test_each_open_intent_is_settled_against_what_square_shows(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=30))
    workspace = await ready_workspace(emulator, tmp_path)
    try:
        items = workspace.preview().items[:5]
        applied, untouched, moved, done_elsewhere, twice = items
        intents = write_open_intents(emulator, workspace, items)
        # A second attempt at one order, left open too (e.g. a retry-the-failed that crashed).
        write_open_intents(emulator, workspace, [twice], batch_id="retry-batch")
        # An intent for an order Square no longer returns.
        gone = replace(intents[1], item=ApprovedItem(applied.merchant_id, "GONE", 3))
        assert workspace.engine().journal.write_intents(Run("crashed-batch", "sha", 1),
                                                        [gone])
        square = emulator.square
        square.update_order(applied.merchant_id, applied.order_id, intents[0].body)
        square.touch(square.orders[moved.order_id])
        square.touch(square.orders[done_elsewhere.order_id])
        body = {**intents[3].body, "idempotency_key": "someone-else"}
        body["order"] = {**body["order"], "version": done_elsewhere.version + 1}
        square.update_order(done_elsewhere.merchant_id, done_elsewhere.order_id, body)
        assert workspace.open_intent_count() == 7

        results = await workspace.recover()
        by_order = results_by_order(results)
        v = {i.order_id: i.version for i in items}
        assert by_order == {
            applied.order_id: (Outcome.COMPLETED, None,
                               f"Found COMPLETED at version {v[applied.order_id] + 1}: our "
                               "update applied."),
            untouched.order_id: (Outcome.COMPLETED, None,
                                 f"COMPLETED at version {v[untouched.order_id] + 1}."),
            moved.order_id: (Outcome.SKIPPED, "VERSION_CHANGED",
                             f"Version is now {v[moved.order_id] + 1}; not resent."),
            done_elsewhere.order_id: (
                Outcome.SKIPPED, "ALREADY_COMPLETED",
                f"COMPLETED at version {v[done_elsewhere.order_id] + 2}, not by this intent."),
            twice.order_id: (Outcome.SKIPPED, "ALREADY_COMPLETED",
                             "Completed by another attempt at the same order."),
            "GONE": (Outcome.SKIPPED, "NOT_FOUND", "Square no longer returns it.")}
        # The first of the two attempts at `twice` completed it (resent); the second did not.
        assert [(r.order_id, r.outcome) for r in results if r.order_id == twice.order_id] == [
            (twice.order_id, Outcome.COMPLETED), (twice.order_id, Outcome.SKIPPED)]
        assert len(results) == 7 and workspace.open_intent_count() == 0
        # Square: each completed exactly once, at the approved version + 1.
        for item in (applied, untouched, twice):
            assert state(emulator, item.order_id) == ("COMPLETED", item.version + 1)
        assert state(emulator, moved.order_id) == ("OPEN", moved.version + 1)
        # The audit: one recovery entry per intent, under the batch that wrote it.
        entries = [e for e in workspace.audit.entries() if e["action"] == "recovery"]
        got = sorted((e["batch_id"], e["order_id"], e["outcome"]) for e in entries)
        assert got == sorted(
            [("crashed-batch", i.order_id, "completed") for i in (applied, untouched, twice)]
            + [("crashed-batch", moved.order_id, "skipped"),
               ("crashed-batch", done_elsewhere.order_id, "skipped"),
               ("crashed-batch", "GONE", "skipped"),
               ("retry-batch", twice.order_id, "skipped")])
        # Recovery settles intents; it approves no set of its own.
        assert {e["approved_set_sha256"] for e in entries} == {""}
        assert workspace.verify().ok
    finally:
        await workspace.aclose()


async def test_an_order_no_longer_eligible_is_not_resent(tmp_path: Path) -> None:
    """Judged on the merchant's own consents at this moment: another merchant's active
    consent covers nothing here."""
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=20))
    workspace = await ready_workspace(emulator, tmp_path)
    try:
        revoked = emulator.merchants[0].merchant.id
        items = [i for i in workspace.preview().items if i.merchant_id == revoked][:2]
        intents = write_open_intents(emulator, workspace, items)
        workspace.revoke_consent(intents[0].consent_id or "", "Owner", "in-house again")
        later = datetime.now(UTC) + timedelta(seconds=1)
        workspace.clock = lambda: later  # type: ignore[method-assign]
        results = await workspace.recover()
        assert {(r.outcome, r.reason) for r in results} == {
            (Outcome.SKIPPED, "CONSENT_REVOKED")}
        assert all(r.detail.startswith("CONSENT_REVOKED: ") for r in results)
        assert len(results) == 2 and workspace.open_intent_count() == 0
        assert all(state(emulator, i.order_id) == ("OPEN", i.version) for i in items)
    finally:
        await workspace.aclose()


async def test_what_cannot_be_settled_now_stays_open(tmp_path: Path) -> None:
    """Square unreachable, no token for the merchant, answers lost: nothing is claimed, the
    intents stay open for the next `recover`, which then settles them."""
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=20))
    workspace = await ready_workspace(emulator, tmp_path)
    workspace.engine_options.update(max_attempts=2)
    try:
        preview = workspace.preview()
        first, second = (m.merchant.id for m in emulator.merchants)
        items = ([i for i in preview.items if i.merchant_id == first][:2]
                 + [i for i in preview.items if i.merchant_id == second][:2])
        write_open_intents(emulator, workspace, items)
        emulator.app.set_faults(FaultPlan(server_error_rate=1.0,
                                          operations=["BatchRetrieveOrders"]))
        assert await workspace.recover() == []
        assert workspace.open_intent_count() == 4
        emulator.app.set_faults(FaultPlan(lost_response_rate=1.0, operations=["UpdateOrder"]))
        assert await workspace.recover() == []  # applied, but no answer: still unknown
        assert workspace.open_intent_count() == 4
        emulator.app.set_faults(FaultPlan())
        engine = workspace.engine()
        # Its token is missing from the credentials file.
        engine.recovery.credentials = {m: c for m, c in engine.recovery.credentials.items()
                                       if m != first}
        settled = await engine.recover()
        assert {r.merchant_id for r in settled} == {second}
        assert {r.outcome for r in settled} == {Outcome.COMPLETED}
        assert workspace.open_intent_count() == 2
        assert [r.order_id for r in await workspace.recover()] == [
            i.order_id for i in items[:2]]
        assert workspace.open_intent_count() == 0
        for item in items:
            assert state(emulator, item.order_id) == ("COMPLETED", item.version + 1)
    finally:
        await workspace.aclose()


async def test_a_live_holders_intents_are_left_alone_and_counted(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=20))
    workspace = await ready_workspace(emulator, tmp_path)
    try:
        preview = workspace.preview()
        held, free = (m.merchant.id for m in emulator.merchants)
        items = ([i for i in preview.items if i.merchant_id == held][:3]
                 + [i for i in preview.items if i.merchant_id == free][:1])
        write_open_intents(emulator, workspace, items)
        now = datetime.now(UTC)
        bob = Lease(held, "bob", HOST, os.getppid(), utc_text(now), utc_text(now),
                    utc_text(now + timedelta(minutes=5)), "bobs-token")
        workspace.store.take_lease(bob, lambda lease: True)
        results = await workspace.recover()
        assert [(r.merchant_id, r.outcome) for r in results] == [(free, Outcome.COMPLETED)]
        assert workspace.recover_left_alone == [
            f"{held}: 3 open intent(s) left to {bob.describe()}"]
        assert workspace.open_intent_count() == 3
        assert all(state(emulator, i.order_id) == ("OPEN", i.version) for i in items[:3])
        assert workspace.store.leases() == [bob]  # ours released, Bob's untouched
    finally:
        await workspace.aclose()
