"""The intent journal on its own, without Square: an intent row and its audit entry are durable
(seen from another connection) before `commit_intents` returns; each outcome settles its intent
with an audit entry naming the consent, the key and Square's code; a new attempt gets a new
key; an outcome the database refuses is never reported as completed and leaves its intent open
for `recover`; after a refusal nothing more is written as if it had worked."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.audit import AuditTrail
from services.completion.journal import IntentJournal, Run
from services.completion.model import (
    NOT_RECORDED,
    ApprovedItem,
    Intent,
    OrderResult,
    Outcome,
    SkipReason,
    idempotency_key,
)
from services.store import Store

OPERATOR = "tester"
CONSENT_SHA = "c" * 64


def journal_on(store: Store) -> tuple[IntentJournal, list[Run]]:
    changes: list[Run] = []
    return IntentJournal(store, AuditTrail(store), OPERATOR, changes.append), changes


def intent(order_id: str, version: int = 3, merchant_id: str = "M1") -> Intent:
    return Intent(ApprovedItem(merchant_id, order_id, version), "",
                  {"idempotency_key": "", "order": {"version": version, "state": "COMPLETED"}},
                  "L1", 1250, "USD", "consent-1", CONSENT_SHA)


def other(path: Path) -> sqlite3.Connection:
    """What survives a crash: another connection to the file."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    return conn


def audit_rows(path: Path, action: str) -> list[dict[str, Any]]:
    with other(path) as conn:
        return [dict(r) for r in conn.execute(
            "SELECT * FROM audit WHERE action = ? ORDER BY seq", [action])]


def intent_rows(path: Path) -> list[dict[str, Any]]:
    with other(path) as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM intents ORDER BY order_id, attempt")]


def queue_order(store: Store, order_id: str) -> None:
    store.conn.execute(
        "INSERT INTO orders (order_id, merchant_id, location_id, version, state, total_amount, "
        "currency, due_amount, created_at, eligible, order_json, seen_at) VALUES "
        "(?, 'M1', 'L1', 3, 'OPEN', 1250, 'USD', 0, 'x', 1, '{}', 'x')", [order_id])


def queued(store: Store) -> set[str]:
    return {r[0] for r in store.conn.execute("SELECT order_id FROM orders")}


