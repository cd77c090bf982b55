"""Who is due a friendly reminder, about which orders, to which addresses, and when.

Pure functions of what the database holds and the moment (`now` is always passed in), so
every rule here is unit-tested with a fixed clock:

- kind `no_consent`: no usable consent (none, expired, revoked, not yet effective) and fully
  paid Square Online orders still open; kind `needs_a_person`: an active consent, but orders
  only a person can finish (manual-only, card only authorized, partly paid or refunded for
  longer than a threshold);
- at most one reminder per merchant per window (default 7 days); after that only when an order
  is new since the last one, or the oldest order has crossed the next age step (3, 7, 14, 30);
- never to an opted-out merchant; only within local business hours (09:00-17:00 in the
  location's timezone), otherwise it waits for the next opening.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from services.consent import EMAIL_PATTERN, ConsentRecord, ConsentStatus
from services.eligibility import EligibilityReason
from services.timestamps import parse_time

__all__ = ["AGE_STEPS", "LastReminder", "MerchantFacts", "ReminderKind", "ReminderPlan",
           "ReminderPolicy", "SkipCode", "WaitingOrder", "age_step", "business_hours_open",
           "message_id_for", "next_opening", "plan_reminders", "valid_address",
           "window_index"]

AGE_STEPS = (3, 7, 14, 30)
_CONSENT_REASONS = frozenset({EligibilityReason.NO_CONSENT, EligibilityReason.CONSENT_EXPIRED,
                              EligibilityReason.CONSENT_REVOKED,
                              EligibilityReason.CONSENT_NOT_YET_EFFECTIVE})
# Needs a person once older than `min_age`; partial payment and refunds are often sorted out
# within days, so those only after `stuck_after`.
_PERSON_SOON = frozenset({EligibilityReason.MANUAL_ONLY, EligibilityReason.PAYMENT_NOT_CAPTURED})
_PERSON_LATER = frozenset({EligibilityReason.NOT_FULLY_PAID, EligibilityReason.REFUNDED})
_EMAIL = re.compile(EMAIL_PATTERN)


class ReminderKind(StrEnum):
    NO_CONSENT = "no_consent"
    NEEDS_A_PERSON = "needs_a_person"


class SkipCode(StrEnum):
    OPTED_OUT = "OPTED_OUT"
    NO_ADDRESS = "NO_ADDRESS"
    STALE_ORDERS = "STALE_ORDERS"                   # the last refresh of this merchant failed
    NOT_DUE = "NOT_DUE"                             # already reminded in this window
    NOTHING_NEW = "NOTHING_NEW"                     # no new order, no new age step
    OUTSIDE_BUSINESS_HOURS = "OUTSIDE_BUSINESS_HOURS"
    RETRY_LATER = "RETRY_LATER"                     # deferred by the server; backing off


@dataclass(frozen=True)
class ReminderPolicy:
    window: timedelta = timedelta(days=7)
    age_steps: tuple[int, ...] = AGE_STEPS
    opens: time = time(9, 0)
    closes: time = time(17, 0)
    min_age: timedelta = timedelta(hours=24)
    stuck_after: timedelta = timedelta(days=3)
    max_listed: int = 20


@dataclass(frozen=True)
class WaitingOrder:
    order_id: str
    location_id: str
    reference_id: str | None
    created_at: datetime
    total_amount: int
    currency: str
    reason: str


@dataclass(frozen=True)
class LocationFacts:
    location_id: str
    name: str
    timezone: str | None
    business_email: str | None


@dataclass(frozen=True)
class MerchantFacts:
    merchant_id: str
    business_name: str
    timezone: str | None
    locations: Mapping[str, LocationFacts]
    discovery_error: str | None = None


@dataclass(frozen=True)
class LastReminder:
    """The newest outbox row of a merchant, and the newest one that was sent."""

    message_id: str
    window_index: int
    created_at: datetime
    status: str | None               # None: in doubt; sent, deferred, failed
    next_attempt_at: datetime | None = None
    last_sent_at: datetime | None = None
    last_sent_order_ids: frozenset[str] = frozenset()
    last_sent_step: int = 0


@dataclass(frozen=True)
class ReminderPlan:
    merchant_id: str
    business_name: str
    kind: ReminderKind
    orders: tuple[WaitingOrder, ...]           # oldest first
    recipients: tuple[str, ...]
    rejected_addresses: tuple[str, ...]
    timezone: str
    age_step: int
    oldest_age: timedelta
    window_index: int
    message_id: str
    skip: SkipCode | None = None
    detail: str = ""
    retry_of: str | None = None                 # the deferred row this re-sends
    expire: str | None = None                   # a deferred row whose window has passed
    last_reminded_at: datetime | None = None
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def due(self) -> bool:
        return self.skip is None


def age_step(age: timedelta, steps: Sequence[int] = AGE_STEPS) -> int:
    """The highest step (in days) the age has crossed; 0 below the first."""
    days = age / timedelta(days=1)
    return max((s for s in steps if days >= s), default=0)


def window_index(now: datetime, window: timedelta) -> int:
    """Windows are fixed spans from the epoch; with at least one window between reminders,
    each reminder of a merchant falls in a window of its own."""
    return int(now.timestamp() // window.total_seconds())


def message_id_for(merchant_id: str, window: int, domain: str) -> str:
    """Derived from (merchant, window) alone: a re-send after a crash has the same id, so the
    recipient's mail system can drop the duplicate."""
    digest = hashlib.sha256(f"{merchant_id}\x00{window}".encode()).hexdigest()[:24]
    return f"<reminder.{window}.{digest}@{domain}>"


