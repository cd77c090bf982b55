"""Sending one intent: the last look before the call (cancel, database, lease, token, breaker,
consent at this very moment), then UpdateOrder with retries under one idempotency key.

5xx, timeouts and lost responses are retried with the same key (Square replays the first
answer if one of them applied); 429 waits for Retry-After and halves the concurrency. A result
of None means the outcome is unknown: the intent stays open for `recover`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from services.completion.journal import IntentJournal, Run
from services.completion.leases import LeaseKeeper
from services.completion.limits import AdaptiveLimit, Backoff, CircuitBreaker, LoopBudget
from services.completion.model import Intent, OrderResult, Outcome, SkipReason, token_skip
from services.consent import ConsentRecord
from services.credentials import MerchantCredentials
from services.errors import (
    SquareApiError,
    SquareAuthError,
    SquareRateLimited,
    SquareScopeError,
    SquareServerError,
    SquareUnavailable,
)
from services.square_gateway import SquareGateway

__all__ = ["ConsentReads", "RemoteConsents", "RevisionReader", "Sender"]

Consents = list[tuple[ConsentRecord, str]]


class RevisionReader(Protocol):
    async def read(self) -> int: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class RemoteConsents(Protocol):
    """A store each call of which is a round trip to a server (PostgreSQL)."""

    def consents_revision_reader(self) -> RevisionReader: ...

    def consent_writes(self) -> int: ...


class ConsentReads:
    """The consents as the database holds them when a send asks, for a store each read of
    which is a round trip to a server. One blocking read per send, on the event loop, held
    every other send and every answer for a round trip each time; here a send awaits a read of
    the consents' revision that BEGINS AFTER it asked, so a change committed before the send
    asked is seen, as by a read of its own. The sends that ask while one read is under way
    share the next one, begun as soon as that one ends. The records themselves are read again
    (`consents_for`) only when the revision moved.

    The revision is read on the event loop itself, over an async connection of its own
    (`consents_revision_reader`), not in a thread: a send holds its slot (`Sender.send`) while
    it waits, and a thread's read, waiting for the GIL behind the busy loop, then for the
    loop to take its answer, cost each send ~8 ms beside Square's 20 ms.

    The loop runs on during the read: a consent written meanwhile by this process (the
    console's own revoke, on the loop) may have missed it, so then the read is taken again.
    A write by another process while the read is under way is concurrent with the send,
    as with a read of its own."""

    def __init__(self, store: RemoteConsents,
                 consents_for: Callable[[str], Consents]) -> None:
        self.store = store
        self.consents_for = consents_for
        self._known: dict[str, tuple[int, Consents]] = {}  # merchant -> (revision, records)
        self._reader: RevisionReader | None = None  # opened at the first read
        # Sends that asked since the last read began: the next read to begin answers them.
        self._asking: list[asyncio.Future[int]] = []
        self._reading: asyncio.Task[None] | None = None

    async def current(self, merchant_id: str) -> Consents:
        while True:
            writes = self.store.consent_writes()
            revision = await self._revision()
            if self.store.consent_writes() == writes:
                break
        known = self._known.get(merchant_id)
        if known is not None and known[0] == revision:
            return known[1]
        # Its own reads (at least as recent), off the loop.
        records = await asyncio.get_running_loop().run_in_executor(
            None, self.consents_for, merchant_id)
        self._known[merchant_id] = (revision, records)
        return records

    def _revision(self) -> asyncio.Future[int]:
        """The answer of the next read to begin. Each send its own future: one cancelled (the
        batch cancelled) leaves the read to the rest."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._asking.append(future)
        if self._reading is None:
            self._reading = loop.create_task(self._read())
        return future

    async def _read(self) -> None:
        """Read after read while sends ask, each answering the sends that asked before it
        began."""
        try:
            while self._asking:
                asking, self._asking = self._asking, []
                answer: int | Exception
                try:
                    if self._reader is None:
                        self._reader = self.store.consents_revision_reader()
                    answer = await self._reader.read()
                except Exception as error:  # handed to the sends, raised there
                    answer = error
                for future in asking:
                    if future.done():  # its send was cancelled
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._reading = None

    async def aclose(self) -> None:
        """Close the reader's connection (once no send asks any more)."""
        if self._reading is not None:
            with contextlib.suppress(Exception):
                await self._reading
        if self._reader is not None:
            await self._reader.aclose()
            self._reader = None


class Sender:
    def __init__(self, gateway: SquareGateway, journal: IntentJournal, leases: LeaseKeeper,
                 consents_for: Callable[[str], list[tuple[ConsentRecord, str]]],
                 clock: Callable[[], datetime], *, limit: AdaptiveLimit, backoff: Backoff,
                 breaker: CircuitBreaker, per_merchant: int, max_per_merchant: int,
                 max_attempts: int, max_rate_limit_waits: int,
                 attempt_timeout_s: float, on_change: Callable[[Run], None]) -> None:
        self.gateway = gateway
        self.journal = journal
        self.leases = leases
        self.consents_for = consents_for
        self.clock = clock
        self.limit = limit
        self.backoff = backoff
        self.breaker = breaker
        self.max_attempts = max_attempts
        self.max_rate_limit_waits = max_rate_limit_waits
        self.attempt_timeout_s = attempt_timeout_s
        self.on_change = on_change
        self.rejected_tokens: dict[str, tuple[SkipReason, str]] = {}
        # Per merchant: starts at `per_merchant` and grows while answers are fast and no
        # 429 comes (halves on one), within the overall `limit`.
        self.per_merchant = per_merchant
        self.max_per_merchant = max(per_merchant, max_per_merchant)
        self.merchant_limits: dict[str, AdaptiveLimit] = {}
        self.budget = LoopBudget()
        # None: each send reads the consents itself, on the loop (SQLite: a local read).
        self.consent_reads: ConsentReads | None = None

    def merchant_limit(self, merchant_id: str) -> AdaptiveLimit:
        limit = self.merchant_limits.get(merchant_id)
        if limit is None:
            limit = self.merchant_limits[merchant_id] = AdaptiveLimit(
                self.max_per_merchant, self.per_merchant)
        return limit

    def reject_token(self, merchant_id: str, error: SquareApiError) -> None:
        self.rejected_tokens.setdefault(merchant_id, (token_skip(error.code), str(error)))

    def stop_reason(self, run: Run, merchant_id: str) -> tuple[SkipReason, str] | None:
        """Why nothing more may be sent for this merchant, if anything."""
        if run.cancel.is_set():
            return SkipReason.CANCELLED, "Cancelled before it was sent."
        if self.journal.broken:
            return SkipReason.DATABASE_UNWRITABLE, (
                f"Not sent: {self.journal.broken}; run `recon-console recover`.")
        if not self.leases.holds(merchant_id):
            return SkipReason.LEASED, "Not sent: this run no longer holds the merchant's lease."
        if merchant_id in self.rejected_tokens:
            return self.rejected_tokens[merchant_id]
        if merchant_id in self.breaker.open:
            return SkipReason.SQUARE_UNREACHABLE, self.breaker.open[merchant_id]
        return None

    def consent_problem(self, intent: Intent, consents: Consents | None = None
                        ) -> tuple[SkipReason, str] | None:
        """`consents`: the merchant's, read at this moment (`ConsentReads`); else read here."""
        if consents is None:
            consents = self.consents_for(intent.item.merchant_id)
        relied, sha = next(((c, sha) for c, sha in consents
                            if c.consent_id == intent.consent_id), (None, None))
        if relied is None:
            return SkipReason.NO_CONSENT, "The consent relied on is gone."
        status = relied.status_at(self.clock()).value
        if status != "active":
            reason = {"revoked": SkipReason.CONSENT_REVOKED,
                      "expired": SkipReason.CONSENT_EXPIRED}.get(status, SkipReason.NO_CONSENT)
            return reason, f"Consent {relied.consent_id} is {status}."
        if not relied.covers_location(intent.location_id):
            return SkipReason.OUTSIDE_CONSENT_SCOPE, "Consent no longer covers the location."
        if intent.consent_sha256 is not None and sha != intent.consent_sha256:
            # A new version (narrower sources, a higher minimum age, lower limits...) means a
            # new decision: this order was checked against the old one only.
            return SkipReason.NO_LONGER_ELIGIBLE, (
                f"Consent {relied.consent_id} changed since this order was checked: back to "
                "the queue for a new decision.")
        return None

    async def send(self, run: Run, creds: MerchantCredentials, intent: Intent
                   ) -> OrderResult | None:
        """Send one intent (retrying with its key); None if the outcome stays unknown."""
        item = intent.item

        def result(outcome: Outcome, reason: str | None, detail: str) -> OrderResult:
            return OrderResult.of(item, outcome, reason, detail)

        merchant_limit = self.merchant_limit(item.merchant_id)
        attempts = 0
        rate_waits = 0
        uncertain = False  # a request may have reached Square without us seeing the answer
        while True:
            attempts += 1
            try:
                async with merchant_limit, self.limit:
                    if not uncertain:  # nothing of this intent can have reached Square
                        # Let the console paint and take keys (see LoopBudget).
                        await self.budget.turn()
                        consents = (None if self.consent_reads is None else
                                    await self.consent_reads.current(item.merchant_id))
                        # The last look, right before the call (after any wait for a slot):
                        # a cancel, a revocation or a lost lease stops it here.
                        stop = (self.stop_reason(run, item.merchant_id)
                                or self.consent_problem(intent, consents))
                        if stop is not None:
                            return result(Outcome.SKIPPED, stop[0], stop[1])
                    started = time.monotonic()
                    order = await self.gateway.update_order(creds, item.order_id, intent.body,
                                                            timeout_s=self.attempt_timeout_s)
            except SquareRateLimited as error:
                self.breaker.answered(item.merchant_id)
                rate_waits += 1
                wait = self.backoff.rate_limit_wait(rate_waits, error)
                self.limit.rate_limited(wait)
                merchant_limit.rate_limited(wait)
                self.on_change(run)
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
                self.breaker.failed(item.merchant_id, error)
                if attempts >= self.max_attempts or item.merchant_id in self.breaker.open:
                    return None
                await asyncio.sleep(self.backoff.delay(attempts))
                continue
            except (SquareAuthError, SquareScopeError) as error:
                self.reject_token(item.merchant_id, error)
                if uncertain:
                    return None
                if token_skip(error.code) is not SkipReason.TOKEN_REJECTED:
                    # Refused before any call (e.g. TOKEN_MERCHANT_MISMATCH): nothing was sent.
                    return result(Outcome.SKIPPED, token_skip(error.code), str(error))
                return result(Outcome.FAILED, error.code, str(error))
            except SquareApiError as error:
                self.breaker.answered(item.merchant_id)
                if error.code == "VERSION_MISMATCH" or error.status == 409:
                    if uncertain:
                        return None  # maybe our own earlier attempt moved it: let recover look
                    return result(Outcome.SKIPPED, SkipReason.VERSION_CHANGED,
                                  f"{error.code}: {error.detail}")
                if uncertain:
                    return None
                return result(Outcome.FAILED, error.code, error.detail)
            self.breaker.answered(item.merchant_id)
            latency = time.monotonic() - started
            self.limit.succeeded(latency)
            merchant_limit.succeeded(latency)
            if order is not None and order.state == "COMPLETED":
                return result(Outcome.COMPLETED, None,
                              f"COMPLETED at version {order.version}.")
            state = order.state if order is not None else "missing"
            return result(Outcome.FAILED, "NOT_COMPLETED",
                          f"Square answered 200 but the order is {state}: nothing was "
                          "completed.")
