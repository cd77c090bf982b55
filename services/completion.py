"""The completion engine: completes exactly the approved (order, version) pairs, or says why not.

For each approved order, in order:
  1. re-read it from Square (BatchRetrieveOrders, 100 at a time) and re-check it with
     `classify` against the consents in the database at that moment;
  2. write the intent (its own committed transaction, with its audit entry) before the request;
  3. right before sending, check cancel, the merchant's token and consent once more;
  4. UpdateOrder: state COMPLETED plus every non-terminal fulfillment, at the approved version,
     idempotency key `recon-complete:{order_id}:{version}`; 5xx, timeouts and lost responses are
     retried with the same key; 429 waits for Retry-After and halves the concurrency;
  5. write the outcome: completed only if Square's answer shows the order COMPLETED.

A crash anywhere leaves intents without outcomes; `recover` settles each against Square.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from services.audit import AuditAction, AuditTrail
from services.consent import ConsentRecord
from services.credentials import MerchantCredentials
from services.eligibility import Classification, EligibilityReason, classify
from services.errors import (
    ReconError,
    SquareApiError,
    SquareAuthError,
    SquareRateLimited,
    SquareScopeError,
    SquareServerError,
    SquareUnavailable,
)
from services.square_gateway import SquareGateway
from services.square_models import SquareOrder
from services.store import Store, utc_text

__all__ = ["ApprovedItem", "BatchProgress", "CompletionEngine", "OrderResult", "Outcome",
           "SkipReason", "approved_set_sha256", "idempotency_key"]


class Outcome(StrEnum):
    COMPLETED = "completed"
    SKIPPED = "skipped"
    FAILED = "failed"


class SkipReason(StrEnum):
    VERSION_CHANGED = "VERSION_CHANGED"
    NO_LONGER_ELIGIBLE = "NO_LONGER_ELIGIBLE"
    CONSENT_REVOKED = "CONSENT_REVOKED"
    CONSENT_EXPIRED = "CONSENT_EXPIRED"
    NO_CONSENT = "NO_CONSENT"
    OUTSIDE_CONSENT_SCOPE = "OUTSIDE_CONSENT_SCOPE"
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    NOT_FOUND = "NOT_FOUND"
    TOKEN_REJECTED = "TOKEN_REJECTED"
    NO_CREDENTIALS = "NO_CREDENTIALS"
    CANCELLED = "CANCELLED"


_CONSENT_SKIPS = {
    EligibilityReason.CONSENT_REVOKED: SkipReason.CONSENT_REVOKED,
    EligibilityReason.CONSENT_EXPIRED: SkipReason.CONSENT_EXPIRED,
    EligibilityReason.CONSENT_NOT_YET_EFFECTIVE: SkipReason.NO_CONSENT,
    EligibilityReason.NO_CONSENT: SkipReason.NO_CONSENT,
    EligibilityReason.OUTSIDE_CONSENT_SCOPE: SkipReason.OUTSIDE_CONSENT_SCOPE,
}


def _skip_for(verdict: Classification) -> tuple[SkipReason, str]:
    """Why an order that is no longer eligible is skipped: consent reasons keep their name."""
    assert verdict.reason is not None
    skip = _CONSENT_SKIPS.get(verdict.reason, SkipReason.NO_LONGER_ELIGIBLE)
    return skip, f"{verdict.reason.value}: {verdict.detail}"


@dataclass(frozen=True, order=True)
class ApprovedItem:
    merchant_id: str
    order_id: str
    version: int


def approved_set_sha256(items: Sequence[ApprovedItem]) -> str:
    canonical = orjson.dumps(sorted([i.merchant_id, i.order_id, i.version] for i in items))
    return hashlib.sha256(canonical).hexdigest()


def idempotency_key(order_id: str, version: int) -> str:
    """Derived from (order, version): a retry of the same attempt can never apply twice, and
    a new version is a new decision. Square allows 192 characters."""
    key = f"recon-complete:{order_id}:{version}"
    return key if len(key) <= 192 else "recon-complete:" + hashlib.sha256(
        key.encode()).hexdigest()


@dataclass(frozen=True)
class OrderResult:
    merchant_id: str
    order_id: str
    version: int
    outcome: Outcome
    reason: str | None
    detail: str

    @classmethod
    def of(cls, item: ApprovedItem, outcome: Outcome, reason: str | None, detail: str
           ) -> OrderResult:
        return cls(item.merchant_id, item.order_id, item.version, outcome, reason, detail)

    def to_json(self) -> dict[str, Any]:
        return {"merchant_id": self.merchant_id, "order_id": self.order_id,
                "version": self.version, "outcome": self.outcome.value, "reason": self.reason,
                "detail": self.detail}


@dataclass(frozen=True)
class BatchProgress:
    done: int
    total: int
    completed: int
    skipped: int
    failed: int
    rate_per_s: float
    eta_s: float | None
    backing_off: bool
    concurrency: int
    cancelled: bool = False


class AdaptiveLimit:
    """Concurrency that halves on 429 and grows back by one after a window of successes."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self._successes = 0
        self._changed = asyncio.Condition()
        self.backing_off_until = 0.0

    async def __aenter__(self) -> AdaptiveLimit:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        async with self._changed:
            self.in_flight -= 1
            # Wake only as many waiters as there are free slots: waking all of them on every
            # release made hundreds of tasks re-check for nothing (O(n) per completed order).
            self._changed.notify(max(0, self.limit - self.in_flight))

    def rate_limited(self, wait_s: float) -> None:
        self.limit = max(1, self.limit // 2)
        self._successes = 0
        self.backing_off_until = max(self.backing_off_until, time.monotonic() + wait_s)

    def succeeded(self) -> None:
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self.limit += 1
            self._successes = 0

    @property
    def backing_off(self) -> bool:
        return time.monotonic() < self.backing_off_until


@dataclass
class _Intent:
    item: ApprovedItem
    key: str
    body: dict[str, Any]
    location_id: str
    amount: int
    currency: str
    consent_id: str | None
    consent_sha256: str | None


@dataclass
class _Run:
    batch_id: str
    approved_sha: str
    total: int
    cancel: asyncio.Event
    on_progress: Callable[[BatchProgress], None] | None
    started: float = field(default_factory=time.monotonic)
    results: list[OrderResult] = field(default_factory=list)
    rejected_tokens: dict[str, str] = field(default_factory=dict)


class CompletionEngine:
    def __init__(self, store: Store, audit: AuditTrail, gateway: SquareGateway,
                 credentials: dict[str, MerchantCredentials],
                 consents_for: Callable[[str], list[tuple[ConsentRecord, str]]],
                 clock: Callable[[], datetime], operator: str, *,
                 per_merchant: int = 4, overall: int = 32, max_attempts: int = 5,
                 max_rate_limit_waits: int = 12, attempt_timeout_s: float = 15.0,
                 base_backoff_s: float = 0.2, rng: random.Random | None = None) -> None:
        self.store = store
        self.audit = audit
        self.gateway = gateway
        self.credentials = credentials
        self.consents_for = consents_for
        self.clock = clock
        self.operator = operator
        self.per_merchant = per_merchant
        self.limit = AdaptiveLimit(overall)
        self.max_attempts = max_attempts
        self.max_rate_limit_waits = max_rate_limit_waits
        self.attempt_timeout_s = attempt_timeout_s
        self.base_backoff_s = base_backoff_s
        self.rng = rng or random.Random()
        self._pending: list[tuple[str, str, _Intent, OrderResult, AuditAction]] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ the batch
    async def run(self, items: Sequence[ApprovedItem], *, batch_id: str | None = None,
                  cancel: asyncio.Event | None = None,
                  on_progress: Callable[[BatchProgress], None] | None = None
                  ) -> tuple[str, list[OrderResult]]:
        batch_id = batch_id or str(uuid.uuid4())
        approved = sorted(set(items))
        sha = approved_set_sha256(approved)
        run = _Run(batch_id, sha, len(approved), cancel or asyncio.Event(), on_progress)
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [batch_id, self.operator, utc_text(), sha,
                          orjson.dumps([[i.merchant_id, i.order_id, i.version]
                                        for i in approved]).decode(), "running", None])
            self.audit.append(conn, operator=self.operator, action=AuditAction.APPROVAL,
                              batch_id=batch_id, approved_set_sha256=sha,
                              detail=f"{len(approved)} orders approved")
        by_merchant: dict[str, list[ApprovedItem]] = {}
        for item in approved:
            by_merchant.setdefault(item.merchant_id, []).append(item)
        try:
            await asyncio.gather(*(self._run_merchant(run, merchant_id, merchant_items)
                                   for merchant_id, merchant_items in by_merchant.items()))
        finally:
            self.flush_outcomes()
        status = "cancelled" if run.cancel.is_set() else "finished"
        summary = {o.value: sum(1 for r in run.results if r.outcome is o) for o in Outcome}
        with self.store.transaction() as conn:
            conn.execute("UPDATE batches SET status = ?, finished_at = ? WHERE batch_id = ?",
                         [status, utc_text(), batch_id])
            if run.cancel.is_set():
                self.audit.append(conn, operator=self.operator, action=AuditAction.CANCEL,
                                  batch_id=batch_id, approved_set_sha256=sha,
                                  detail="cancelled by the operator; calls in flight finished")
            self.audit.append(conn, operator=self.operator, action=AuditAction.BATCH_FINISHED,
                              batch_id=batch_id, approved_set_sha256=sha,
                              detail=orjson.dumps(summary).decode())
        self._progress(run)
        return batch_id, run.results

    async def _run_merchant(self, run: _Run, merchant_id: str, items: list[ApprovedItem]
                            ) -> None:
        creds = self.credentials.get(merchant_id)
        if creds is None:
            for item in items:
                self._record_without_intent(run, item, SkipReason.NO_CREDENTIALS,
                                            "No access token for this merchant.")
            return
        gate = asyncio.Semaphore(self.per_merchant)
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            if run.cancel.is_set() or merchant_id in run.rejected_tokens:
                for item in chunk:
                    self._skip_unsent(run, item)
                continue
            try:
                current = {o.id: o for o in await self.gateway.batch_retrieve(
                    creds, [i.order_id for i in chunk])}
            except ReconError as error:
                if isinstance(error, (SquareAuthError, SquareScopeError)):
                    run.rejected_tokens[merchant_id] = str(error)
                for item in chunk:
                    self._record_without_intent(
                        run, item, SkipReason.TOKEN_REJECTED if merchant_id in
                        run.rejected_tokens else SkipReason.NOT_FOUND,
                        f"Could not re-read the order before sending: {error}",
                        outcome=Outcome.SKIPPED if merchant_id in run.rejected_tokens
                        else Outcome.FAILED)
                continue
            intents = []
            for item in chunk:
                order = current.get(item.order_id)
                intent_or_skip = self._check(item, order)
                if isinstance(intent_or_skip, _Intent):
                    intents.append(intent_or_skip)
                else:
                    reason, detail = intent_or_skip
                    self._record_without_intent(run, item, reason, detail)
            if not intents:
                continue
            if run.cancel.is_set():
                for intent in intents:
                    self._skip_unsent(run, intent.item)
                continue
            self._write_intents(run, intents)

            async def send(intent: _Intent) -> None:
                async with gate:
                    result = await self._send(run, creds, intent)
                self._write_outcome(run, intent, result)

            await asyncio.gather(*(send(intent) for intent in intents))

    def _check(self, item: ApprovedItem, order: SquareOrder | None
               ) -> _Intent | tuple[SkipReason, str]:
        if order is None:
            return SkipReason.NOT_FOUND, "Square no longer returns this order."
        if order.state == "COMPLETED":
            return SkipReason.ALREADY_COMPLETED, f"Already COMPLETED at version {order.version}."
        if order.version != item.version:
            return (SkipReason.VERSION_CHANGED,
                    f"Version is now {order.version}, approved {item.version}: back to the "
                    "queue for a new decision.")
        consents = self.consents_for(item.merchant_id)
        verdict = classify(order, [c for c, _ in consents], self.clock())
        if not verdict.eligible:
            return _skip_for(verdict)
        consent = verdict.consent
        consent_sha = next((sha for c, sha in consents if consent is not None
                            and c.consent_id == consent.consent_id), None)
        key = idempotency_key(order.id, item.version)
        body = {"idempotency_key": key,
                "order": {"location_id": order.location_id, "version": item.version,
                          "state": "COMPLETED",
                          "fulfillments": [{"uid": f.uid, "state": "COMPLETED"}
                                           for f in order.fulfillments if not f.terminal]}}
        if not body["order"]["fulfillments"]:  # type: ignore[index]
            del body["order"]["fulfillments"]  # type: ignore[attr-defined]
        return _Intent(item, key, body, order.location_id, order.total_amount, order.currency,
                       consent.consent_id if consent else None, consent_sha)

    # ------------------------------------------------------------------ durable records
    def _write_intents(self, run: _Run, intents: list[_Intent]) -> None:
        """Committed (fsync) before any of these requests leaves."""
        self.flush_outcomes()
        now = utc_text()
        with self.store.transaction() as conn:
            for intent in intents:
                item = intent.item
                conn.execute(
                    "INSERT OR IGNORE INTO intents (idempotency_key, batch_id, merchant_id, "
                    "order_id, location_id, version, amount, currency, consent_id, "
                    "consent_sha256, operator, created_at, body_json) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [intent.key, run.batch_id, item.merchant_id, item.order_id,
                     intent.location_id, item.version, intent.amount, intent.currency,
                     intent.consent_id, intent.consent_sha256, self.operator, now,
                     orjson.dumps(intent.body).decode()])
                self.audit.append(conn, operator=self.operator, action=AuditAction.INTENT,
                                  merchant_id=item.merchant_id, order_id=item.order_id,
                                  version=item.version, amount=intent.amount,
                                  currency=intent.currency, consent_id=intent.consent_id,
                                  consent_sha256=intent.consent_sha256, batch_id=run.batch_id,
                                  approved_set_sha256=run.approved_sha,
                                  idempotency_key=intent.key)

    def _write_outcome(self, run: _Run, intent: _Intent, result: OrderResult | None,
                       action: AuditAction = AuditAction.OUTCOME) -> None:
        """Outcomes are group-committed (every 50, or 25 ms): one fsync for many. One lost
        in a crash leaves its intent open, which is exactly what `recover` settles."""
        if result is None:  # outcome unknown: the intent stays open for `recover`
            item = intent.item
            run.results.append(OrderResult.of(
                item, Outcome.FAILED, "OUTCOME_UNKNOWN",
                "Square did not answer; `recover` will settle it."))
            self._progress(run)
            return
        self._pending.append((run.batch_id, run.approved_sha, intent, result, action))
        if len(self._pending) >= 50:
            self.flush_outcomes()
        elif self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_outcomes()
            else:
                self._flush_timer = loop.call_later(0.025, self.flush_outcomes)
        run.results.append(result)
        self._progress(run)

    def flush_outcomes(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        now = utc_text()
        with self.store.transaction() as conn:
            for batch_id, approved_sha, intent, result, action in pending:
                square_code = result.reason if result.outcome is Outcome.FAILED else None
                conn.execute("UPDATE intents SET outcome = ?, reason = ?, square_code = ?, "
                             "detail = ?, settled_at = ? WHERE idempotency_key = ?",
                             [result.outcome.value, result.reason, square_code, result.detail,
                              now, intent.key])
                self.audit.append(conn, operator=self.operator, action=action,
                                  merchant_id=result.merchant_id, order_id=result.order_id,
                                  version=result.version, amount=intent.amount,
                                  currency=intent.currency, consent_id=intent.consent_id,
                                  consent_sha256=intent.consent_sha256, batch_id=batch_id,
                                  approved_set_sha256=approved_sha,
                                  idempotency_key=intent.key, outcome=result.outcome.value,
                                  square_code=square_code, detail=result.detail[:500])
                if result.outcome is Outcome.COMPLETED:
                    conn.execute("DELETE FROM orders WHERE order_id = ?", [result.order_id])

    def _record_without_intent(self, run: _Run, item: ApprovedItem, reason: SkipReason,
                               detail: str, outcome: Outcome = Outcome.SKIPPED) -> None:
        """Decided before any intent: no call is made, but the audit says why."""
        self.flush_outcomes()
        self.audit.append(operator=self.operator, action=AuditAction.OUTCOME,
                          merchant_id=item.merchant_id, order_id=item.order_id,
                          version=item.version, batch_id=run.batch_id,
                          approved_set_sha256=run.approved_sha, outcome=outcome.value,
                          detail=f"{reason.value}: {detail}"[:500])
        run.results.append(OrderResult.of(item, outcome, reason.value, detail))
        self._progress(run)

    def _skip_unsent(self, run: _Run, item: ApprovedItem) -> None:
        if run.cancel.is_set():
            self._record_without_intent(run, item, SkipReason.CANCELLED,
                                        "Cancelled before it was sent.")
        else:
            self._record_without_intent(run, item, SkipReason.TOKEN_REJECTED,
                                        run.rejected_tokens.get(item.merchant_id, ""))

    # ------------------------------------------------------------------ the call
    async def _send(self, run: _Run, creds: MerchantCredentials, intent: _Intent
                    ) -> OrderResult | None:
        """Send one intent (retrying with its key); None if the outcome stays unknown."""
        item = intent.item

        def result(outcome: Outcome, reason: str | None, detail: str) -> OrderResult:
            return OrderResult.of(item, outcome, reason, detail)

        # The last look before the call: cancel, token, and consent at this very moment.
        if run.cancel.is_set():
            return result(Outcome.SKIPPED, SkipReason.CANCELLED, "Cancelled before it was sent.")
        if item.merchant_id in run.rejected_tokens:
            return result(Outcome.SKIPPED, SkipReason.TOKEN_REJECTED,
                          run.rejected_tokens[item.merchant_id])
        consent_problem = self._consent_problem(intent)
        if consent_problem is not None:
            return result(Outcome.SKIPPED, consent_problem[0], consent_problem[1])
        attempts = 0
        rate_waits = 0
        uncertain = False  # a request may have reached Square without us seeing the answer
        while True:
            attempts += 1
            try:
                async with self.limit:
                    order = await self.gateway.update_order(creds, item.order_id, intent.body,
                                                            timeout_s=self.attempt_timeout_s)
            except SquareRateLimited as error:
                rate_waits += 1
                wait = error.retry_after if error.retry_after is not None else \
                    self._backoff(rate_waits)
                self.limit.rate_limited(wait)
                self._progress(run)
                if rate_waits > self.max_rate_limit_waits:
                    if uncertain:
                        return None
                    return result(Outcome.FAILED, "RATE_LIMITED",
                                  "Square kept rate limiting; retry the failed orders later.")
                attempts -= 1
                await asyncio.sleep(wait)
                continue
            except (SquareServerError, SquareUnavailable) as error:
                uncertain = True
                if attempts >= self.max_attempts:
                    return None
                await asyncio.sleep(self._backoff(attempts))
                del error
                continue
            except (SquareAuthError, SquareScopeError) as error:
                run.rejected_tokens[item.merchant_id] = str(error)
                if uncertain:
                    return None
                return result(Outcome.FAILED, error.code, str(error))
            except SquareApiError as error:
                if error.code == "VERSION_MISMATCH" or error.status == 409:
                    if uncertain:
                        return None  # maybe our own earlier attempt moved it: let recover look
                    return result(Outcome.SKIPPED, SkipReason.VERSION_CHANGED,
                                  f"{error.code}: {error.detail}")
                if uncertain:
                    return None
                return result(Outcome.FAILED, error.code, error.detail)
            self.limit.succeeded()
            if order is not None and order.state == "COMPLETED":
                return result(Outcome.COMPLETED, None,
                              f"COMPLETED at version {order.version}.")
            state = order.state if order is not None else "missing"
            return result(Outcome.FAILED, "NOT_COMPLETED",
                          f"Square answered 200 but the order is {state}: nothing was "
                          "completed.")

    def _consent_problem(self, intent: _Intent) -> tuple[SkipReason, str] | None:
        consents = self.consents_for(intent.item.merchant_id)
        now = self.clock()
        relied = next((c for c, _ in consents if c.consent_id == intent.consent_id), None)
        if relied is None:
            return SkipReason.NO_CONSENT, "The consent relied on is gone."
        status = relied.status_at(now).value
        if status != "active":
            reason = {"revoked": SkipReason.CONSENT_REVOKED,
                      "expired": SkipReason.CONSENT_EXPIRED}.get(status, SkipReason.NO_CONSENT)
            return reason, f"Consent {relied.consent_id} is {status}."
        if not relied.covers_location(intent.location_id):
            return SkipReason.OUTSIDE_CONSENT_SCOPE, "Consent no longer covers the location."
        return None

    def _backoff(self, attempt: int) -> float:
        return min(10.0, self.base_backoff_s * 2 ** (attempt - 1)) * (0.5 + self.rng.random())

    def _progress(self, run: _Run) -> None:
        if run.on_progress is None:
            return
        done = len(run.results)
        elapsed = max(1e-6, time.monotonic() - run.started)
        rate = done / elapsed
        counts = {o: 0 for o in Outcome}
        for r in run.results:
            counts[r.outcome] += 1
        run.on_progress(BatchProgress(
            done=done, total=run.total, completed=counts[Outcome.COMPLETED],
            skipped=counts[Outcome.SKIPPED], failed=counts[Outcome.FAILED],
            rate_per_s=rate, eta_s=(run.total - done) / rate if rate > 0 else None,
            backing_off=self.limit.backing_off, concurrency=self.limit.limit,
            cancelled=run.cancel.is_set()))

    # ------------------------------------------------------------------ recovery
    def open_intents(self) -> list[dict[str, Any]]:
        cursor = self.store.conn.execute(
            "SELECT idempotency_key, batch_id, merchant_id, order_id, location_id, version, "
            "amount, currency, consent_id, consent_sha256, body_json FROM intents "
            "WHERE outcome IS NULL ORDER BY created_at")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    async def recover(self) -> list[OrderResult]:
        """Settle every intent that has no outcome: completed by us at version+1; still open
        at the approved version and still eligible, so resent with the same key; otherwise
        skipped with the reason."""
        pending = self.open_intents()
        results: list[OrderResult] = []
        if not pending:
            return results
        run = _Run("recovery", "", len(pending), asyncio.Event(), None)
        by_merchant: dict[str, list[dict[str, Any]]] = {}
        for row in pending:
            by_merchant.setdefault(row["merchant_id"], []).append(row)
        for merchant_id, rows in by_merchant.items():
            creds = self.credentials.get(merchant_id)
            if creds is None:
                continue  # cannot ask Square: stays open, and `recover` says so
            try:
                current = {o.id: o for o in await self.gateway.batch_retrieve(
                    creds, [r["order_id"] for r in rows])}
            except ReconError:
                continue
            for row in rows:
                intent = _Intent(ApprovedItem(merchant_id, row["order_id"], row["version"]),
                                 row["idempotency_key"], orjson.loads(row["body_json"]),
                                 row["location_id"], row["amount"], row["currency"],
                                 row["consent_id"], row["consent_sha256"])
                run.batch_id = row["batch_id"]
                result = await self._settle(run, creds, intent, current.get(row["order_id"]))
                self._write_outcome(run, intent, result, action=AuditAction.RECOVERY)
                if result is not None:
                    results.append(result)
        self.flush_outcomes()
        return results

    async def _settle(self, run: _Run, creds: MerchantCredentials, intent: _Intent,
                      order: SquareOrder | None) -> OrderResult | None:
        item = intent.item

        def result(outcome: Outcome, reason: str | None, detail: str) -> OrderResult:
            return OrderResult.of(item, outcome, reason, detail)

        if order is None:
            return result(Outcome.SKIPPED, SkipReason.NOT_FOUND, "Square no longer returns it.")
        if order.state == "COMPLETED" and order.version == item.version + 1:
            return result(Outcome.COMPLETED, None,
                          f"Found COMPLETED at version {order.version}: our update applied.")
        if order.state == "COMPLETED":
            return result(Outcome.SKIPPED, SkipReason.ALREADY_COMPLETED,
                          f"COMPLETED at version {order.version}, not by this intent.")
        if order.version != item.version:
            return result(Outcome.SKIPPED, SkipReason.VERSION_CHANGED,
                          f"Version is now {order.version}; not resent.")
        consents = self.consents_for(item.merchant_id)
        verdict = classify(order, [c for c, _ in consents], self.clock())
        if not verdict.eligible:
            return result(Outcome.SKIPPED, *_skip_for(verdict))
        return await self._send(run, creds, intent)
