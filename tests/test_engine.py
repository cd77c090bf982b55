"""The engine's per-order decisions against a small emulator, one situation each: what it does
when a merchant has no token, when the re-read before sending fails (Square's error, a refused
token, Square unreachable), when Square shows the order gone, completed elsewhere or moved on,
and what the intent records about the request and the consent relied on. Orders are judged
from the emulator's own state; the sentences are the ones the operator reads."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.completion import ApprovedItem, BatchProgress, Outcome
from services.completion.approvals import Approvals, FourEyesPolicy
from services.completion.journal import Run
from services.completion.model import Intent
from services.demo import consent_for, workspace_on_emulator
from services.emulator import SeedConfig
from services.errors import ReconError, SquareAuthError, SquareInvalidRequest, SquareServerError
from services.processes import HOST
from services.square_gateway import RetryPolicy
from services.square_models import SquareOrder
from services.store import Lease, SQLiteStore, utc_text
from services.workspace import Workspace
from tests.conftest import Emulator, make_emulator

FAST_RETRY = RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.05)
ENGINE = {"max_attempts": 3, "attempt_timeout_s": 5.0, "base_backoff_s": 0.01}
REREAD = "Could not re-read the order before sending: "
# Consent ids (uuids) that sort one way for one merchant and the other way for the other.
A_OLDER, Z_NEWER = ("00000000-0000-4000-8000-00000000000a",
                    "ffffffff-0000-4000-8000-00000000000b")
A_NEWER, Z_OLDER = ("00000000-0000-4000-8000-00000000000c",
                    "ffffffff-0000-4000-8000-00000000000d")


@pytest.fixture
def small() -> Emulator:
    return make_emulator(SeedConfig(merchants=2, orders_per_location=12))


async def workspace_for(emulator: Emulator, tmp_path: Path,
                        consents: list[dict[str, Any]] | None = None) -> Workspace:
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, tmp_path / "recon.db",
                                      "tester", timeout_s=2.0, retry=FAST_RETRY)
    workspace.engine_options = dict(ENGINE)
    now = datetime.now(UTC)
    path = tmp_path / "consents.json"
    path.write_text(json.dumps(consents or [consent_for(m, now) for m in emulator.merchants]))
    workspace.import_consent_files([path])
    await workspace.refresh()
    return workspace


@pytest.fixture
async def desk(small: Emulator, tmp_path: Path) -> AsyncIterator[Workspace]:
    workspace = await workspace_for(small, tmp_path)
    yield workspace
    await workspace.aclose()


def merchant_items(workspace: Workspace, merchant_id: str, count: int = 3
                   ) -> list[ApprovedItem]:
    items = [i for i in workspace.preview().items if i.merchant_id == merchant_id][:count]
    assert len(items) == count
    return items


def square_state(emulator: Emulator, order_id: str) -> tuple[str, int | None]:
    record = emulator.square.orders[order_id]
    return record.state, record.version


def intent_rows(workspace: Workspace) -> list[dict[str, Any]]:
    store = workspace.store
    assert isinstance(store, SQLiteStore)
    return list(store.db["intents"].rows)


def outcomes(workspace: Workspace) -> list[tuple[str, str, str]]:
    """(order, outcome, detail) of every outcome entry in the audit trail."""
    return [(e["order_id"], e["outcome"], e["detail"])
            for e in workspace.audit.entries(action="outcome")]


async def test_a_merchant_without_a_token_is_skipped_whole_and_the_others_run(
        small: Emulator, desk: Workspace) -> None:
    first, second = (m.merchant.id for m in small.merchants)
    engine = desk.engine()
    del engine.credentials[first]
    items = merchant_items(desk, first) + merchant_items(desk, second)
    _, results = await engine.run(items)
    by_order = {r.order_id: r for r in results}
    for item in items[:3]:
        assert (by_order[item.order_id].outcome, by_order[item.order_id].reason,
                by_order[item.order_id].detail) == (
            Outcome.SKIPPED, "NO_CREDENTIALS", "No access token for this merchant.")
        assert square_state(small, item.order_id) == ("OPEN", item.version)
    for item in items[3:]:
        assert by_order[item.order_id].outcome is Outcome.COMPLETED
        assert square_state(small, item.order_id) == ("COMPLETED", item.version + 1)
    audited = {o: (outcome, detail) for o, outcome, detail in outcomes(desk)}
    assert all(audited[i.order_id] == ("skipped", "NO_CREDENTIALS: No access token for this "
                                       "merchant.") for i in items[:3])


@pytest.mark.parametrize("error, reason", [
    (SquareInvalidRequest(status=400, code="INVALID_VALUE", detail="bad ids"), "INVALID_VALUE"),
    (ReconError("the answer could not be read"), "ReconError"),
])
async def test_a_reread_square_refuses_fails_those_orders_with_its_code(
        small: Emulator, desk: Workspace, monkeypatch: pytest.MonkeyPatch,
        error: ReconError, reason: str) -> None:
    first = small.merchants[0].merchant.id
    items = merchant_items(desk, first)

    async def refused(*args: object, **kwargs: object) -> None:
        raise error

    engine = desk.engine()
    monkeypatch.setattr(engine.gateway, "batch_retrieve", refused)
    _, results = await engine.run(items)
    assert sorted((r.order_id, r.outcome, r.reason, r.detail) for r in results) == sorted(
        (i.order_id, Outcome.FAILED, reason, f"{REREAD}{error}") for i in items)
    assert all(square_state(small, i.order_id) == ("OPEN", i.version) for i in items)
    assert desk.open_intent_count() == 0 and intent_rows(desk) == []
    assert {o: outcome for o, outcome, _ in outcomes(desk)} == {
        i.order_id: "failed" for i in items}


async def test_a_token_refused_on_the_reread_skips_the_merchant_with_squares_words(
        small: Emulator, desk: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    first = small.merchants[0].merchant.id
    items = merchant_items(desk, first)
    error = SquareAuthError(status=401, code="UNAUTHORIZED", detail="token revoked")

    async def refused(*args: object, **kwargs: object) -> None:
        raise error

    engine = desk.engine()
    monkeypatch.setattr(engine.gateway, "batch_retrieve", refused)
    _, results = await engine.run(items)
    assert {(r.outcome, r.reason, r.detail) for r in results} == {
        (Outcome.SKIPPED, "TOKEN_REJECTED", f"{REREAD}{error}")}


async def test_an_unreachable_square_on_the_reread_stops_the_merchant_for_the_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-reads go 100 orders at a time: once one fails as unreachable, the merchant's next
    chunks are not re-read (nor sent) and say why."""
    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=160))
    workspace = await workspace_for(emulator, tmp_path)
    try:
        items = workspace.preview().items
        assert len(items) > 100
        engine = workspace.engine()
        calls: list[int] = []
        error = SquareServerError(status=503, code="SERVICE_UNAVAILABLE", detail="down")

        async def unreachable(creds: object, order_ids: list[str], **kwargs: object) -> None:
            calls.append(len(order_ids))
            raise error

        monkeypatch.setattr(engine.gateway, "batch_retrieve", unreachable)
        _, results = await engine.run(items)
        assert calls == [100]
        assert {(r.outcome, r.reason, r.detail) for r in results} == {
            (Outcome.SKIPPED, "SQUARE_UNREACHABLE", f"{REREAD}{error}")}
        assert len(results) == len(items)
    finally:
        await workspace.aclose()


