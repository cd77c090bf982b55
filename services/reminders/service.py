"""`ReminderService`: plan, preview, send (intent before effect), recover, history, opt-out.

For each due reminder an outbox row, with the Message-ID derived from (merchant, window) and
the exact message bytes, is committed before the SMTP transaction; its outcome after. A row
left open by a crash is re-sent by `recover` with the same Message-ID and bytes, never under a
new id. Rows are written and settled in small groups, so a run of thousands stays fast.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dt_time
from typing import Any

import orjson

from services.audit import AuditAction, AuditTrail
from services.consent import ConsentRecord
from services.errors import ConfigurationError
from services.processes import HOST, pid_alive
from services.reminders.message import MessageBuilder, RenderedReminder, sender_domain
from services.reminders.planning import (
    LastReminder,
    LocationFacts,
    MerchantFacts,
    ReminderPlan,
    ReminderPolicy,
    WaitingOrder,
    plan_reminders,
    utc,
)
from services.reminders.smtp import SmtpAnswer, SmtpSession, SmtpTarget
from services.store import Store, utc_text

__all__ = ["ReminderProgress", "ReminderResult", "ReminderService", "last_reminded"]

_WAITING_REASONS = ("NO_CONSENT", "CONSENT_EXPIRED", "CONSENT_REVOKED",
                    "CONSENT_NOT_YET_EFFECTIVE", "MANUAL_ONLY", "PAYMENT_NOT_CAPTURED",
                    "NOT_FULLY_PAID", "REFUNDED")
# A holder on another machine is presumed gone after this long (no pid to ask).
_FOREIGN_HOLDER_AFTER = timedelta(minutes=15)
# After a 4xx that outlasted the in-run retries: next run tries from now + this (doubling).
_DEFER_STEP = timedelta(minutes=15)


@dataclass(frozen=True)
class ReminderResult:
    merchant_id: str
    business_name: str
    kind: str
    to: tuple[str, ...]
    orders: int
    status: str                    # sent | deferred | failed | skipped | dry_run
    reason: str | None
    message_id: str | None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """The `remind --json` row of interfaces.md (plus name and detail)."""
        return {"merchant_id": self.merchant_id, "business_name": self.business_name,
                "kind": self.kind, "to": list(self.to), "orders": self.orders,
                "status": self.status, "reason": self.reason, "message_id": self.message_id,
                "detail": self.detail}


@dataclass(frozen=True)
class ReminderProgress:
    done: int
    total: int
    sent: int
    deferred: int
    failed: int


def last_reminded(store: Store) -> dict[str, str]:
    """Merchant id -> when its last reminder was sent (UTC text)."""
    return store.reminders_last_sent()


def _clock_time(text: str) -> dt_time:
    if text == "24:00":
        return dt_time.max
    hours, minutes = text.split(":")
    return dt_time(int(hours), int(minutes))


def _holder() -> str:
    return f"{HOST}:{os.getpid()}"


def _holder_gone(holder: str, created_at: datetime, now: datetime) -> bool:
    host, _, pid = holder.rpartition(":")
    if host != HOST:
        return now - created_at > _FOREIGN_HOLDER_AFTER
    if pid == str(os.getpid()) or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


class ReminderService:
    def __init__(self, store: Store, audit: AuditTrail, *, sender: str, consent_link: str,
                 consents: Callable[[], Mapping[str, Sequence[ConsentRecord]]],
                 clock: Callable[[], datetime], operator: str,
                 smtp: SmtpTarget | None = None, policy: ReminderPolicy | None = None,
                 templates: Any = None, retries: int = 2, backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep, group: int = 100) -> None:
        self.store = store
        self.audit = audit
        self.sender = sender
        self.builder = MessageBuilder(sender, consent_link, templates)
        self.domain = sender_domain(sender)
        self.consents = consents
        self.clock = clock
        self.operator = operator
        self.smtp = smtp
        self.policy = policy or ReminderPolicy()
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.group = group
        self.holder = _holder()
        self._prepared: dict[tuple[str, ...], str] = {}

    @classmethod
    def for_workspace(cls, workspace: Any, smtp: SmtpTarget | None = None,
                      **options: Any) -> ReminderService:
        settings = workspace.settings
        opens, closes = (_clock_time(t) for t in settings.reminder_business_hours.split("-"))
        policy = options.pop("policy", None) or ReminderPolicy(
            window=timedelta(days=settings.reminder_window_days), opens=opens, closes=closes)
        return cls(workspace.store, workspace.audit, sender=settings.reminder_from,
                   consent_link=settings.reminder_consent_link,
                   consents=workspace.consents_by_merchant, clock=workspace.clock,
                   operator=workspace.operator, smtp=smtp, policy=policy,
                   templates=settings.reminder_templates, **options)

    # ------------------------------------------------------------------ reading
    def _merchants(self) -> list[MerchantFacts]:
        facts = []
        for merchant in self.store.merchants():
            row: list[Any] = [merchant.get(c) for c in ("merchant_id", "business_name", "timezone",
                                             "locations_json", "discovery_error",
                                             "token_health", "token_scopes")]
            locations = {}
            for loc in orjson.loads(row[3] or "[]"):
                locations[loc["id"]] = LocationFacts(loc["id"], loc.get("name") or "",
                                                     loc.get("timezone"),
                                                     loc.get("business_email"))
            # A token that can read but not write still refreshed the orders: not stale.
            read_fine = row[5] == "missing_scopes" and "ORDERS_READ" in (row[6] or "").split(",")
            facts.append(MerchantFacts(row[0], row[1] or row[0], row[2], locations,
                                       None if read_fine else row[4]))
        return facts

    def _orders(self) -> dict[str, list[WaitingOrder]]:
        grouped: dict[str, list[WaitingOrder]] = {}
        for row in self.store.waiting_orders(_WAITING_REASONS):
            grouped.setdefault(row[0], []).append(WaitingOrder(
                row[1], row[2], row[3], utc(row[4]), row[5], row[6], row[7]))
        return grouped

    def _history(self) -> dict[str, LastReminder]:
        latest, sent = self.store.reminder_heads()
        history = {}
        for merchant_id, message_id, window, created, status, next_at in latest:
            last_sent = sent.get(merchant_id)
            history[merchant_id] = LastReminder(
                message_id, window, utc(created), status, utc(next_at) if next_at else None,
                utc(last_sent[1]) if last_sent else None,
                frozenset(orjson.loads(last_sent[2])) if last_sent else frozenset(),
                last_sent[3] if last_sent else 0)
        return history

    def opted_out(self) -> dict[str, str]:
        return {merchant_id: f"{reason} by {by}"
                for merchant_id, by, reason in self.store.reminder_opt_outs()}

    def last_reminded(self) -> dict[str, str]:
        return last_reminded(self.store)

    # ------------------------------------------------------------------ planning
    def plan(self, merchant_ids: Sequence[str] | None = None) -> list[ReminderPlan]:
        merchants = self._merchants()
        if merchant_ids:
            known = {m.merchant_id for m in merchants}
            unknown = [m for m in merchant_ids if m not in known]
            if unknown:
                raise ConfigurationError(f"Unknown merchant {unknown[0]}: run `recon-console "
                                         "queue` first, or check the id.")
            wanted = set(merchant_ids)
            merchants = [m for m in merchants if m.merchant_id in wanted]
        return plan_reminders(merchants, self._orders(), self.consents(), self._history(),
                              self.opted_out(), self.clock(), self.policy, self.domain)

    def render(self, plan: ReminderPlan) -> RenderedReminder:
        return self.builder.render(plan, self.clock())

    def prepare(self, plans: Iterable[ReminderPlan]) -> int:
        """Render the due plans now (a template error shows before anything is approved);
        `send` then sends exactly these bytes. Returns how many were rendered."""
        count = 0
        for plan in plans:
            if plan.due and plan.retry_of is None:
                self._prepared[_plan_key(plan)] = self.render(plan).as_bytes().decode()
                count += 1
        return count

    def stored_message(self, message_id: str) -> bytes | None:
        eml = self.store.reminder_message(message_id)
        return eml.encode() if eml is not None else None

    # ------------------------------------------------------------------ sending
    def dry_run(self, plans: Iterable[ReminderPlan]) -> list[ReminderResult]:
        return [_result(p, "dry_run" if p.due else "skipped",
                        None if p.due else p.skip, p.detail or "dry run: not sent")
                for p in plans]

    def send(self, plans: Sequence[ReminderPlan], *,
             on_progress: Callable[[ReminderProgress], None] | None = None,
             cancel: threading.Event | None = None) -> list[ReminderResult]:
        """Send the due plans over one connection; skipped ones come back as `skipped`."""
        results: dict[str, ReminderResult] = {}
        for plan in plans:
            if plan.expire is not None:
                self._expire(plan.expire)
            if not plan.due:
                results[plan.merchant_id] = _result(plan, "skipped", plan.skip, plan.detail)
        due = [p for p in plans if p.due]
        if due:
            if self.smtp is None:
                raise ConfigurationError("RECON_SMTP_URL is not set: set it to "
                                         "smtp://user@host:587 or smtps://user@host:465.")
            counts = {"sent": 0, "deferred": 0, "failed": 0}
            with SmtpSession(self.smtp) as session:
                for start in range(0, len(due), self.group):
                    if cancel is not None and cancel.is_set():
                        break
                    group = due[start:start + self.group]
                    rows, taken = self._write_intents(group)
                    for plan in taken:
                        results[plan.merchant_id] = _result(
                            plan, "skipped", "NOT_DUE", "Another run reminded this merchant in "
                            "this window meanwhile.")
                    outcomes: list[tuple[dict[str, Any], SmtpAnswer]] = []
                    for row in rows:
                        if cancel is not None and cancel.is_set():
                            break
                        answer = self._send_with_retries(session, row)
                        outcomes.append((row, answer))
                        counts[answer.status] += 1
                    self._settle(outcomes, unsent=[r for r in rows[len(outcomes):]])
                    for row, answer in outcomes:
                        results[row["merchant_id"]] = self._result_of(row, answer)
                    if on_progress is not None:
                        on_progress(ReminderProgress(start + len(outcomes), len(due),
                                                     **counts))
        order = {p.merchant_id: i for i, p in enumerate(plans)}
        return sorted(results.values(), key=lambda r: order.get(r.merchant_id, 0))

    def _write_intents(self, plans: Sequence[ReminderPlan]
                       ) -> tuple[list[dict[str, Any]], list[ReminderPlan]]:
        """Commit the outbox rows (new, or a deferred one taken up again) before any send.
        A plan whose row another run wrote meanwhile (the same merchant and window) is
        returned as taken: the database, not the plan, decides who sends."""
        now = utc_text(self.clock())
        rows = []
        taken = []
        eml: str | None
        with self.store.transaction():
            for plan in plans:
                if plan.retry_of is not None:
                    stored = self.store.retake_reminder(plan.retry_of, self.holder,
                                                        self.operator)
                    if stored is None:
                        taken.append(plan)
                        continue
                    eml = stored
                else:
                    eml = self._prepared.pop(_plan_key(plan), None) or \
                        self.render(plan).as_bytes().decode()
                    inserted = self.store.insert_reminder({
                        "message_id": plan.message_id, "merchant_id": plan.merchant_id,
                        "window_index": plan.window_index, "kind": plan.kind.value,
                        "recipients_json": orjson.dumps(list(plan.recipients)).decode(),
                        "order_ids_json": orjson.dumps([o.order_id for o in plan.orders]
                                                       ).decode(),
                        "orders": len(plan.orders), "age_step": plan.age_step,
                        "message_eml": eml, "operator": self.operator, "holder": self.holder,
                        "created_at": now})
                    if not inserted:
                        taken.append(plan)
                        continue
                rows.append({"message_id": plan.message_id, "merchant_id": plan.merchant_id,
                             "business_name": plan.business_name, "kind": plan.kind.value,
                             "recipients": list(plan.recipients), "orders": len(plan.orders),
                             "eml": eml})
        return rows, taken

    def _send_with_retries(self, session: SmtpSession, row: dict[str, Any]) -> SmtpAnswer:
        data = row["eml"].encode()
        answer = session.send(self.builder.sender_address, row["recipients"], data)
        for attempt in range(self.retries):
            if answer.status != "deferred":
                break
            self.sleep(self.backoff_s * 2 ** attempt)
            answer = session.send(self.builder.sender_address, row["recipients"], data)
        return answer

    def _settle(self, outcomes: list[tuple[dict[str, Any], SmtpAnswer]],
                unsent: list[dict[str, Any]]) -> None:
        now = self.clock()
        with self.store.transaction():
            for row, answer in outcomes:
                self._record(row, answer, now)
            # Cancelled before their turn: never sent, so nothing to settle; the merchant
            # stays due.
            for row in unsent:
                self.store.drop_unsent_reminder(row["message_id"])

    def _record(self, row: dict[str, Any], answer: SmtpAnswer, now: datetime,
                recovered: bool = False) -> None:
        """Inside an open transaction: the row's outcome and its audit entry."""
        attempts, created_at = self.store.reminder_attempts(row["message_id"])
        tries = attempts + 1
        next_at = None
        if answer.status == "deferred":
            wait = _DEFER_STEP * 2 ** min(tries - 1, 6)
            next_at = utc_text(min(now + wait, utc(created_at) + self.policy.window))
        self.store.settle_reminder(row["message_id"], answer.status, answer.reason_code,
                                   answer.reason, tries, next_at, utc_text(now))
        action = AuditAction.REMINDER_SENT if answer.status == "sent" \
            else AuditAction.REMINDER_FAILED
        words = f"{answer.code} {answer.reason}" if answer.code else answer.reason
        detail = (f"{row['kind']}; to {', '.join(row['recipients'])}; {row['orders']} orders;"
                  f" {words}" + ("; recovered" if recovered else ""))
        self.audit.append(operator=self.operator, action=action,
                          merchant_id=row["merchant_id"], idempotency_key=row["message_id"],
                          outcome=answer.status, square_code=answer.reason_code,
                          detail=detail[:500])

    def _expire(self, message_id: str) -> None:
        with self.store.transaction():
            row = self.store.deferred_reminder(message_id)
            if row is None:
                return
            self._record({"message_id": message_id, "merchant_id": row[0],
                                "kind": row[1], "recipients": orjson.loads(row[2]),
                                "orders": row[3]},
                         SmtpAnswer("failed", None, "deferred until its window passed"),
                         self.clock())
            self.store.set_reminder_reason(message_id, "WINDOW_PASSED")

    def _result_of(self, row: dict[str, Any], answer: SmtpAnswer) -> ReminderResult:
        return ReminderResult(row["merchant_id"], row["business_name"], row["kind"],
                              tuple(row["recipients"]), row["orders"], answer.status,
                              answer.reason_code, row["message_id"], answer.reason)

    # ------------------------------------------------------------------ recovery
    def open_rows(self) -> list[dict[str, Any]]:
        return [{"message_id": r[0], "merchant_id": r[1], "kind": r[2],
                 "recipients": orjson.loads(r[3]), "orders": r[4], "eml": r[5],
                 "holder": r[6], "created_at": r[7], "business_name": r[8]}
                for r in self.store.open_reminders()]

    def recover(self) -> list[ReminderResult]:
        """Re-send every open row whose holder is gone, with its own Message-ID and bytes."""
        now = self.clock()
        rows = [r for r in self.open_rows()
                if _holder_gone(r["holder"], utc(r["created_at"]), now)]
        if not rows:
            return []
        if self.smtp is None:
            raise ConfigurationError(f"{len(rows)} reminder(s) in doubt need RECON_SMTP_URL "
                                     "to be re-sent: set it and run `recon-console recover`.")
        results = []
        with SmtpSession(self.smtp) as session:
            for row in rows:
                answer = self._send_with_retries(session, row)
                with self.store.transaction():
                    self._record(row, answer, self.clock(), recovered=True)
                results.append(self._result_of(row, answer))
        return results

    # ------------------------------------------------------------------ history, opt-out
    def history(self, merchant_id: str | None = None) -> list[dict[str, Any]]:
        keys = ("message_id", "merchant_id", "business_name", "kind", "to", "orders",
                "status", "reason", "detail", "attempts", "created_at", "settled_at",
                "operator")
        out = []
        for row in self.store.reminder_history(merchant_id):
            entry = dict(zip(keys, row, strict=True))
            entry["to"] = orjson.loads(entry["to"])
            entry["status"] = entry["status"] or "in_doubt"
            out.append(entry)
        return out

    def set_opt_out(self, merchant_id: str, opted_out: bool, by: str, reason: str) -> None:
        if self.store.merchant(merchant_id) is None:
            raise ConfigurationError(f"Unknown merchant {merchant_id}: run `recon-console "
                                     "queue` first, or check the id.")
        if not by.strip() or not reason.strip():
            raise ConfigurationError("--by and --reason must not be empty.")
        current = merchant_id in self.opted_out()
        if current == opted_out:
            state = "opted out" if opted_out else "receiving reminders (not opted out)"
            raise ConfigurationError(f"Merchant {merchant_id} is already {state}.")
        with self.store.transaction():
            self.store.save_reminder_opt_out(merchant_id, opted_out, by, reason,
                                             utc_text(self.clock()))
            self.audit.append(operator=self.operator,
                              action=AuditAction.REMINDER_OPT_OUT if opted_out
                              else AuditAction.REMINDER_OPT_IN, merchant_id=merchant_id,
                              detail=f"by {by}: {reason}"[:500])


def _plan_key(plan: ReminderPlan) -> tuple[str, ...]:
    """What a prepared message depends on: its id, recipients and orders."""
    return (plan.message_id, *plan.recipients, "|", *(o.order_id for o in plan.orders))


def _result(plan: ReminderPlan, status: str, reason: str | None, detail: str
            ) -> ReminderResult:
    return ReminderResult(plan.merchant_id, plan.business_name, plan.kind.value,
                          plan.recipients, len(plan.orders), status,
                          str(reason) if reason else None,
                          plan.message_id if status != "skipped" else None, detail)