def valid_address(address: str | None) -> bool:
    """A plain ASCII addr-spec with nothing that could end up outside the To header."""
    if not address or len(address) > 254 or not address.isascii():
        return False
    if any(c in address for c in "\r\n\t<>,;\"()[]\\ ") or any(ord(c) < 32 for c in address):
        return False
    return bool(_EMAIL.match(address))


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except Exception:  # unknown or malformed zone name from Square: fall back, never crash
        return ZoneInfo("UTC")


def business_hours_open(now: datetime, timezone: str | None, policy: ReminderPolicy) -> bool:
    local = now.astimezone(_zone(timezone)).time()
    return policy.opens <= local < policy.closes


def next_opening(now: datetime, timezone: str | None, policy: ReminderPolicy) -> datetime:
    """The next moment business hours open in that timezone (as an aware local time)."""
    zone = _zone(timezone)
    local = now.astimezone(zone)
    day = local.date() if local.time() < policy.opens else local.date() + timedelta(days=1)
    return datetime.combine(day, policy.opens, tzinfo=zone)


def _waiting(orders: Iterable[WaitingOrder], kind: ReminderKind, now: datetime,
             policy: ReminderPolicy) -> list[WaitingOrder]:
    wanted = []
    for order in orders:
        age = now - order.created_at
        if kind is ReminderKind.NO_CONSENT:
            fits = (order.reason in _CONSENT_REASONS
                    or order.reason == EligibilityReason.MANUAL_ONLY) and age >= policy.min_age
        else:
            fits = (order.reason in _PERSON_SOON and age >= policy.min_age) or (
                order.reason in _PERSON_LATER and age >= policy.stuck_after)
        if fits:
            wanted.append(order)
    wanted.sort(key=lambda o: (o.created_at, o.order_id))
    return wanted