async def test_what_square_shows_at_the_reread_decides_and_is_said(
        small: Emulator, desk: Workspace) -> None:
    first = small.merchants[0].merchant.id
    gone, elsewhere, moved, fine = merchant_items(desk, first, 4)
    del small.square.orders[gone.order_id]
    record = small.square.orders[elsewhere.order_id]
    small.square.update_order(first, elsewhere.order_id, {  # completed in the Dashboard
        "idempotency_key": "dashboard", "order": {
            "location_id": record.location_id, "version": elsewhere.version,
            "state": "COMPLETED", "fulfillments": [
                {"uid": f["uid"], "state": "COMPLETED"}
                for f in record.doc.get("fulfillments", [])
                if f["state"] not in ("COMPLETED", "CANCELED", "FAILED")]}})
    small.square.touch(small.square.orders[moved.order_id])
    _, results = await desk.engine().run([gone, elsewhere, moved, fine])
    by_order = {r.order_id: (r.outcome, r.reason, r.detail) for r in results}
    assert by_order[gone.order_id] == (Outcome.SKIPPED, "NOT_FOUND",
                                       "Square no longer returns this order.")
    assert by_order[elsewhere.order_id] == (
        Outcome.SKIPPED, "ALREADY_COMPLETED",
        f"Already COMPLETED at version {elsewhere.version + 1}.")
    assert by_order[moved.order_id] == (
        Outcome.SKIPPED, "VERSION_CHANGED",
        f"Version is now {moved.version + 1}, approved {moved.version}: back to the queue "
        "for a new decision.")
    assert by_order[fine.order_id][0] is Outcome.COMPLETED
    assert square_state(small, moved.order_id) == ("OPEN", moved.version + 1)


