"""Four-eyes approval (issue 14): a batch over the threshold runs only once a second operator
approved exactly that set.

- `prepare`: the preparer's preview is stored with its approved-set hash and a batch id, and
  audited (`approval_requested`);
- `decide`: another operator approves (good for `ttl`) or rejects it, with a reason; both are
  audit entries; the preparer can never decide their own batch;
- `gate`: the engine's check before anything is sent. It refuses a batch over the threshold
  without an approval, and any batch run under a prepared id whose approval is pending,
  rejected, expired, self-given, already used, or for another set of (order, version) pairs.
  A refusal is an audit entry too. An approval is used by one run only.

All SQL is in `services.store` (insert_approval, approval, approvals, decide_approval,
use_approval, order_amounts).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import orjson

from services.audit import AuditAction, AuditTrail
from services.completion.model import ApprovedItem, approved_set_sha256
from services.errors import ApprovalRefused, ConfigurationError
from services.money import minor_units
from services.store import Approval, Store, utc_text
from services.timestamps import parse_time

__all__ = ["Approvals", "FourEyesPolicy", "approval_items", "approval_totals", "same_operator"]


def same_operator(one: str, other: str) -> bool:
    """Names are typed, not authenticated: "Ana", "ANA " and its fullwidth form are one operator."""
    def key(name: str) -> str:
        return unicodedata.normalize("NFKC", name).casefold().strip()
    return key(one) == key(other)


@dataclass(frozen=True)
class FourEyesPolicy:
    """More than `max_orders` orders, or more than `max_amount` (major units) in any one
    currency, needs a second operator; an approval is good for `ttl`. What the same operator
    sent without a second operator in the last `window` counts with the batch: five batches
    of 200 in an hour are a batch of 1,000, not five small ones (zero: the batch alone)."""

    max_orders: int = 200
    max_amount: Decimal = Decimal("10000.00")
    ttl: timedelta = timedelta(minutes=30)
    window: timedelta = timedelta(minutes=60)

    def why_needed(self, count: int, totals: dict[str, int], unpriced: int = 0) -> str | None:
        """Why a batch of `count` orders with these totals (minor units per currency) needs
        a second operator, or None. Orders that cannot be priced count as over the amount:
        a batch nobody can total is not small."""
        if count > self.max_orders:
            return f"{count} orders, more than {self.max_orders}"
        for currency, amount in sorted(totals.items()):
            if amount > minor_units(self.max_amount, currency):
                return f"{amount} {currency} (minor units), more than {self.max_amount} {currency}"
        if unpriced:
            return f"{unpriced} orders could not be priced from the queue"
        return None


def approval_items(approval: Approval) -> list[ApprovedItem]:
    return [ApprovedItem(m, o, int(v)) for m, o, v in orjson.loads(approval.items_json)]


def approval_totals(approval: Approval) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = orjson.loads(approval.totals_json)
    return totals


class Approvals:
    def __init__(self, store: Store, audit: AuditTrail, policy: FourEyesPolicy,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.audit = audit
        self.policy = policy
        self.clock = clock

    # ------------------------------------------------------------------ the threshold
    def totals(self, items: Sequence[ApprovedItem]
               ) -> tuple[dict[str, dict[str, int]], int]:
        """({merchant: {currency: minor units}}, how many items are not in the queue)."""
        amounts = self.store.order_amounts([i.order_id for i in items])
        totals: dict[str, dict[str, int]] = {}
        unpriced = 0
        for item in items:
            if item.order_id not in amounts:
                unpriced += 1
                continue
            amount, currency = amounts[item.order_id]
            by_currency = totals.setdefault(item.merchant_id, {})
            by_currency[currency] = by_currency.get(currency, 0) + amount
        return totals, unpriced

    def why_needed(self, items: Sequence[ApprovedItem], operator: str | None = None
                   ) -> str | None:
        """Why `operator`'s batch of `items` needs a second operator, or None: the batch
        alone, then with what the same operator sent unapproved within the window."""
        per_merchant, unpriced = self.totals(items)
        overall: dict[str, int] = {}
        for by_currency in per_merchant.values():
            for currency, amount in by_currency.items():
                overall[currency] = overall.get(currency, 0) + amount
        count = len(set(items))
        why = self.policy.why_needed(count, overall, unpriced)
        if why is not None or operator is None or not self.policy.window:
            return why
        since = utc_text(self.clock() - self.policy.window)
        mine = {item.order_id for item in items}
        recent: dict[str, tuple[int | None, str | None]] = {}
        for sender, order_id, sent_amount, sent_currency in self.store.sent_without_approval(
                since):
            if order_id not in mine and same_operator(sender, operator):
                recent[order_id] = (sent_amount, sent_currency)
        for sent_amount, sent_currency in recent.values():
            if sent_amount is None or sent_currency is None:
                unpriced += 1
            else:
                overall[sent_currency] = overall.get(sent_currency, 0) + sent_amount
        why = self.policy.why_needed(count + len(recent), overall, unpriced)
        if why is None:
            return None
        minutes = f"{self.policy.window.total_seconds() / 60:g}"
        return (f"{why}, counting the {len(recent)} orders {operator} sent without a second "
                f"operator in the last {minutes} minutes")

    # ------------------------------------------------------------------ prepare and decide
    def prepare(self, batch_id: str, items: Sequence[ApprovedItem], operator: str,
                totals: dict[str, dict[str, int]], why: str) -> Approval:
        """Store the preparer's preview (the exact set, its hash, the totals shown)."""
        approved = sorted(set(items))
        sha = approved_set_sha256(approved)
        approval = Approval(
            batch_id, sha,
            orjson.dumps([[i.merchant_id, i.order_id, i.version] for i in approved]).decode(),
            orjson.dumps(totals, option=orjson.OPT_SORT_KEYS).decode(), len(approved), why,
            operator, utc_text(self.clock()), "pending")
        with self.store.transaction():
            self.store.insert_approval(approval)
            self.audit.append(operator=operator, action=AuditAction.APPROVAL_REQUESTED,
                              batch_id=batch_id, approved_set_sha256=sha,
                              detail=f"{len(approved)} orders need a second operator: {why}"
                                     [:500])
        return approval

    def get(self, batch_id: str) -> Approval:
        approval = self.store.approval(batch_id)
        if approval is None:  # a typo, like an unknown merchant: a usage error
            raise ConfigurationError(f"Unknown batch {batch_id}: `recon-console approve` "
                                     "lists the prepared ones.")
        return approval

    def decide(self, batch_id: str, operator: str, approve: bool, reason: str | None
               ) -> Approval:
        """The second operator's decision, audited in the same transaction."""
        now = self.clock()
        with self.store.transaction():
            approval = self.get(batch_id)
            if approval.status != "pending":
                raise ApprovalRefused("APPROVAL_DECIDED", f"batch {batch_id} is already "
                                      f"{approval.status} (by {approval.decided_by}).")
            if same_operator(operator, approval.prepared_by):
                raise ApprovalRefused("APPROVAL_SELF_GIVEN", f"{operator} prepared batch "
                                      f"{batch_id}: another operator must approve or reject it.")
            status = "approved" if approve else "rejected"
            expires = utc_text(now + self.policy.ttl) if approve else None
            if not self.store.decide_approval(batch_id, status, operator, utc_text(now),
                                              reason, expires):
                # Decided by someone else since the read (a store without one writer at a
                # time, e.g. PostgreSQL, relies on this conditional UPDATE).
                raise ApprovalRefused("APPROVAL_DECIDED", f"batch {batch_id} was decided "
                                      "meanwhile by another operator.")
            self.audit.append(operator=operator,
                              action=AuditAction.APPROVAL_GRANTED if approve
                              else AuditAction.APPROVAL_REJECTED,
                              batch_id=batch_id,
                              approved_set_sha256=approval.approved_set_sha256,
                              outcome=status,
                              detail=(f"prepared by {approval.prepared_by}; "
                                      + (f"expires {expires}; " if expires else "")
                                      + f"reason: {reason or '-'}")[:500])
            decided = self.store.approval(batch_id)
        assert decided is not None
        return decided

    def listed(self) -> list[Approval]:
        """Batches waiting for a decision, or approved and not yet run (nor expired)."""
        now = utc_text(self.clock())
        return [a for a in self.store.approvals(["pending", "approved"])
                if a.status == "pending" or (a.expires_at or "") > now]

    # ------------------------------------------------------------------ the engine's gate
    def gate(self, batch_id: str | None, items: Sequence[ApprovedItem], operator: str) -> None:
        """Raise ApprovalRefused (and audit it) unless this exact set may run now; claim the
        approval for this run."""
        approved = sorted(set(items))
        sha = approved_set_sha256(approved)
        approval = self.store.approval(batch_id) if batch_id else None
        if approval is None:
            why = self.why_needed(approved, operator)
            if why is None:
                return  # under the threshold: one operator is enough
            self._refuse(batch_id, sha, operator, "APPROVAL_MISSING",
                         f"this batch ({why}) needs a second operator's approval: prepare it "
                         "and have another operator run `recon-console approve BATCH_ID`.")
            return
        assert batch_id is not None
        if approval.status == "pending":
            self._refuse(batch_id, sha, operator, "APPROVAL_PENDING",
                         f"batch {batch_id} has not been approved yet.")
        if approval.status == "rejected":
            self._refuse(batch_id, sha, operator, "APPROVAL_REJECTED",
                         f"batch {batch_id} was rejected by {approval.decided_by}: "
                         f"{approval.reason or '-'}.")
        if approval.status != "approved":
            self._refuse(batch_id, sha, operator, "APPROVAL_USED",
                         f"batch {batch_id} already ran ({approval.used_at}); an approval is "
                         "good for one run: prepare the rest again.")
        if approval.approved_set_sha256 != sha:
            self._refuse(batch_id, sha, operator, "APPROVAL_OTHER_SET",
                         f"the approval of batch {batch_id} is for set "
                         f"{approval.approved_set_sha256[:16]}…, not this one ({sha[:16]}…): "
                         "prepare the new set and have it approved.")
        if not approval.decided_by or same_operator(approval.decided_by, approval.prepared_by):
            self._refuse(batch_id, sha, operator, "APPROVAL_SELF_GIVEN",
                         f"batch {batch_id} was approved by its own preparer "
                         f"({approval.prepared_by}): it needs a second operator.")
        now = self.clock()
        if approval.expires_at is None or parse_time(approval.expires_at) <= now:
            self._refuse(batch_id, sha, operator, "APPROVAL_EXPIRED",
                         f"the approval of batch {batch_id} expired at {approval.expires_at}: "
                         "have it approved again.")
        with self.store.transaction():
            claimed = self.store.use_approval(batch_id, operator, utc_text(now))
            if claimed:
                self.audit.append(operator=operator, action=AuditAction.APPROVAL_USED,
                                  batch_id=batch_id, approved_set_sha256=sha,
                                  detail=f"approved by {approval.decided_by}; run by "
                                         f"{operator}")
        if not claimed:  # another run took it (or it expired) between the check and here
            self._refuse(batch_id, sha, operator, "APPROVAL_USED",
                         f"batch {batch_id}'s approval was just used by another run, or "
                         "expired: nothing was sent.")

    def _refuse(self, batch_id: str | None, sha: str, operator: str, code: str, detail: str
                ) -> None:
        self.audit.append(operator=operator, action=AuditAction.BATCH_REFUSED,
                          batch_id=batch_id, approved_set_sha256=sha, outcome="refused",
                          detail=f"{code}: {detail}"[:500])
        raise ApprovalRefused(code, detail)