def plan_reminders(merchants: Iterable[MerchantFacts],
                   orders: Mapping[str, Sequence[WaitingOrder]],
                   consents: Mapping[str, Sequence[ConsentRecord]],
                   history: Mapping[str, LastReminder], opted_out: Mapping[str, str],
                   now: datetime, policy: ReminderPolicy, domain: str) -> list[ReminderPlan]:
    """One plan per merchant with something waiting: due (skip is None) or why not."""
    plans = []
    current_window = window_index(now, policy.window)
    for merchant in merchants:
        records = consents.get(merchant.merchant_id, ())
        active = [c for c in records if c.status_at(now) is ConsentStatus.ACTIVE]
        kind = ReminderKind.NEEDS_A_PERSON if active else ReminderKind.NO_CONSENT
        waiting = _waiting(orders.get(merchant.merchant_id, ()), kind, now, policy)
        if not waiting:
            continue
        addresses: list[str] = []
        rejected: list[str] = []
        for location_id in dict.fromkeys(o.location_id for o in waiting):
            location = merchant.locations.get(location_id)
            email = location.business_email if location else None
            if email is None:
                continue
            (addresses if valid_address(email) else rejected).append(email)
        if kind is ReminderKind.NEEDS_A_PERSON:
            addresses += [c.grantor.email for c in active if valid_address(c.grantor.email)]
        recipients = tuple(sorted({a.lower(): a for a in addresses}.values(), key=str.lower))
        oldest = waiting[0]
        location = merchant.locations.get(oldest.location_id)
        zone = (location.timezone if location and location.timezone else None) \
            or merchant.timezone or "UTC"
        totals: dict[str, int] = {}
        for order in waiting:
            totals[order.currency] = totals.get(order.currency, 0) + order.total_amount
        age = now - oldest.created_at
        step = age_step(age, policy.age_steps)
        last = history.get(merchant.merchant_id)
        base = dict(merchant_id=merchant.merchant_id, business_name=merchant.business_name,
                    kind=kind, orders=tuple(waiting), recipients=recipients,
                    rejected_addresses=tuple(rejected), timezone=zone, age_step=step,
                    oldest_age=age, window_index=current_window,
                    message_id=message_id_for(merchant.merchant_id, current_window, domain),
                    last_reminded_at=last.last_sent_at if last else None, totals=totals)
        skip, detail, retry_of, expire = _decide(merchant, recipients, rejected, waiting, step,
                                                 last, opted_out, now, policy, zone)
        if retry_of is not None and last is not None:
            base.update(window_index=last.window_index, message_id=last.message_id)
        plans.append(ReminderPlan(**base, skip=skip, detail=detail,  # type: ignore[arg-type]
                                  retry_of=retry_of, expire=expire))
    return plans


def _decide(merchant: MerchantFacts, recipients: tuple[str, ...], rejected: list[str],
            waiting: list[WaitingOrder], step: int, last: LastReminder | None,
            opted_out: Mapping[str, str], now: datetime, policy: ReminderPolicy, zone: str
            ) -> tuple[SkipCode | None, str, str | None, str | None]:
    """(skip code or None, detail, deferred row to re-send, deferred row to expire)."""
    if merchant.merchant_id in opted_out:
        return SkipCode.OPTED_OUT, f"Opted out: {opted_out[merchant.merchant_id]}", None, None
    if not recipients:
        what = (f"the address on file is not valid ({', '.join(rejected)}); "
                if rejected else "no location with waiting orders has a business e-mail; ")
        return (SkipCode.NO_ADDRESS, f"No usable address: {what}ask the merchant to set one "
                "in the Square Dashboard (Account & Settings > Locations > Business "
                "information), or contact them another way.", None, None)
    if merchant.discovery_error:
        return (SkipCode.STALE_ORDERS, f"The last refresh failed ({merchant.discovery_error});"
                " refresh before reminding.", None, None)
    retry_of = expire = None
    if last is not None:
        in_window = now < last.created_at + policy.window
        if last.status == "deferred":
            if in_window:
                retry_of = last.message_id
                if last.next_attempt_at is not None and now < last.next_attempt_at:
                    return (SkipCode.RETRY_LATER, "The mail server deferred it; next try "
                            f"from {last.next_attempt_at.isoformat()}.", None, None)
            else:
                expire = last.message_id
        elif in_window:
            state = last.status or "in doubt: run recover"
            return (SkipCode.NOT_DUE, f"Already reminded this window ({state}, "
                    f"{last.created_at.isoformat()}); next from "
                    f"{(last.created_at + policy.window).isoformat()}.", None, None)
    if retry_of is None and last is not None and last.last_sent_at is not None:
        new = [o for o in waiting if o.order_id not in last.last_sent_order_ids]
        if not new and step <= last.last_sent_step:
            return (SkipCode.NOTHING_NEW, "No new order and no new age step since the last "
                    "reminder.", None, expire)
    if not business_hours_open(now, zone, policy):
        opening = next_opening(now, zone, policy)
        return (SkipCode.OUTSIDE_BUSINESS_HOURS, f"Outside business hours in {zone}; queued "
                f"for {opening.strftime('%Y-%m-%d %H:%M')} local time.", None, expire)
    return None, "", retry_of, expire


def utc(moment: str) -> datetime:
    return parse_time(moment).astimezone(UTC)