async def test_the_intent_holds_exactly_the_request_sent_and_the_consent_relied_on(
        small: Emulator, tmp_path: Path) -> None:
    """Two active consents per merchant, listed in both orders: each intent names the newest
    one (the one classify relies on) with that consent's own hash, and its body is exactly the
    UpdateOrder sent: the key, and the order at the approved version with its open
    fulfillments, COMPLETED."""
    now = datetime.now(UTC)
    first, second = small.merchants
    documents = [
        consent_for(first, now - timedelta(days=20), consent_id=A_OLDER),
        consent_for(first, now, consent_id=Z_NEWER),
        consent_for(second, now, consent_id=A_NEWER),
        consent_for(second, now - timedelta(days=20), consent_id=Z_OLDER),
    ]
    workspace = await workspace_for(small, tmp_path, documents)
    try:
        items = (merchant_items(workspace, first.merchant.id, 2)
                 + merchant_items(workspace, second.merchant.id, 2))
        raw = {i.order_id: small.square.orders[i.order_id].copy_doc() for i in items}
        _, results = await workspace.engine().run(items)
        assert {r.outcome for r in results} == {Outcome.COMPLETED}
        newest = {first.merchant.id: Z_NEWER, second.merchant.id: A_NEWER}
        shas = {c.consent_id: sha for m in newest for c, sha in workspace.consents_for(m)}
        rows = {r["order_id"]: r for r in intent_rows(workspace)}
        for item in items:
            row, doc = rows[item.order_id], raw[item.order_id]
            assert (row["consent_id"], row["consent_sha256"]) == (
                newest[item.merchant_id], shas[newest[item.merchant_id]])
            assert (row["amount"], row["currency"], row["location_id"]) == (
                doc["total_money"]["amount"], doc["total_money"]["currency"],
                doc["location_id"])
            order: dict[str, Any] = {"location_id": doc["location_id"],
                                     "version": item.version, "state": "COMPLETED"}
            open_fulfillments = [{"uid": f["uid"], "state": "COMPLETED"}
                                 for f in doc.get("fulfillments", [])
                                 if f["state"] not in ("COMPLETED", "CANCELED", "FAILED")]
            if open_fulfillments:
                order["fulfillments"] = open_fulfillments
            assert orjson.loads(row["body_json"]) == {
                "idempotency_key": row["idempotency_key"], "order": order}
        intents = list(workspace.audit.entries(action="intent"))
        assert {(e["order_id"], e["consent_id"], e["consent_sha256"], e["currency"])
                for e in intents} == {
            (i.order_id, newest[i.merchant_id], shas[newest[i.merchant_id]],
             raw[i.order_id]["total_money"]["currency"]) for i in items}
    finally:
        await workspace.aclose()


async def test_a_merchant_another_live_run_holds_is_left_alone_and_says_by_whom(
        small: Emulator, desk: Workspace) -> None:
    first = small.merchants[0].merchant.id
    items = merchant_items(desk, first)
    now = datetime.now(UTC)
    lease = Lease(first, "bob", HOST, os.getppid(), utc_text(now), utc_text(now),
                  utc_text(now + timedelta(minutes=5)), "bobs-token")
    desk.store.take_lease(lease, lambda held: True)
    _, results = await desk.engine().run(items)
    assert {(r.outcome, r.reason, r.detail) for r in results} == {
        (Outcome.SKIPPED, "LEASED", f"Another run holds this merchant: {lease.describe()}. "
         "Its orders stay in the queue.")}
    assert all(square_state(small, i.order_id) == ("OPEN", i.version) for i in items)