async def test_intents_are_durable_with_their_audit_before_commit_returns(
        tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal, _ = journal_on(Store(db))
    items = [ApprovedItem("M1", "O1", 3), ApprovedItem("M1", "O2", 3)]
    run = Run("b1", "approved-sha", 2)
    journal.begin_batch(run, items)
    intents = [intent("O1"), intent("O2")]
    try:
        assert await journal.commit_intents(run, intents)
        rows = intent_rows(db)  # read from another connection, right after the return
        assert [(r["intent_id"], r["attempt"], r["idempotency_key"], r["batch_id"],
                 r["merchant_id"], r["order_id"], r["location_id"], r["version"], r["amount"],
                 r["currency"], r["consent_id"], r["consent_sha256"], r["operator"],
                 r["outcome"]) for r in rows] == [
            ("b1:O1:1", 1, idempotency_key("O1", 3), "b1", "M1", "O1", "L1", 3, 1250, "USD",
             "consent-1", CONSENT_SHA, OPERATOR, None),
            ("b1:O2:1", 1, idempotency_key("O2", 3), "b1", "M1", "O2", "L1", 3, 1250, "USD",
             "consent-1", CONSENT_SHA, OPERATOR, None)]
        # The body that is sent carries the intent's key.
        assert orjson.loads(rows[0]["body_json"]) == {
            "idempotency_key": idempotency_key("O1", 3),
            "order": {"version": 3, "state": "COMPLETED"}}
        assert intents[0].body["idempotency_key"] == intents[0].key == idempotency_key("O1", 3)
        entries = audit_rows(db, "intent")
        assert [(e["operator"], e["merchant_id"], e["order_id"], e["version"], e["amount"],
                 e["currency"], e["consent_id"], e["consent_sha256"], e["batch_id"],
                 e["approved_set_sha256"], e["idempotency_key"], e["detail"]) for e in entries
                ] == [(OPERATOR, "M1", o, 3, 1250, "USD", "consent-1", CONSENT_SHA, "b1",
                       "approved-sha", idempotency_key(o, 3), "attempt 1") for o in ("O1", "O2")]
        approval = audit_rows(db, "approval")
        assert [(a["operator"], a["batch_id"], a["approved_set_sha256"], a["detail"])
                for a in approval] == [(OPERATOR, "b1", "approved-sha", "2 orders approved")]
        with other(db) as conn:
            batch = dict(conn.execute("SELECT * FROM batches").fetchone())
        assert (batch["batch_id"], batch["operator"], batch["status"],
                orjson.loads(batch["approved_json"])) == (
            "b1", OPERATOR, "running", [["M1", "O1", 3], ["M1", "O2", 3]])
        # A second attempt at the same (order, version) is a new intent with a new key;
        # another version starts again at attempt 1.
        again = Run("b2", "sha2", 2)
        retry, newer = intent("O1"), intent("O1", version=4)
        assert journal.write_intents(again, [retry, newer])
        assert (retry.attempt, retry.key, retry.intent_id) == (
            2, idempotency_key("O1", 3, 2), "b2:O1:2")
        assert (newer.attempt, newer.key, newer.intent_id) == (
            1, idempotency_key("O1", 4), "b2:O1:1")
        assert [e["detail"] for e in audit_rows(db, "intent")][-2:] == ["attempt 2", "attempt 1"]
        assert AuditTrail(Store(db)).verify().ok
    finally:
        await journal.drain()
        journal.close()


async def test_outcomes_settle_their_intents_with_the_audit_saying_what_square_said(
        tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    store = Store(db)
    for order_id in ("O1", "O2", "O3", "O4"):
        queue_order(store, order_id)
    journal, changes = journal_on(store)
    run = Run("b1", "sha", 5)
    journal.begin_batch(run, [])
    done, failed, moved, unknown = (intent(o) for o in ("O1", "O2", "O3", "O4"))
    try:
        assert await journal.commit_intents(run, [done, failed, moved, unknown])
        journal.outcome(run, done, OrderResult.of(done.item, Outcome.COMPLETED, None,
                                                  "COMPLETED at version 4."))
        journal.outcome(run, failed, OrderResult.of(failed.item, Outcome.FAILED,
                                                    "INVALID_VALUE", "x" * 900))
        journal.outcome(run, moved, OrderResult.of(moved.item, Outcome.SKIPPED,
                                                   SkipReason.VERSION_CHANGED, "moved on"))
        journal.outcome(run, unknown, None)  # no answer: stays open for `recover`
        journal.without_intent(run, ApprovedItem("M1", "O5", 3), SkipReason.LEASED,
                               "held elsewhere " + "y" * 600)
        await journal.drain()
        assert len(changes) == 5 and changes[-1] is run
    finally:
        journal.close()
    rows = {r["order_id"]: r for r in intent_rows(db)}
    assert {o: (r["outcome"], r["reason"], r["square_code"], r["detail"])
            for o, r in rows.items()} == {
        "O1": ("completed", None, None, "COMPLETED at version 4."),
        "O2": ("failed", "INVALID_VALUE", "INVALID_VALUE", "x" * 900),
        "O3": ("skipped", "VERSION_CHANGED", None, "moved on"),
        "O4": (None, None, None, None)}
    assert rows["O1"]["settled_at"] and rows["O4"]["settled_at"] is None
    outcomes = audit_rows(db, "outcome")
    assert [(e["order_id"], e["outcome"], e["square_code"], e["idempotency_key"],
             e["amount"], e["consent_sha256"], e["detail"]) for e in outcomes] == [
        ("O1", "completed", None, idempotency_key("O1", 3), 1250, CONSENT_SHA,
         "COMPLETED at version 4."),
        ("O2", "failed", "INVALID_VALUE", idempotency_key("O2", 3), 1250, CONSENT_SHA,
         "x" * 500),
        ("O3", "skipped", None, idempotency_key("O3", 3), 1250, CONSENT_SHA, "moved on"),
        ("O5", "skipped", None, None, None, None,
         ("LEASED: held elsewhere " + "y" * 600)[:500])]
    for entry in outcomes:
        assert (entry["operator"], entry["merchant_id"], entry["version"], entry["batch_id"],
                entry["approved_set_sha256"]) == (OPERATOR, "M1", 3, "b1", "sha")
    assert [(e["currency"], e["consent_id"]) for e in outcomes] == [("USD", "consent-1")] * 3 + [
        (None, None)]
    assert queued(store) == {"O2", "O3", "O4"}  # only a completed order leaves the queue
    assert [(r.order_id, r.outcome, r.reason) for r in run.results] == [
        ("O1", Outcome.COMPLETED, None), ("O2", Outcome.FAILED, "INVALID_VALUE"),
        ("O3", Outcome.SKIPPED, "VERSION_CHANGED"), ("O4", Outcome.FAILED, "OUTCOME_UNKNOWN"),
        ("O5", Outcome.SKIPPED, "LEASED")]
    assert run.results[3].detail == "Square did not answer; `recover` will settle it."
    assert AuditTrail(store).verify().ok


async def test_an_outcome_the_database_refuses_is_never_reported_completed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "j.db"
    store = Store(db)
    journal, changes = journal_on(store)
    run = Run("b1", "sha", 4)
    journal.begin_batch(run, [])
    done, moved, later = intent("O1"), intent("O2"), intent("O3")
    try:
        assert await journal.commit_intents(run, [done, moved])
        monkeypatch.setattr(type(store), "settle_intents", _locked)
        journal.outcome(run, done, OrderResult.of(done.item, Outcome.COMPLETED, None, "ok"))
        journal.outcome(run, moved, OrderResult.of(moved.item, Outcome.SKIPPED,
                                                   SkipReason.VERSION_CHANGED, "moved"))
        await journal.drain()
        assert journal.broken == "the database refused a write (database is locked)"
        assert [(r.order_id, r.outcome, r.reason) for r in run.results] == [
            ("O1", Outcome.FAILED, NOT_RECORDED), ("O2", Outcome.SKIPPED, "VERSION_CHANGED")]
        assert run.results[0].detail == (
            "Square's answer (completed) could not be written to the database (database is "
            "locked): run `recon-console recover`.")
        assert (run.counts[Outcome.COMPLETED], run.counts[Outcome.FAILED]) == (0, 1)
        assert changes[-1] is run
        # Nothing more is written once broken: no intents (so nothing is sent), no outcomes.
        monkeypatch.undo()
        assert not await journal.commit_intents(run, [later])
        assert not journal.write_intents(run, [later])
        journal.without_intent(run, later.item, SkipReason.DATABASE_UNWRITABLE, "not sent")
        journal.outcome(run, done, OrderResult.of(done.item, Outcome.COMPLETED, None, "ok"))
        await journal.drain()
        assert run.results[-1].reason == NOT_RECORDED
        assert run.results[-2].reason == SkipReason.DATABASE_UNWRITABLE
    finally:
        journal.close()
    assert [(r["order_id"], r["outcome"]) for r in intent_rows(db)] == [("O1", None),
                                                                       ("O2", None)]
    assert audit_rows(db, "outcome") == []  # the refused part left no half-written trace


def _locked(*args: object) -> None:
    raise sqlite3.OperationalError("database is locked")


async def test_a_refused_outcome_does_not_undo_intents_committed_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One group commit, two parts: the intents commit even though the outcomes are refused,
    and the caller is told the database is broken so it sends nothing."""
    db = tmp_path / "j.db"
    store = Store(db)
    journal, _ = journal_on(store)
    run = Run("b1", "sha", 2)
    journal.begin_batch(run, [])
    first, second = intent("O1"), intent("O2")
    try:
        assert await journal.commit_intents(run, [first])
        monkeypatch.setattr(type(store), "settle_intents", _locked)
        journal.outcome(run, first, OrderResult.of(first.item, Outcome.COMPLETED, None, "ok"))
        assert not await journal.commit_intents(run, [second])  # same group as the outcome
        await journal.drain()
    finally:
        journal.close()
    assert [(r["order_id"], r["outcome"]) for r in intent_rows(db)] == [("O1", None),
                                                                       ("O2", None)]
    assert [e["order_id"] for e in audit_rows(db, "intent")] == ["O1", "O2"]
    assert run.results[0].reason == NOT_RECORDED


def test_without_a_running_loop_outcomes_commit_at_once(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    store = Store(db)
    queue_order(store, "O1")
    journal, _ = journal_on(store)
    run = Run("b1", "sha", 1)
    journal.begin_batch(run, [])
    done = intent("O1")
    assert journal.write_intents(run, [done])
    journal.outcome(run, done, OrderResult.of(done.item, Outcome.COMPLETED, None, "ok"))
    assert [r["outcome"] for r in intent_rows(db)] == ["completed"]  # no drain needed
    assert [(e["order_id"], e["outcome"]) for e in audit_rows(db, "outcome")] == [
        ("O1", "completed")]
    assert queued(store) == set()
    journal.finish_batch(run)
    with other(db) as conn:
        status = conn.execute("SELECT status, finished_at FROM batches").fetchone()
    assert status[0] == "finished" and status[1]
    assert [e["detail"] for e in audit_rows(db, "batch_finished")] == [
        '{"completed":1,"skipped":0,"failed":0}']
    assert audit_rows(db, "cancel") == []


async def test_in_memory_the_journal_commits_on_the_one_connection() -> None:
    store = Store(":memory:")
    journal, _ = journal_on(store)
    run = Run("b1", "sha", 1)
    journal.begin_batch(run, [])
    done = intent("O1")
    assert await journal.commit_intents(run, [done])
    journal.outcome(run, done, OrderResult.of(done.item, Outcome.COMPLETED, None, "ok"))
    await journal.drain()
    journal.close()
    assert store.open_intent_count() == 0
    assert [r[0] for r in store.conn.execute("SELECT outcome FROM intents")] == ["completed"]


def test_a_cancelled_batch_says_so_and_a_refused_finish_is_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "j.db"
    store = Store(db)
    journal, _ = journal_on(store)
    run = Run("b1", "sha", 2, asyncio.Event())
    journal.begin_batch(run, [])
    run.add(OrderResult.of(ApprovedItem("M1", "O1", 3), Outcome.SKIPPED, "CANCELLED", "c"))
    run.cancel.set()
    journal.finish_batch(run)
    with other(db) as conn:
        assert conn.execute("SELECT status FROM batches").fetchone()[0] == "cancelled"
    cancel = audit_rows(db, "cancel")
    assert [(c["batch_id"], c["approved_set_sha256"], c["detail"]) for c in cancel] == [
        ("b1", "sha", "cancelled by the operator; calls in flight finished")]
    finished = audit_rows(db, "batch_finished")
    assert [(f["operator"], f["batch_id"], f["approved_set_sha256"], f["detail"])
            for f in finished] == [
        (OPERATOR, "b1", "sha", '{"completed":0,"skipped":1,"failed":0}')]
    assert finished[0]["seq"] == cancel[0]["seq"] + 1

    def refused(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    again = Run("b2", "sha", 0)
    journal.begin_batch(again, [])
    monkeypatch.setattr(store, "finish_batch", refused)
    journal.finish_batch(again)
    assert journal.broken == "the database refused a write (disk I/O error)"


def test_progress_counts_what_happened() -> None:
    run = Run("b1", "sha", 4, asyncio.Event())
    item = ApprovedItem("M1", "O1", 3)
    run.add(OrderResult.of(item, Outcome.COMPLETED, None, "ok"))
    index = run.add(OrderResult.of(item, Outcome.COMPLETED, None, "ok"))
    run.add(OrderResult.of(item, Outcome.SKIPPED, "LEASED", "x"))
    run.replace(index, OrderResult.of(item, Outcome.FAILED, NOT_RECORDED, "y"))
    run.started = time.monotonic() - 0.5  # three done in half a second
    progress = run.progress(True, 7)
    assert (progress.done, progress.total, progress.completed, progress.skipped,
            progress.failed, progress.backing_off, progress.concurrency,
            progress.cancelled) == (3, 4, 1, 1, 1, True, 7, False)
    assert progress.rate_per_s == pytest.approx(6, rel=0.2)
    assert progress.eta_s == pytest.approx(1 / progress.rate_per_s)
    run.cancel.set()
    assert run.progress(False, 1).cancelled
    # A second failure replaced in counts on top of the first.
    run.replace(run.add(OrderResult.of(item, Outcome.COMPLETED, None, "ok")),
                OrderResult.of(item, Outcome.FAILED, NOT_RECORDED, "y"))
    assert (run.counts[Outcome.COMPLETED], run.counts[Outcome.FAILED]) == (1, 2)
    # Slow (under one a second): the time left still shows.
    run.started = time.monotonic() - 10
    slow = run.progress(False, 1)
    assert slow.rate_per_s == pytest.approx(0.4, rel=0.1)
    assert slow.eta_s == pytest.approx(0, abs=1e-9)  # all four done
    run.total = 5
    assert run.progress(False, 1).eta_s == pytest.approx(2.5, rel=0.1)
    # Nothing done yet: no rate, no time left to guess.
    idle = Run("b2", "sha", 4).progress(False, 1)
    assert (idle.done, idle.rate_per_s, idle.eta_s) == (0, 0, None)


async def test_intents_the_database_refuses_are_never_reported_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether through the group commit or on the main connection: refused intents return
    False (so nothing is sent), and `broken` names the database's own error."""
    db = tmp_path / "j.db"
    store = Store(db)
    run = Run("b1", "sha", 2)
    monkeypatch.setattr(type(store), "insert_intents", _locked)
    grouped, _ = journal_on(store)
    grouped.begin_batch(run, [])
    try:
        assert not await grouped.commit_intents(run, [intent("O1")])
        assert grouped.broken == "the database refused a write (database is locked)"
    finally:
        await grouped.drain()
        grouped.close()
    direct, _ = journal_on(store)
    assert not direct.write_intents(run, [intent("O2")])
    assert direct.broken == "the database refused a write (database is locked)"
    assert intent_rows(db) == [] and audit_rows(db, "intent") == []


async def test_a_refused_group_never_reports_completed_whatever_comes_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A skip (or a decision without an intent) ahead of a completion in the refused group
    does not let that completion through as completed."""
    db = tmp_path / "j.db"
    store = Store(db)
    journal, _ = journal_on(store)
    run = Run("b1", "sha", 3)
    journal.begin_batch(run, [])
    moved, done = intent("O1"), intent("O2")
    try:
        assert await journal.commit_intents(run, [moved, done])
        monkeypatch.setattr(type(store), "settle_intents", _locked)
        journal.without_intent(run, ApprovedItem("M1", "O0", 3), SkipReason.LEASED, "held")
        journal.outcome(run, moved, OrderResult.of(moved.item, Outcome.SKIPPED,
                                                   SkipReason.VERSION_CHANGED, "moved"))
        journal.outcome(run, done, OrderResult.of(done.item, Outcome.COMPLETED, None, "ok"))
        await journal.drain()
    finally:
        journal.close()
    assert [(r.order_id, r.outcome, r.reason) for r in run.results] == [
        ("O0", Outcome.SKIPPED, "LEASED"), ("O1", Outcome.SKIPPED, "VERSION_CHANGED"),
        ("O2", Outcome.FAILED, NOT_RECORDED)]
    assert run.counts[Outcome.COMPLETED] == 0


async def test_once_broken_an_outcome_says_why_it_was_not_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "j.db"
    store = Store(db)
    journal, _ = journal_on(store)
    run = Run("b1", "sha", 2)
    journal.begin_batch(run, [])
    first, second = intent("O1"), intent("O2")
    try:
        assert await journal.commit_intents(run, [first, second])
        monkeypatch.setattr(type(store), "settle_intents", _locked)
        journal.outcome(run, first, OrderResult.of(first.item, Outcome.COMPLETED, None, "ok"))
        await journal.drain()
        monkeypatch.undo()  # the database would take it now, but the journal is broken
        journal.outcome(run, second, OrderResult.of(second.item, Outcome.COMPLETED, None,
                                                    "ok"))
        await journal.drain()
    finally:
        journal.close()
    assert run.results[1].detail == (
        "Square's answer (completed) could not be written to the database (the database "
        "refused a write (database is locked)): run `recon-console recover`.")
    assert [r["outcome"] for r in intent_rows(db)] == [None, None]


def test_without_a_running_loop_a_refused_outcome_is_never_reported_completed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outcomes written at once (no event loop): the same rule as the group commits."""
    db = tmp_path / "j.db"
    store = Store(db)
    journal, _ = journal_on(store)
    run = Run("b1", "sha", 3)
    journal.begin_batch(run, [])
    first, second = intent("O1"), intent("O2")
    assert journal.write_intents(run, [first, second])
    monkeypatch.setattr(type(store), "settle_intents", _locked)
    journal.outcome(run, first, OrderResult.of(first.item, Outcome.COMPLETED, None, "ok"))
    monkeypatch.undo()  # the database would take it now, but the journal is broken
    journal.outcome(run, second, OrderResult.of(second.item, Outcome.COMPLETED, None, "ok"))
    assert [(r.order_id, r.outcome, r.reason, r.detail) for r in run.results] == [
        ("O1", Outcome.FAILED, NOT_RECORDED,
         "Square's answer (completed) could not be written to the database (database is "
         "locked): run `recon-console recover`."),
        ("O2", Outcome.FAILED, NOT_RECORDED,
         "Square's answer (completed) could not be written to the database (the database "
         "refused a write (database is locked)): run `recon-console recover`.")]
    assert [r["outcome"] for r in intent_rows(db)] == [None, None]
    assert audit_rows(db, "outcome") == []
