"""The intent journal: the batch, an intent before every request, an outcome after it, each
with its audit entry (all SQL in `services.store`). A crash leaves intents without outcomes,
which is what `recover` settles.

When the database refuses a write (locked past the busy timeout, disk full), the journal is
`broken`: the engine stops sending, and results whose outcome could not be written are reported
as OUTCOME_NOT_RECORDED, never as completed. Their intents stay open for `recover`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

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
from services.store import Store, database_errors, utc_text

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
    """An outcome (with its intent) or a skip decided before any intent (intent None)."""

    run: Run
    index: int
    intent: Intent | None
    result: OrderResult
    action: AuditAction
    # As it was when queued: recovery moves `run.batch_id` to each intent's own batch.
    batch_id: str


@dataclass
class _IntentJob:
    run: Run
    intents: list[Intent]
    done: asyncio.Future[BaseException | None]


class IntentJournal:
    """Writes go through one writer: each group commit takes every intent batch and every
    outcome queued since the last one into one transaction (one fsync), on its own connection
    in a thread, so the event loop keeps sending (and the console keeps painting) while SQLite
    syncs. A group is as large as the queue grew during the previous commit: under load the
    commits get bigger, not more frequent. Intents still commit before their requests leave:
    `commit_intents` returns only after the COMMIT."""

    def __init__(self, store: Store, audit: AuditTrail, operator: str,
                 on_change: Callable[[Run], None]) -> None:
        self.store = store
        self.audit = audit
        self.operator = operator
        self.on_change = on_change
        self.broken: str | None = None  # why the database refused a write
        self._pending: list[_Pending] = []
        self._intent_jobs: list[_IntentJob] = []
        self._writing: asyncio.Task[None] | None = None
        self._writer: Store | None = None
        self._thread: ThreadPoolExecutor | None = None

    def _refused(self, error: BaseException) -> None:
        self.broken = self.broken or f"the database refused a write ({error})"

    # ------------------------------------------------------------------ batches
    def begin_batch(self, run: Run, approved: list[ApprovedItem]) -> None:
        with self.store.transaction():
            self.store.insert_batch(run.batch_id, self.operator, run.approved_sha,
                                    orjson.dumps([[i.merchant_id, i.order_id, i.version]
                                                  for i in approved]).decode())
            self.audit.append(operator=self.operator, action=AuditAction.APPROVAL,
                              batch_id=run.batch_id, approved_set_sha256=run.approved_sha,
                              detail=f"{len(approved)} orders approved")

    def finish_batch(self, run: Run) -> None:
        self.flush()
        summary = {o.value: n for o, n in run.counts.items()}
        try:
            with self.store.transaction():
                self.store.finish_batch(run.batch_id,
                                        "cancelled" if run.cancel.is_set() else "finished")
                if run.cancel.is_set():
                    self.audit.append(operator=self.operator, action=AuditAction.CANCEL,
                                      batch_id=run.batch_id,
                                      approved_set_sha256=run.approved_sha,
                                      detail="cancelled by the operator; calls in flight "
                                             "finished")
                self.audit.append(operator=self.operator,
                                  action=AuditAction.BATCH_FINISHED, batch_id=run.batch_id,
                                  approved_set_sha256=run.approved_sha,
                                  detail=orjson.dumps(summary).decode())
        except database_errors() as error:
            self._refused(error)

    # ------------------------------------------------------------------ intents
    def _write_intents(self, store: Store, run: Run, intents: list[Intent]) -> None:
        """Inside `store`'s open transaction: each intent gets the next attempt number for
        its (order, version), that attempt's key, its row and its audit entry."""
        now = utc_text()
        attempts = store.next_attempts([(i.item.order_id, i.item.version) for i in intents])
        rows = []
        entries: list[dict[str, Any]] = []
        for intent in intents:
            item = intent.item
            intent.attempt = attempts[item.order_id, item.version]
            intent.key = idempotency_key(item.order_id, item.version, intent.attempt)
            intent.body["idempotency_key"] = intent.key
            intent.intent_id = f"{run.batch_id}:{item.order_id}:{intent.attempt}"
            rows.append({
                "intent_id": intent.intent_id, "attempt": intent.attempt,
                "idempotency_key": intent.key, "batch_id": run.batch_id,
                "merchant_id": item.merchant_id, "order_id": item.order_id,
                "location_id": intent.location_id, "version": item.version,
                "amount": intent.amount, "currency": intent.currency,
                "consent_id": intent.consent_id, "consent_sha256": intent.consent_sha256,
                "operator": self.operator, "created_at": now,
                "body_json": orjson.dumps(intent.body).decode()})
            entries.append({
                "operator": self.operator, "action": AuditAction.INTENT,
                "merchant_id": item.merchant_id, "order_id": item.order_id,
                "version": item.version, "amount": intent.amount, "currency": intent.currency,
                "consent_id": intent.consent_id, "consent_sha256": intent.consent_sha256,
                "batch_id": run.batch_id, "approved_set_sha256": run.approved_sha,
                "idempotency_key": intent.key, "detail": f"attempt {intent.attempt}"})
        store.insert_intents(rows)
        self.audit.using(store).append_many(None, entries)

    def write_intents(self, run: Run, intents: list[Intent]) -> bool:
        """Committed (fsync) on the main connection before returning; False if not written.
        (The engine uses `commit_intents`, which joins the group commit.)"""
        self.flush()
        if self.broken:
            return False
        try:
            with self.store.transaction():
                self._write_intents(self.store, intents=intents, run=run)
        except database_errors() as error:
            self._refused(error)
            return False
        return True

    async def commit_intents(self, run: Run, intents: list[Intent]) -> bool:
        """Committed (fsync) before any of these requests leaves, in the next group commit
        with whatever else is queued (other merchants' intents, outcomes). False if not
        written."""
        if self.broken:
            return False
        done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._intent_jobs.append(_IntentJob(run, intents, done))
        self._kick()
        error = await done
        if error is not None:
            self._refused(error)
            return False
        return not self.broken

    # ------------------------------------------------------------------ outcomes
    def outcome(self, run: Run, intent: Intent, result: OrderResult | None,
                action: AuditAction = AuditAction.OUTCOME) -> None:
        """Queued for the next group commit. One lost in a crash leaves its intent open,
        which is exactly what `recover` settles."""
        if result is None:  # outcome unknown: the intent stays open for `recover`
            run.add(OrderResult.of(intent.item, Outcome.FAILED, "OUTCOME_UNKNOWN",
                                   "Square did not answer; `recover` will settle it."))
            self.on_change(run)
            return
        self._pending.append(_Pending(run, run.add(result), intent, result, action,
                                      run.batch_id))
        self._kick()
        self.on_change(run)

    def without_intent(self, run: Run, item: ApprovedItem, reason: str, detail: str,
                       outcome: Outcome = Outcome.SKIPPED) -> None:
        """Decided before any intent: no call is made, but the audit says why (in the next
        group commit)."""
        result = OrderResult.of(item, outcome, str(reason), detail)
        index = run.add(result)
        if not self.broken:
            self._pending.append(_Pending(run, index, None, result, AuditAction.OUTCOME,
                                          run.batch_id))
            self._kick()
        self.on_change(run)

    def _entry(self, p: _Pending) -> dict[str, Any]:
        result, intent = p.result, p.intent
        if intent is None:
            return {"operator": self.operator, "action": p.action,
                    "merchant_id": result.merchant_id, "order_id": result.order_id,
                    "version": result.version, "batch_id": p.batch_id,
                    "approved_set_sha256": p.run.approved_sha,
                    "outcome": result.outcome.value,
                    "detail": f"{result.reason}: {result.detail}"[:500]}
        square_code = result.reason if result.outcome is Outcome.FAILED else None
        return {"operator": self.operator, "action": p.action,
                "merchant_id": result.merchant_id, "order_id": result.order_id,
                "version": result.version, "amount": intent.amount,
                "currency": intent.currency, "consent_id": intent.consent_id,
                "consent_sha256": intent.consent_sha256, "batch_id": p.batch_id,
                "approved_set_sha256": p.run.approved_sha, "idempotency_key": intent.key,
                "outcome": result.outcome.value, "square_code": square_code,
                "detail": result.detail[:500]}

    def _write_outcomes(self, store: Store, pending: list[_Pending],
                        entries: list[dict[str, Any]]) -> None:
        store.settle_intents([
            (p.intent.intent_id, p.result.outcome.value, p.result.reason,
             p.result.reason if p.result.outcome is Outcome.FAILED else None, p.result.detail)
            for p in pending if p.intent is not None])
        self.audit.using(store).append_many(None, entries)
        store.drop_completed_orders(
            [p.result.order_id for p in pending
             if p.intent is not None and p.result.outcome is Outcome.COMPLETED])

    def _outcomes_refused(self, pending: list[_Pending], error: BaseException) -> None:
        self._refused(error)
        for p in pending:
            if p.intent is None or p.result.outcome is Outcome.SKIPPED:
                continue  # not sent (or refused by Square): nothing to claim either way
            # Square's answer is known only to this process now: never say completed.
            p.run.replace(p.index, OrderResult.of(
                p.intent.item, Outcome.FAILED, NOT_RECORDED,
                f"Square's answer ({p.result.outcome.value}) could not be written to the "
                f"database ({error}): run `recon-console recover`."))
            self.on_change(p.run)

    # ------------------------------------------------------------------ the writer
    def _kick(self) -> None:
        if self._writing is not None:
            return  # the running writer takes it in its next group
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._writing = loop.create_task(self._write_groups())

    async def _write_groups(self) -> None:
        try:
            while self._pending or self._intent_jobs:
                jobs, self._intent_jobs = self._intent_jobs, []
                pending, self._pending = self._pending, []
                if self.broken:
                    for job in jobs:
                        job.done.set_result(None)  # commit_intents reads `broken`
                    if pending:
                        self._outcomes_refused(pending, RuntimeError(self.broken))
                    continue
                entries = [self._entry(p) for p in pending]
                work: list[Callable[[Store], None]] = [
                    partial(self._write_intents, run=job.run, intents=job.intents)
                    for job in jobs]
                if pending:
                    work.append(partial(self._write_outcomes, pending=pending,
                                        entries=entries))
                errors = await self._commit(work)
                for job, error in zip(jobs, errors, strict=False):
                    if not job.done.done():
                        job.done.set_result(error)
                if pending and errors[-1] is not None:
                    self._outcomes_refused(pending, errors[-1])
        finally:
            self._writing = None

    async def _commit(self, work: list[Callable[[Store], None]]
                      ) -> list[BaseException | None]:
        if self._thread is None:
            self._writer = self.store.writer()
            if self._writer is None:  # in-memory: the one connection, on the loop
                return self.store.commit_group(work)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="journal")
        if self._writer is None:
            return self.store.commit_group(work)
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._writer.commit_group, work)

    async def drain(self) -> None:
        """Return when everything queued so far is committed (or refused)."""
        while self._writing is not None:
            await asyncio.shield(self._writing)

    def flush(self) -> None:
        """Commit what is queued now, on the main connection (outside the event loop's group
        commits: at the end of a batch, or where no loop runs)."""
        if self._writing is not None:
            return  # the writer commits it
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self.broken:
            self._outcomes_refused(pending, RuntimeError(self.broken))
            return
        entries = [self._entry(p) for p in pending]
        errors = self.store.commit_group([partial(
            self._write_outcomes, pending=pending, entries=entries)])
        if errors[0] is not None:
            self._outcomes_refused(pending, errors[0])

    def close(self) -> None:
        """Stop the writer thread and close its connection (after `drain`)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._writer is not None and self._writer is not self.store:
            self._writer.close()
        self._writer = None