async def test_open_intents_are_settled_before_the_run_and_an_unknown_one_is_not_resent(
        small: Emulator, desk: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash left two intents open. One had applied: the next run reports it completed from
    Square's state (the recovery entry, like `recover`'s, names no approved set) and sends
    nothing for it. When Square cannot be asked about the other, it is not sent again."""
    first = small.merchants[0].merchant.id
    # The unknown one first in its chunk: the orders after it are still checked and sent.
    unknown, applied, fresh = sorted(merchant_items(desk, first))
    engine = desk.engine()
    crashed = Run("crashed", "sha", 2)
    intents = [engine._check(i, SquareOrder.model_validate(
        small.square.orders[i.order_id].copy_doc())) for i in (applied, unknown)]
    assert all(isinstance(i, Intent) for i in intents)
    assert engine.journal.write_intents(crashed, intents)  # type: ignore[arg-type]
    small.square.update_order(first, applied.order_id, intents[0].body)  # type: ignore[union-attr]

    engine = desk.engine()
    real = engine.gateway.batch_retrieve
    calls = 0

    async def first_read_fails(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the settling read: Square unreachable, the intents stay open
            raise SquareServerError(status=503, code="SERVICE_UNAVAILABLE", detail="down")
        return await real(*args, **kwargs)

    monkeypatch.setattr(engine.gateway, "batch_retrieve", first_read_fails)
    _, results = await engine.run([unknown, fresh])
    monkeypatch.undo()
    by_order = {r.order_id: (r.outcome, r.reason, r.detail) for r in results}
    assert by_order[unknown.order_id] == (
        Outcome.SKIPPED, "SQUARE_UNREACHABLE", "An earlier attempt's outcome is still "
        "unknown: not sent again until `recon-console recover` settles it.")
    assert by_order[fresh.order_id][0] is Outcome.COMPLETED
    assert square_state(small, unknown.order_id) == ("OPEN", unknown.version)
    assert desk.open_intent_count() == 2

    _, results = await desk.engine().run([applied])
    assert [(r.order_id, r.outcome) for r in results] == [(applied.order_id, Outcome.COMPLETED)]
    [settled] = [e for e in desk.audit.entries(action="recovery")
                 if e["order_id"] == applied.order_id]
    assert (settled["outcome"], settled["batch_id"], settled["approved_set_sha256"]) == (
        "completed", "crashed", "")
    assert square_state(small, applied.order_id) == ("COMPLETED", applied.version + 1)
    assert desk.open_intent_count() == 0  # the unknown one was settled (resent) too


async def test_a_consent_revoked_after_the_preview_skips_its_orders_by_that_reason(
        small: Emulator, desk: Workspace) -> None:
    first = small.merchants[0].merchant.id
    items = merchant_items(desk, first)
    desk.revoke_all_for_merchant(first, "Store owner", "in-house again")
    _, results = await desk.engine().run(items)
    assert {(r.outcome, r.reason) for r in results} == {(Outcome.SKIPPED, "CONSENT_REVOKED")}
    assert all(r.detail.startswith("CONSENT_REVOKED: Consent was revoked ") for r in results)
    assert intent_rows(desk) == []
    assert all(square_state(small, i.order_id) == ("OPEN", i.version) for i in items)


async def test_a_cancel_pressed_during_the_reread_sends_nothing_and_writes_no_intent(
        small: Emulator, desk: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    first = small.merchants[0].merchant.id
    items = merchant_items(desk, first)
    engine = desk.engine()
    cancel = asyncio.Event()
    real = engine.gateway.batch_retrieve

    async def cancelled_meanwhile(*args: Any, **kwargs: Any) -> Any:
        orders = await real(*args, **kwargs)
        cancel.set()  # the operator pressed cancel while Square answered
        return orders

    monkeypatch.setattr(engine.gateway, "batch_retrieve", cancelled_meanwhile)
    _, results = await engine.run(items, cancel=cancel)
    assert sorted((r.order_id, r.outcome, r.reason, r.detail) for r in results) == sorted(
        (i.order_id, Outcome.SKIPPED, "CANCELLED", "Cancelled before it was sent.")
        for i in items)
    assert intent_rows(desk) == []
    assert all(square_state(small, i.order_id) == ("OPEN", i.version) for i in items)


async def test_intents_the_database_refuses_are_not_sent(
        small: Emulator, desk: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    first = small.merchants[0].merchant.id
    items = merchant_items(desk, first)
    engine = desk.engine()

    async def refused(run: Run, intents: list[Intent]) -> bool:
        engine.journal.broken = "the database refused a write (disk full)"
        return False

    monkeypatch.setattr(engine.journal, "commit_intents", refused)
    _, results = await engine.run(items)
    assert sorted((r.order_id, r.outcome, r.reason, r.detail) for r in results) == sorted(
        (i.order_id, Outcome.SKIPPED, "DATABASE_UNWRITABLE",
         "Not sent: the database refused a write (disk full).") for i in items)
    assert all(square_state(small, i.order_id) == ("OPEN", i.version) for i in items)


async def test_an_approved_batch_runs_under_its_approval_and_progress_counts_every_order(
        small: Emulator, desk: Workspace) -> None:
    first = small.merchants[0].merchant.id
    items = merchant_items(desk, first)
    engine = desk.engine()
    engine.approvals.policy = FourEyesPolicy(max_orders=2)
    approvals = Approvals(desk.store, desk.audit, engine.approvals.policy, desk.clock)
    approvals.prepare("b1", items, "ana", {}, "3 orders, more than 2")
    approvals.decide("b1", "ben", True, "checked")
    seen: list[BatchProgress] = []
    batch_id, results = await engine.run(items, batch_id="b1", on_progress=seen.append)
    assert batch_id == "b1"
    assert {r.outcome for r in results} == {Outcome.COMPLETED}
    used = desk.store.approval("b1")
    assert used is not None and (used.status, used.used_by) == ("used", "tester")
    last = seen[-1]
    assert (last.done, last.total, last.completed, last.skipped, last.failed,
            last.backing_off, last.concurrency) == (3, 3, 3, 0, 0, False, 64)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
