"""The completion engine: completes exactly the approved (order, version) pairs, or says why not.

First, four-eyes (`approvals`): a batch over the threshold, or run under a prepared batch id,
must carry a second operator's valid approval of exactly this set, or nothing is sent.
Then, for each merchant of the approved set, under its lease (`leases`):
  1. settle what an earlier holder left open (`recovery`), then re-read the orders from Square
     (BatchRetrieveOrders, 100 at a time) and re-check each with `classify` against the
     consents in the database at that moment; a merchant whose re-read fails is not attempted;
  2. write the intent, one row per attempt (`journal`), before the request;
  3. send it (`sending`): the last look, then UpdateOrder at the approved version;
  4. write the outcome: completed only if Square's answer shows the order COMPLETED.

A crash anywhere leaves intents without outcomes; `recover` settles each against Square.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from services.audit import AuditTrail
from services.completion.approvals import Approvals, FourEyesPolicy
from services.completion.journal import IntentJournal, Run
from services.completion.leases import LeaseKeeper
from services.completion.limits import AdaptiveLimit, Backoff, CircuitBreaker
from services.completion.model import (
    ApprovedItem,
    BatchProgress,
    Intent,
    OrderResult,
    Outcome,
    SkipReason,
    approved_set_sha256,
    skip_for,
)
from services.completion.recovery import Recovery
from services.completion.sending import ConsentReads, RemoteConsents, Sender
from services.consent import ConsentRecord
from services.credentials import MerchantCredentials
from services.eligibility import classify
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
from services.square_models import OrderLike
from services.store import Lease, Store

__all__ = ["CompletionEngine"]

_TRANSIENT = (SquareUnavailable, SquareServerError, SquareRateLimited)


class CompletionEngine:
    """The facade: `run` a batch, `recover` open intents. The parts do the work."""

    def __init__(self, store: Store, audit: AuditTrail, gateway: SquareGateway,
                 credentials: dict[str, MerchantCredentials],
                 consents_for: Callable[[str], list[tuple[ConsentRecord, str]]],
                 clock: Callable[[], datetime], operator: str, *,
                 per_merchant: int = 4, max_per_merchant: int = 16, overall: int = 64,
                 max_attempts: int = 5,
                 max_rate_limit_waits: int = 12, attempt_timeout_s: float = 15.0,
                 base_backoff_s: float = 0.2, breaker_threshold: int = 3,
                 lease_ttl_s: float = 30.0, heartbeat_s: float = 5.0,
                 rng: random.Random | None = None,
                 four_eyes: FourEyesPolicy | None = None) -> None:
        self.store = store
        self.gateway = gateway
        self.credentials = credentials
        self.consents_for = consents_for
        self.clock = clock
        self.operator = operator
        self.per_merchant = per_merchant
        self.limit = AdaptiveLimit(overall)
        self.breaker = CircuitBreaker(breaker_threshold)
        self.journal = IntentJournal(store, audit, operator, self._progress)
        # Always on: a caller that passes no policy gets the default thresholds.
        self.approvals = Approvals(store, audit, four_eyes or FourEyesPolicy(), clock)
        self.leases = LeaseKeeper(store, operator, ttl_s=lease_ttl_s, heartbeat_s=heartbeat_s)
        self.sender = Sender(gateway, self.journal, self.leases, consents_for, clock,
                             limit=self.limit, backoff=Backoff(base_backoff_s, rng=rng),
                             breaker=self.breaker, per_merchant=per_merchant,
                             max_per_merchant=max_per_merchant, max_attempts=max_attempts,
                             max_rate_limit_waits=max_rate_limit_waits,
                             attempt_timeout_s=attempt_timeout_s, on_change=self._progress)
        if isinstance(store, RemoteConsents):  # each read a round trip: shared
            self.sender.consent_reads = ConsentReads(store, consents_for)
        self.recovery = Recovery(gateway, self.journal, self.leases, self.sender, credentials,
                                 consents_for, clock)

    # ------------------------------------------------------------------ the batch
    async def run(self, items: Sequence[ApprovedItem], *, batch_id: str | None = None,
                  cancel: asyncio.Event | None = None,
                  on_progress: Callable[[BatchProgress], None] | None = None
                  ) -> tuple[str, list[OrderResult]]:
        approved = sorted(set(items))
        # Before any intent or request: raises ApprovalRefused (audited) when four-eyes
        # forbids this exact set now.
        self.approvals.gate(batch_id, approved, self.operator)
        run = Run(batch_id or str(uuid.uuid4()), approved_set_sha256(approved), len(approved),
                  cancel or asyncio.Event(), on_progress)
        self.journal.begin_batch(run, approved)
        by_merchant: dict[str, list[ApprovedItem]] = {}
        for item in approved:
            by_merchant.setdefault(item.merchant_id, []).append(item)
        try:
            async with self.leases:
                # Every lease at once: one durable commit, not one per merchant on the loop.
                holders = self.leases.take_all([m for m in by_merchant if m in self.credentials])
                await asyncio.gather(*(self._run_merchant(run, merchant_id, merchant_items,
                                                          holders.get(merchant_id))
                                       for merchant_id, merchant_items in by_merchant.items()))
        finally:
            await self.journal.drain()
            self.journal.close()
            await self._close_reads()
        self.journal.finish_batch(run)
        self._progress(run)
        return run.batch_id, run.results

    async def recover(self) -> list[OrderResult]:
        try:
            return await self.recovery.recover()
        finally:
            await self.journal.drain()
            self.journal.close()
            await self._close_reads()

    async def _close_reads(self) -> None:
        if self.sender.consent_reads is not None:
            await self.sender.consent_reads.aclose()

    def _skip_all(self, run: Run, items: Sequence[ApprovedItem], reason: str,
                  detail: str, outcome: Outcome = Outcome.SKIPPED) -> None:
        for item in items:
            self.journal.without_intent(run, item, reason, detail, outcome)

    async def _run_merchant(self, run: Run, merchant_id: str, items: list[ApprovedItem],
                            holder: Lease | None) -> None:
        """`holder`: who held the merchant's lease when `run` took them (None: this run)."""
        creds = self.credentials.get(merchant_id)
        if creds is None:
            self._skip_all(run, items, SkipReason.NO_CREDENTIALS,
                           "No access token for this merchant.")
            return
        if holder is not None:
            self._skip_all(run, items, SkipReason.LEASED,
                           f"Another run holds this merchant: {holder.describe()}. Its orders "
                           "stay in the queue.")
            return
        try:
            # What a gone holder (or a crash) left open is settled before anything new; an
            # order that settling completed is reported as such (e.g. retrying the failed).
            recovered = Run("recovery", "", 0)
            had_open = await self.recovery.settle_merchant(recovered, merchant_id)
            settled = {(r.order_id, r.version): r for r in recovered.results
                       if r.outcome is Outcome.COMPLETED}
            # (None open before settling: none after. Not read again: a round trip less on
            # the event loop per merchant, on PostgreSQL.)
            unsettled = ({row["order_id"] for row in self.store.open_intents(merchant_id)}
                         if had_open else set())
            for item in items:
                if (item.order_id, item.version) in settled:
                    run.add(settled[item.order_id, item.version])
                    self._progress(run)
            items = [i for i in items if (i.order_id, i.version) not in settled]
            for start in range(0, len(items), 100):
                await self._run_chunk(run, merchant_id, creds, items[start:start + 100],
                                      unsettled)
                await self.sender.budget.turn()  # let the console paint and take keys
        finally:
            await self.journal.drain()  # outcomes are durable before the lease lets anyone in
            await self.leases.release_soon(merchant_id)

    async def _run_chunk(self, run: Run, merchant_id: str, creds: MerchantCredentials,
                         chunk: list[ApprovedItem], unsettled: set[str]) -> None:
        stop = self.sender.stop_reason(run, merchant_id)
        if stop is not None:
            self._skip_all(run, chunk, *stop)
            return
        try:
            current = {o.id: o for o in await self.gateway.batch_retrieve(
                creds, [i.order_id for i in chunk])}
        except ReconError as error:
            self._reread_failed(run, merchant_id, chunk, error)
            return
        # Read once for the chunk: the loop below never yields, so this is as fresh as one
        # read per order. Not the last look: each send reads them again at its own moment
        # (`Sender.consent_problem`), so a change committed meanwhile still stops it.
        reads = self.sender.consent_reads
        consents = (self.consents_for(merchant_id) if reads is None
                    else await reads.current(merchant_id))
        intents = []
        for item in chunk:
            if item.order_id in unsettled:
                self.journal.without_intent(
                    run, item, SkipReason.SQUARE_UNREACHABLE,
                    "An earlier attempt's outcome is still unknown: not sent again until "
                    "`recon-console recover` settles it.")
                continue
            intent_or_skip = self._check(item, current.get(item.order_id), consents)
            if isinstance(intent_or_skip, Intent):
                intents.append(intent_or_skip)
            else:
                self.journal.without_intent(run, item, *intent_or_skip)
        stop = self.sender.stop_reason(run, merchant_id)
        if stop is not None:
            self._skip_all(run, [i.item for i in intents], *stop)
            return
        if not intents:
            return
        if not await self.journal.commit_intents(run, intents):
            self._skip_all(run, [i.item for i in intents], SkipReason.DATABASE_UNWRITABLE,
                           f"Not sent: {self.journal.broken}.")
            return
        async def send(intent: Intent) -> None:
            result = await self.sender.send(run, creds, intent)
            self.journal.outcome(run, intent, result)

        await asyncio.gather(*(send(intent) for intent in intents))

    def _reread_failed(self, run: Run, merchant_id: str, chunk: list[ApprovedItem],
                       error: ReconError) -> None:
        """Record what happened: a refused token, an unreachable Square (nothing more is sent
        to this merchant), or Square's own error. Never NOT_FOUND: nothing says it is gone."""
        detail = f"Could not re-read the order before sending: {error}"
        if isinstance(error, (SquareAuthError, SquareScopeError)):
            self.sender.reject_token(merchant_id, error)
            self._skip_all(run, chunk, self.sender.rejected_tokens[merchant_id][0], detail)
        elif isinstance(error, _TRANSIENT):
            self.breaker.trip(merchant_id, detail)
            self._skip_all(run, chunk, SkipReason.SQUARE_UNREACHABLE, detail)
        else:
            code = error.code if isinstance(error, SquareApiError) else type(error).__name__
            self._skip_all(run, chunk, code, detail, Outcome.FAILED)

    def _check(self, item: ApprovedItem, order: OrderLike | None,
               consents: list[tuple[ConsentRecord, str]] | None = None
               ) -> Intent | tuple[SkipReason, str]:
        if order is None:
            return SkipReason.NOT_FOUND, "Square no longer returns this order."
        if order.state == "COMPLETED":
            return SkipReason.ALREADY_COMPLETED, f"Already COMPLETED at version {order.version}."
        if order.version != item.version:
            return (SkipReason.VERSION_CHANGED,
                    f"Version is now {order.version}, approved {item.version}: back to the "
                    "queue for a new decision.")
        if consents is None:
            consents = self.consents_for(item.merchant_id)
        verdict = classify(order, [c for c, _ in consents], self.clock())
        if not verdict.eligible:
            return skip_for(verdict)
        consent = verdict.consent
        consent_sha = next((sha for c, sha in consents if consent is not None
                            and c.consent_id == consent.consent_id), None)
        order_body: dict[str, object] = {"location_id": order.location_id,
                                          "version": item.version, "state": "COMPLETED"}
        fulfillments = [{"uid": f.uid, "state": "COMPLETED"}
                        for f in order.fulfillments if not f.terminal]
        if fulfillments:
            order_body["fulfillments"] = fulfillments
        # The key is set when the intent is written and its attempt number is known.
        return Intent(item, "", {"idempotency_key": "", "order": order_body},
                      order.location_id, order.total_amount, order.currency,
                      consent.consent_id if consent else None, consent_sha)

    def _progress(self, run: Run) -> None:
        if run.on_progress is not None:
            run.on_progress(run.progress(self.limit.backing_off, self.limit.limit))
