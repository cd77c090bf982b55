"""What the engine decides and reports: approved items, outcomes, skip reasons, results, the
idempotency key of an attempt, and the intent written before each request."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec
import orjson

from services.canonical_json import canonical_sha256
from services.eligibility import Classification, EligibilityReason

__all__ = ["ApprovedItem", "BatchProgress", "Intent", "OrderResult", "Outcome", "SkipReason",
           "approved_set_sha256", "idempotency_key", "skip_for"]


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
    TOKEN_MERCHANT_MISMATCH = "TOKEN_MERCHANT_MISMATCH"
    NO_CREDENTIALS = "NO_CREDENTIALS"
    CANCELLED = "CANCELLED"
    LEASED = "LEASED"
    SQUARE_UNREACHABLE = "SQUARE_UNREACHABLE"
    DATABASE_UNWRITABLE = "DATABASE_UNWRITABLE"


# A result whose outcome Square gave but the database could not keep: its intent stays open.
NOT_RECORDED = "OUTCOME_NOT_RECORDED"

_CONSENT_SKIPS = {
    EligibilityReason.CONSENT_REVOKED: SkipReason.CONSENT_REVOKED,
    EligibilityReason.CONSENT_EXPIRED: SkipReason.CONSENT_EXPIRED,
    EligibilityReason.CONSENT_NOT_YET_EFFECTIVE: SkipReason.NO_CONSENT,
    EligibilityReason.NO_CONSENT: SkipReason.NO_CONSENT,
    EligibilityReason.OUTSIDE_CONSENT_SCOPE: SkipReason.OUTSIDE_CONSENT_SCOPE,
}


def skip_for(verdict: Classification) -> tuple[SkipReason, str]:
    """Why an order that is no longer eligible is skipped: consent reasons keep their name."""
    assert verdict.reason is not None
    skip = _CONSENT_SKIPS.get(verdict.reason, SkipReason.NO_LONGER_ELIGIBLE)
    return skip, f"{verdict.reason.value}: {verdict.detail}"


def token_skip(code: str) -> SkipReason:
    """A refused token's own code when it is one of ours (TOKEN_MERCHANT_MISMATCH), so the
    operator sees what is wrong; otherwise TOKEN_REJECTED."""
    try:
        return SkipReason(code)
    except ValueError:
        return SkipReason.TOKEN_REJECTED


class ApprovedItem(msgspec.Struct, frozen=True, order=True, gc=False):
    """One order of an approved set. Untracked by the garbage collector: a preview of
    70,000 of them triggered full collections that stalled the console's UI thread."""

    merchant_id: str
    order_id: str
    version: int


def approved_set_sha256(items: Sequence[ApprovedItem]) -> str:
    # Tuples (the same JSON arrays as lists): left untracked by the garbage collector.
    return canonical_sha256(sorted((i.merchant_id, i.order_id, i.version) for i in items))


def idempotency_key(order_id: str, version: int, attempt: int = 1) -> str:
    """Derived from (order, version, attempt). Every resend within one attempt reuses it, so
    a lost answer can be asked again and Square replays the first result instead of applying
    twice. A new attempt (after Square definitely answered, e.g. a 200 that left the order
    OPEN) needs a new key: Square would replay that cached answer to the old one. The
    approved version in the body is what stops a new attempt from completing twice.
    Square allows 192 characters."""
    key = f"recon-complete:{order_id}:{version}" + (f":{attempt}" if attempt > 1 else "")
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


@dataclass
class Intent:
    """One attempt at one approved order, as written before its request leaves."""

    item: ApprovedItem
    key: str
    body: dict[str, Any]
    location_id: str
    amount: int
    currency: str
    consent_id: str | None
    consent_sha256: str | None
    intent_id: str = ""
    attempt: int = 1

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Intent:
        return cls(ApprovedItem(row["merchant_id"], row["order_id"], row["version"]),
                   row["idempotency_key"], orjson.loads(row["body_json"]), row["location_id"],
                   row["amount"], row["currency"], row["consent_id"], row["consent_sha256"],
                   row["intent_id"], row["attempt"])
