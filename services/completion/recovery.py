"""Recovery: settle every intent that has no outcome, against what Square shows now.

Only intents whose lease holder is gone are touched: recovery takes the merchant's lease
first, so another live process's in-flight intents are left alone (and reported). An order
found COMPLETED at version+1 was completed by us; one still open at the approved version and
still eligible is resent with the same attempt's key (a replay if it had applied); anything
else is skipped with the reason."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from services.audit import AuditAction
from services.completion.journal import IntentJournal, Run
from services.completion.leases import LeaseKeeper
from services.completion.model import Intent, OrderResult, Outcome, SkipReason, skip_for
from services.completion.sending import Sender
from services.consent import ConsentRecord
from services.credentials import MerchantCredentials
from services.eligibility import classify
from services.errors import ReconError
from services.square_gateway import SquareGateway
from services.square_models import OrderLike

__all__ = ["Recovery"]


class Recovery:
    def __init__(self, gateway: SquareGateway, journal: IntentJournal, leases: LeaseKeeper,
                 sender: Sender, credentials: dict[str, MerchantCredentials],
                 consents_for: Callable[[str], list[tuple[ConsentRecord, str]]],
                 clock: Callable[[], datetime]) -> None:
        self.gateway = gateway
        self.journal = journal
        self.leases = leases
        self.sender = sender
        self.credentials = credentials
        self.consents_for = consents_for
        self.clock = clock
        # Open intents left alone because another live holder has their merchant.
        self.left_alone: list[str] = []

    async def recover(self) -> list[OrderResult]:
        pending = self.journal.store.open_intents()
        if not pending:
            return []
        run = Run("recovery", "", len(pending))
        merchants = sorted({row["merchant_id"] for row in pending})
        async with self.leases:
            for merchant_id in merchants:
                await self.settle_merchant(run, merchant_id)
        await self.journal.drain()
        return [r for r in run.results if r.reason != "OUTCOME_UNKNOWN"]

    async def settle_merchant(self, run: Run, merchant_id: str) -> bool:
        """Settle one merchant's open intents; the caller holds (or we take) its lease.
        False when it had none (nothing can be left open either)."""
        if not self.leases.holds(merchant_id):
            holder = self.leases.take(merchant_id)
            if holder is not None:
                count = len(self.journal.store.open_intents(merchant_id))
                self.left_alone.append(f"{merchant_id}: {count} open intent(s) left to "
                                       f"{holder.describe()}")
                return count > 0
        rows = self.journal.store.open_intents(merchant_id)
        creds = self.credentials.get(merchant_id)
        if not rows or creds is None:
            return bool(rows)  # without credentials Square cannot be asked: they stay open
        try:
            current = {o.id: o for o in await self.gateway.batch_retrieve(
                creds, sorted({r["order_id"] for r in rows}))}
        except ReconError:
            return True  # unreachable: they stay open for the next `recover`
        completed: set[str] = set()
        for row in rows:
            intent = Intent.from_row(row)
            run.batch_id = row["batch_id"]
            if intent.item.order_id in completed:
                # Several open attempts at one order: only one of them is the completion.
                result: OrderResult | None = OrderResult.of(
                    intent.item, Outcome.SKIPPED, SkipReason.ALREADY_COMPLETED,
                    "Completed by another attempt at the same order.")
            else:
                result = await self._settle(run, creds, intent,
                                            current.get(intent.item.order_id))
            if result is not None and result.outcome is Outcome.COMPLETED:
                completed.add(intent.item.order_id)
            self.journal.outcome(run, intent, result, action=AuditAction.RECOVERY)
        await self.journal.drain()
        return True

    async def _settle(self, run: Run, creds: MerchantCredentials, intent: Intent,
                      order: OrderLike | None) -> OrderResult | None:
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
            return result(Outcome.SKIPPED, *skip_for(verdict))
        return await self.sender.send(run, creds, intent)
