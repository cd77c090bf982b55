"""The intent journal: the batch, an intent before every request, an outcome after it, each
with its audit entry (all SQL in `services.store`). A crash leaves intents without outcomes,
which is what `recover` settles.

When the database refuses a write (locked past the busy timeout, disk full), the journal is
`broken`: the engine stops sending, and results whose outcome could not be written are reported
as OUTCOME_NOT_RECORDED, never as completed. Their intents stay open for `recover`."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from services.audit import AuditAction, AuditTrail
from services.completion.model import (
    NOT_RECORDED,
    ApprovedItem,
    BatchProgress,
    Intent,
    OrderResult,
    Outcome,
    idempotency_key,
)
from services.store import Store, utc_text

__all__ = ["IntentJournal", "Run"]


@dataclass
class Run:
    """One batch (or one recovery) as it goes: results with running counts, for progress."""

    batch_id: str
    approved_sha: str
    total: int
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    on_progress: Callable[[BatchProgress], None] | None = None
    started: float = field(default_factory=time.monotonic)
    results: list[OrderResult] = field(default_factory=list)
    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))

    def add(self, result: OrderResult) -> int:
        self.results.append(result)
        self.counts[result.outcome] += 1
        return len(self.results) - 1

    def replace(self, index: int, result: OrderResult) -> None:
        self.counts[self.results[index].outcome] -= 1
        self.results[index] = result
        self.counts[result.outcome] += 1

    def progress(self, backing_off: bool, concurrency: int) -> BatchProgress:
        done = len(self.results)
        rate = done / max(1e-6, time.monotonic() - self.started)
        return BatchProgress(
            done=done, total=self.total, completed=self.counts[Outcome.COMPLETED],
            skipped=self.counts[Outcome.SKIPPED], failed=self.counts[Outcome.FAILED],
            rate_per_s=rate, eta_s=(self.total - done) / rate if rate > 0 else None,
            backing_off=backing_off, concurrency=concurrency,
            cancelled=self.cancel.is_set())


@dataclass
class _Pending:
    run: Run
    index: int
    intent: Intent
    result: OrderResult
    action: AuditAction


class IntentJournal:
    def __init__(self, store: Store, audit: AuditTrail, operator: str,
                 on_change: Callable[[Run], None]) -> None:
        self.store = store
        self.audit = audit
        self.operator = operator
        self.on_change = on_change
        self.broken: str | None = None  # why the database refused a write
        self._pending: list[_Pending] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    def _refused(self, error: sqlite3.Error) -> None:
        self.broken = self.broken or f"the database refused a write ({error})"

    # ------------------------------------------------------------------ batches
    def begin_batch(self, run: Run, approved: list[ApprovedItem]) -> None:
        with self.store.transaction() as conn:
            self.store.insert_batch(run.batch_id, self.operator, run.approved_sha,
                                    orjson.dumps([[i.merchant_id, i.order_id, i.version]
                                                  for i in approved]).decode())
            self.audit.append(conn, operator=self.operator, action=AuditAction.APPROVAL,
                              batch_id=run.batch_id, approved_set_sha256=run.approved_sha,
                              detail=f"{len(approved)} orders approved")

    def finish_batch(self, run: Run) -> None:
        self.flush()
        summary = {o.value: n for o, n in run.counts.items()}
        try:
            with self.store.transaction() as conn:
                self.store.finish_batch(run.batch_id,
                                        "cancelled" if run.cancel.is_set() else "finished")
                if run.cancel.is_set():
                    self.audit.append(conn, operator=self.operator, action=AuditAction.CANCEL,
                                      batch_id=run.batch_id,
                                      approved_set_sha256=run.approved_sha,
                                      detail="cancelled by the operator; calls in flight "
                                             "finished")
                self.audit.append(conn, operator=self.operator,
                                  action=AuditAction.BATCH_FINISHED, batch_id=run.batch_id,
                                  approved_set_sha256=run.approved_sha,
                                  detail=orjson.dumps(summary).decode())
        except sqlite3.Error as error:
            self._refused(error)

    # ------------------------------------------------------------------ intents
    def write_intents(self, run: Run, intents: list[Intent]) -> bool:
        """Committed (fsync) before any of these requests leaves; each gets the next attempt
        number for its (order, version) and that attempt's key. False if not written."""
        self.flush()
        if self.broken:
            return False
        now = utc_text()
        try:
            with self.store.transaction() as conn:
                for intent in intents:
                    item = intent.item
                    intent.attempt = self.store.next_attempt(item.order_id, item.version)
                    intent.key = idempotency_key(item.order_id, item.version, intent.attempt)
                    intent.body["idempotency_key"] = intent.key
                    intent.intent_id = f"{run.batch_id}:{item.order_id}:{intent.attempt}"
                    self.store.insert_intent({
                        "intent_id": intent.intent_id, "attempt": intent.attempt,
                        "idempotency_key": intent.key, "batch_id": run.batch_id,
                        "merchant_id": item.merchant_id, "order_id": item.order_id,
                        "location_id": intent.location_id, "version": item.version,
                        "amount": intent.amount, "currency": intent.currency,
                        "consent_id": intent.consent_id,
                        "consent_sha256": intent.consent_sha256, "operator": self.operator,
                        "created_at": now, "body_json": orjson.dumps(intent.body).decode()})
                    self.audit.append(conn, operator=self.operator, action=AuditAction.INTENT,
                                      merchant_id=item.merchant_id, order_id=item.order_id,
                                      version=item.version, amount=intent.amount,
                                      currency=intent.currency, consent_id=intent.consent_id,
                                      consent_sha256=intent.consent_sha256,
                                      batch_id=run.batch_id,
                                      approved_set_sha256=run.approved_sha,
                                      idempotency_key=intent.key,
                                      detail=f"attempt {intent.attempt}")
        except sqlite3.Error as error:
            self._refused(error)
            return False
        return True

    # ------------------------------------------------------------------ outcomes
    def outcome(self, run: Run, intent: Intent, result: OrderResult | None,
                action: AuditAction = AuditAction.OUTCOME) -> None:
        """Outcomes are group-committed (every 50, or 25 ms): one fsync for many. One lost
        in a crash leaves its intent open, which is exactly what `recover` settles."""
        if result is None:  # outcome unknown: the intent stays open for `recover`
            run.add(OrderResult.of(intent.item, Outcome.FAILED, "OUTCOME_UNKNOWN",
                                   "Square did not answer; `recover` will settle it."))
            self.on_change(run)
            return
        self._pending.append(_Pending(run, run.add(result), intent, result, action))
        if len(self._pending) >= 50:
            self.flush()
        elif self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._flush_timer = loop.call_later(0.025, self.flush)
        self.on_change(run)

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            with self.store.transaction() as conn:
                for p in pending:
                    self._settle(conn, p)
        except sqlite3.Error as error:
            self._refused(error)
            for p in pending:
                if p.result.outcome is Outcome.SKIPPED:
                    continue  # not sent (or refused by Square): nothing to claim either way
                # Square's answer is known only to this process now: never say completed.
                p.run.replace(p.index, OrderResult.of(
                    p.intent.item, Outcome.FAILED, NOT_RECORDED,
                    f"Square's answer ({p.result.outcome.value}) could not be written to the "
                    f"database ({error}): run `recon-console recover`."))
                self.on_change(p.run)

    def _settle(self, conn: sqlite3.Connection, p: _Pending) -> None:
        result, intent = p.result, p.intent
        square_code = result.reason if result.outcome is Outcome.FAILED else None
        self.store.settle_intent(intent.intent_id, result.outcome.value, result.reason,
                                 square_code, result.detail)
        self.audit.append(conn, operator=self.operator, action=p.action,
                          merchant_id=result.merchant_id, order_id=result.order_id,
                          version=result.version, amount=intent.amount,
                          currency=intent.currency, consent_id=intent.consent_id,
                          consent_sha256=intent.consent_sha256, batch_id=p.run.batch_id,
                          approved_set_sha256=p.run.approved_sha,
                          idempotency_key=intent.key, outcome=result.outcome.value,
                          square_code=square_code, detail=result.detail[:500])
        if result.outcome is Outcome.COMPLETED:
            self.store.drop_completed_order(result.order_id)

    def without_intent(self, run: Run, item: ApprovedItem, reason: str, detail: str,
                       outcome: Outcome = Outcome.SKIPPED) -> None:
        """Decided before any intent: no call is made, but the audit says why."""
        self.flush()
        if not self.broken:
            try:
                self.audit.append(operator=self.operator, action=AuditAction.OUTCOME,
                                  merchant_id=item.merchant_id, order_id=item.order_id,
                                  version=item.version, batch_id=run.batch_id,
                                  approved_set_sha256=run.approved_sha,
                                  outcome=outcome.value,
                                  detail=f"{reason}: {detail}"[:500])
            except sqlite3.Error as error:
                self._refused(error)
        run.add(OrderResult.of(item, outcome, str(reason), detail))
        self.on_change(run)
