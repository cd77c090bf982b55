"""Four-eyes on its own, without Square (issue 14): the threshold and what it names, the
preparer's stored preview, the second operator's decision, and the engine's gate, each with
the audit entry an auditor reads. Fast: one SQLite file and a hand-moved clock.
(tests/test_four_eyes.py runs the same rules end to end, against the emulator.)"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.audit import AuditTrail
from services.completion.approvals import (
    Approvals,
    FourEyesPolicy,
    approval_items,
    approval_totals,
)
from services.completion.model import ApprovedItem, approved_set_sha256
from services.errors import ApprovalRefused, ConfigurationError
from services.store import SQLiteStore, utc_text

POLICY = FourEyesPolicy(max_orders=3, max_amount=Decimal("100.00"), ttl=timedelta(minutes=30))
START = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Desk:
    store: SQLiteStore
    audit: AuditTrail
    clock: Clock
    approvals: Approvals

    def queue(self, merchant_id: str, order_id: str, amount: int, currency: str = "USD"
              ) -> ApprovedItem:
        self.store.conn.execute(
            "INSERT INTO orders (order_id, merchant_id, location_id, version, state, "
            "total_amount, currency, due_amount, created_at, eligible, order_json, seen_at) "
            "VALUES (?, ?, 'L1', 3, 'OPEN', ?, ?, 0, 'x', 1, '{}', 'x')",
            [order_id, merchant_id, amount, currency])
        return ApprovedItem(merchant_id, order_id, 3)

    def small(self) -> list[ApprovedItem]:
        return [self.queue("M1", f"S{i}", 1000) for i in range(3)]  # 3 orders, 30.00 USD

    def big(self) -> list[ApprovedItem]:
        return [self.queue("M1", f"B{i}", 1000) for i in range(4)]  # 4 orders: over 3

    def queue_set(self, name: str) -> list[ApprovedItem]:
        """Four orders of their own (over the threshold), queued once per name."""
        items = [ApprovedItem("M1", f"{name}-{i}", 3) for i in range(4)]
        if self.store.conn.execute("SELECT 1 FROM orders WHERE order_id = ?",
                                   [items[0].order_id]).fetchone() is None:
            for item in items:
                self.queue("M1", item.order_id, 1000)
        return items

    def entries(self, action: str) -> list[dict[str, Any]]:
        return list(self.audit.entries(action=action))

    def refused(self, batch_id: str | None, items: list[ApprovedItem], operator: str = "ana"
                ) -> ApprovalRefused:
        with pytest.raises(ApprovalRefused) as caught:
            self.approvals.gate(batch_id, items, operator)
        # Every refusal is on the record: who, which batch, which exact set, and why.
        last = self.entries("batch_refused")[-1]
        assert (last["operator"], last["batch_id"], last["approved_set_sha256"],
                last["outcome"], last["detail"]) == (
            operator, batch_id, approved_set_sha256(sorted(set(items))), "refused",
            f"{caught.value.code}: {caught.value.detail}"[:500])
        return caught.value

    def prepared_and_approved(self, items: list[ApprovedItem], batch_id: str = "b1") -> str:
        self.approvals.prepare(batch_id, items, "ana", {}, "4 orders, more than 3")
        self.approvals.decide(batch_id, "ben", True, "checked")
        return batch_id


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[Desk]:
    store = SQLiteStore(tmp_path / "recon.db")
    audit = AuditTrail(store)
    clock = Clock()
    yield Desk(store, audit, clock, Approvals(store, audit, POLICY, clock))
    store.close()


# ---------------------------------------------------------------- the threshold
def test_the_policy_names_what_is_over_and_allows_exactly_the_threshold() -> None:
    assert POLICY.why_needed(3, {"USD": 10000}) is None
    assert POLICY.why_needed(4, {}) == "4 orders, more than 3"
    assert POLICY.why_needed(1, {"USD": 10001}) == (
        "10001 USD (minor units), more than 100.00 USD")
    # Currencies are looked at in a fixed order, so the sentence does not change between runs.
    assert POLICY.why_needed(1, {"USD": 10001, "EUR": 10001}) == (
        "10001 EUR (minor units), more than 100.00 EUR")
    assert POLICY.why_needed(1, {"JPY": 100}) is None  # no minor unit: 100 yen is the limit
    assert POLICY.why_needed(1, {"JPY": 101}) == "101 JPY (minor units), more than 100.00 JPY"
    assert POLICY.why_needed(1, {}, unpriced=2) == "2 orders could not be priced from the queue"
    assert FourEyesPolicy() == FourEyesPolicy(200, Decimal("10000.00"), timedelta(minutes=30))


def test_totals_are_per_merchant_and_currency_and_the_threshold_adds_merchants_up(
        desk: Desk) -> None:
    m1 = desk.queue("M1", "O1", 6000)
    m1_eur = desk.queue("M1", "O2", 500, "EUR")
    m1_more = desk.queue("M1", "O4", 250)
    m2 = desk.queue("M2", "O3", 6000)
    gone = ApprovedItem("M2", "NOT-QUEUED", 1)
    also_gone = ApprovedItem("M1", "ALSO-NOT-QUEUED", 1)
    assert desk.approvals.totals([gone, m1, m1_eur, also_gone, m1_more, m2]) == (
        {"M1": {"USD": 6250, "EUR": 500}, "M2": {"USD": 6000}}, 2)
    # 60.00 USD at each merchant: 120.00 USD in the batch, over 100.00.
    assert desk.approvals.why_needed([m1, m2]) == (
        "12000 USD (minor units), more than 100.00 USD")
    assert desk.approvals.why_needed([m1, m1_eur]) is None
    assert desk.approvals.why_needed([m1, gone]) == (
        "1 orders could not be priced from the queue")
    # The same order named four times is one order, under a threshold of three.
    assert desk.approvals.why_needed([m1_eur] * 4) is None


# ---------------------------------------------------------------- prepare and decide
def test_prepare_stores_exactly_the_previewed_set_and_audits_the_request(desk: Desk) -> None:
    items = desk.big()
    shown = {"M1": {"USD": 4000}}
    approval = desk.approvals.prepare("b1", [*reversed(items), items[0]], "ana", shown,
                                      "4 orders, more than 3")
    assert approval == desk.store.approval("b1")
    assert (approval.batch_id, approval.approved_set_sha256, approval.orders, approval.why,
            approval.prepared_by, approval.prepared_at, approval.status) == (
        "b1", approved_set_sha256(items), 4, "4 orders, more than 3", "ana",
        utc_text(START), "pending")
    assert approval_items(approval) == sorted(items)
    assert approval_totals(approval) == shown
    assert orjson.loads(approval.items_json) == [["M1", f"B{i}", 3] for i in range(4)]
    [requested] = desk.entries("approval_requested")
    assert (requested["operator"], requested["batch_id"], requested["approved_set_sha256"],
            requested["detail"]) == ("ana", "b1", approved_set_sha256(items),
                                     "4 orders need a second operator: 4 orders, more than 3")
    desk.approvals.prepare("b2", items, "ana", shown, "x" * 600)
    assert len(desk.entries("approval_requested")[-1]["detail"]) == 500  # bounded


def test_an_approval_is_good_for_the_ttl_and_audited_with_its_reason(desk: Desk) -> None:
    items = desk.big()
    desk.approvals.prepare("b1", items, "ana", {}, "4 orders, more than 3")
    desk.clock.now = START + timedelta(minutes=5)
    decided = desk.approvals.decide("b1", "ben", True, "totals match the tickets")
    expires = utc_text(START + timedelta(minutes=35))
    assert (decided.status, decided.decided_by, decided.decided_at, decided.reason,
            decided.expires_at) == ("approved", "ben", utc_text(desk.clock.now),
                                    "totals match the tickets", expires)
    [granted] = desk.entries("approval_granted")
    assert (granted["operator"], granted["batch_id"], granted["approved_set_sha256"],
            granted["outcome"], granted["detail"]) == (
        "ben", "b1", approved_set_sha256(items), "approved",
        f"prepared by ana; expires {expires}; reason: totals match the tickets")


def test_a_rejection_never_expires_into_an_approval_and_says_why(desk: Desk) -> None:
    items = desk.big()
    desk.approvals.prepare("b1", items, "ana", {}, "why")
    decided = desk.approvals.decide("b1", "ben", False, None)
    assert (decided.status, decided.decided_by, decided.expires_at) == (
        "rejected", "ben", None)
    [rejected] = desk.entries("approval_rejected")
    assert (rejected["operator"], rejected["outcome"], rejected["detail"]) == (
        "ben", "rejected", "prepared by ana; reason: -")
    assert desk.entries("approval_granted") == []
    desk.approvals.prepare("b2", items, "ana", {}, "why")
    desk.approvals.decide("b2", "ben", False, "r" * 600)
    assert len(desk.entries("approval_rejected")[-1]["detail"]) == 500  # bounded
    refusal = desk.refused("b2", items)  # the refusal repeats the reason: bounded too
    assert len(refusal.detail) > 500


def test_a_decision_is_taken_once_by_someone_other_than_the_preparer(
        desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    desk.approvals.prepare("b1", desk.big(), "ana", {}, "why")
    with pytest.raises(ApprovalRefused) as caught:
        desk.approvals.decide("b1", "ana", True, "looks fine to me")
    assert (caught.value.code, caught.value.detail) == (
        "APPROVAL_SELF_GIVEN",
        "ana prepared batch b1: another operator must approve or reject it.")
    assert desk.approvals.get("b1").status == "pending"
    desk.approvals.decide("b1", "ben", True, "ok")
    with pytest.raises(ApprovalRefused) as caught:
        desk.approvals.decide("b1", "cleo", False, "too late")
    assert (caught.value.code, caught.value.detail) == (
        "APPROVAL_DECIDED", "batch b1 is already approved (by ben).")
    # Decided by another process between the read and the write (the conditional UPDATE).
    desk.approvals.prepare("b2", desk.small(), "ana", {}, "why")
    monkeypatch.setattr(desk.store, "decide_approval", lambda *args: False)
    with pytest.raises(ApprovalRefused) as caught:
        desk.approvals.decide("b2", "ben", True, "ok")
    assert (caught.value.code, caught.value.detail) == (
        "APPROVAL_DECIDED", "batch b2 was decided meanwhile by another operator.")
    assert [e["batch_id"] for e in desk.entries("approval_granted")] == ["b1"]


def test_an_unknown_batch_is_a_usage_error_that_says_where_to_look(desk: Desk) -> None:
    with pytest.raises(ConfigurationError) as caught:
        desk.approvals.decide("b9", "ben", True, "ok")
    assert str(caught.value) == ("Unknown batch b9: `recon-console approve` lists the "
                                 "prepared ones.")


def test_listed_are_the_pending_and_the_approved_until_they_expire(desk: Desk) -> None:
    for batch_id in ("pending", "approved", "rejected", "used"):
        desk.approvals.prepare(batch_id, desk.queue_set(batch_id), "ana", {}, "why")
    desk.approvals.decide("approved", "ben", True, "ok")
    desk.approvals.decide("rejected", "ben", False, "no")
    desk.approvals.decide("used", "ben", True, "ok")
    desk.approvals.gate("used", desk.queue_set("used"), "ana")
    # Approved without an expiry (written around `decide`): the gate never runs it.
    desk.approvals.prepare("no-expiry", desk.queue_set("no-expiry"), "ana", {}, "why")
    with desk.store.transaction():
        desk.store.decide_approval("no-expiry", "approved", "ben", utc_text(START), "ok", None)
    assert [a.batch_id for a in desk.approvals.listed()] == ["approved", "pending"]
    desk.clock.now = START + POLICY.ttl - timedelta(microseconds=1)
    assert [a.batch_id for a in desk.approvals.listed()] == ["approved", "pending"]
    desk.clock.now = START + POLICY.ttl  # expired at exactly its time
    assert [a.batch_id for a in desk.approvals.listed()] == ["pending"]


# ---------------------------------------------------------------- the engine's gate
def test_under_the_threshold_one_operator_is_enough(desk: Desk) -> None:
    small = desk.small()
    desk.approvals.gate(None, small, "ana")
    desk.approvals.gate("never-prepared", small, "ana")
    assert desk.entries("batch_refused") == desk.entries("approval_used") == []


def test_over_the_threshold_without_an_approval_nothing_runs_and_the_refusal_is_audited(
        desk: Desk) -> None:
    items = desk.big()
    refusal = desk.refused(None, items)
    assert refusal.code == "APPROVAL_MISSING"
    assert refusal.detail == (
        "this batch (4 orders, more than 3) needs a second operator's approval: prepare it "
        "and have another operator run `recon-console approve BATCH_ID`.")
    assert desk.refused("never-prepared", items).code == "APPROVAL_MISSING"
    first, second = desk.entries("batch_refused")
    assert (first["operator"], first["batch_id"], first["approved_set_sha256"],
            first["outcome"], first["detail"]) == (
        "ana", None, approved_set_sha256(items), "refused",
        f"APPROVAL_MISSING: {refusal.detail}")
    assert second["batch_id"] == "never-prepared"


def test_a_pending_rejected_or_used_approval_does_not_run(desk: Desk) -> None:
    items = desk.big()
    desk.approvals.prepare("b1", items, "ana", {}, "why")
    refusal = desk.refused("b1", items)
    assert (refusal.code, refusal.detail) == ("APPROVAL_PENDING",
                                              "batch b1 has not been approved yet.")
    desk.approvals.decide("b1", "ben", False, "totals look wrong")
    refusal = desk.refused("b1", items)
    assert (refusal.code, refusal.detail) == (
        "APPROVAL_REJECTED", "batch b1 was rejected by ben: totals look wrong.")
    desk.approvals.prepare("b2", items, "ana", {}, "why")
    desk.approvals.decide("b2", "ben", False, None)
    assert desk.refused("b2", items).detail == "batch b2 was rejected by ben: -."
    desk.prepared_and_approved(items, "b3")
    desk.clock.now = START + timedelta(minutes=1)
    desk.approvals.gate("b3", items, "ana")
    refusal = desk.refused("b3", items)
    assert (refusal.code, refusal.detail) == (
        "APPROVAL_USED", f"batch b3 already ran ({utc_text(desk.clock.now)}); an approval is "
        "good for one run: prepare the rest again.")
    assert [e["detail"].split(":")[0] for e in desk.entries("batch_refused")] == [
        "APPROVAL_PENDING", "APPROVAL_REJECTED", "APPROVAL_REJECTED", "APPROVAL_USED"]


def test_an_approval_runs_exactly_its_set_once_and_says_who_approved_and_who_ran(
        desk: Desk) -> None:
    items = desk.big()
    desk.prepared_and_approved(items)
    # The same set in another order, one order named twice: still exactly that set.
    desk.clock.now = START + timedelta(minutes=29)
    desk.approvals.gate("b1", [*reversed(items), items[0]], "cleo")
    used = desk.store.approval("b1")
    assert used is not None
    assert (used.status, used.used_by, used.used_at) == ("used", "cleo",
                                                         utc_text(desk.clock.now))
    [entry] = desk.entries("approval_used")
    assert (entry["operator"], entry["batch_id"], entry["approved_set_sha256"],
            entry["detail"]) == ("cleo", "b1", approved_set_sha256(items),
                                 "approved by ben; run by cleo")
    assert desk.entries("batch_refused") == []


def test_an_approval_of_another_set_is_refused_and_not_used_up(desk: Desk) -> None:
    items = desk.big()
    desk.prepared_and_approved(items)
    for other in (items[:-1], [*items, desk.queue("M1", "EXTRA", 1)],
                  [*items[:-1], ApprovedItem("M1", "B3", 4)]):  # another version
        refusal = desk.refused("b1", other)
        sha, wanted = approved_set_sha256(items), approved_set_sha256(sorted(set(other)))
        assert (refusal.code, refusal.detail) == (
            "APPROVAL_OTHER_SET", f"the approval of batch b1 is for set {sha[:16]}…, not "
            f"this one ({wanted[:16]}…): prepare the new set and have it approved.")
    desk.approvals.gate("b1", items, "ana")
    assert desk.approvals.get("b1").status == "used"


def test_an_approval_given_by_its_own_preparer_is_refused(desk: Desk) -> None:
    """Written around `decide`, straight into the database: the gate still refuses it."""
    items = desk.big()
    for batch_id, decided_by in (("b1", "ana"), ("b2", "")):
        desk.approvals.prepare(batch_id, items, "ana", {}, "why")
        with desk.store.transaction():
            desk.store.decide_approval(batch_id, "approved", decided_by, utc_text(START),
                                       "me", utc_text(START + POLICY.ttl))
        refusal = desk.refused(batch_id, items)
        assert (refusal.code, refusal.detail) == (
            "APPROVAL_SELF_GIVEN", f"batch {batch_id} was approved by its own preparer (ana): "
            "it needs a second operator.")
    assert desk.entries("approval_used") == []


def test_an_approval_expires_at_exactly_its_time(desk: Desk) -> None:
    items = desk.big()
    desk.prepared_and_approved(items)
    expires = utc_text(START + POLICY.ttl)
    desk.clock.now = START + POLICY.ttl
    refusal = desk.refused("b1", items)
    assert (refusal.code, refusal.detail) == (
        "APPROVAL_EXPIRED", f"the approval of batch b1 expired at {expires}: have it approved "
        "again.")
    desk.clock.now = START + POLICY.ttl - timedelta(microseconds=1)
    desk.approvals.gate("b1", items, "ana")
    # An approved row without an expiry (written around `decide`) never runs.
    desk.approvals.prepare("b2", items, "ana", {}, "why")
    with desk.store.transaction():
        desk.store.decide_approval("b2", "approved", "ben", utc_text(START), "ok", None)
    assert desk.refused("b2", items).code == "APPROVAL_EXPIRED"


def test_an_approval_claimed_by_another_run_meanwhile_sends_nothing(
        desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    items = desk.big()
    desk.prepared_and_approved(items)
    monkeypatch.setattr(desk.store, "use_approval", lambda *args: False)
    refusal = desk.refused("b1", items)
    assert (refusal.code, refusal.detail) == (
        "APPROVAL_USED", "batch b1's approval was just used by another run, or expired: "
        "nothing was sent.")
    assert desk.entries("approval_used") == []


# ---------------------------------------------------------------- batches split to stay under
def _sent(desk: Desk, batch_id: str, operator: str, orders: list[tuple[str, int]],
          outcome: str | None = "completed", minutes_ago: float = 10) -> None:
    """Intents of a batch `operator` ran `minutes_ago`, settled with `outcome` (None: still
    in doubt)."""
    at = utc_text(desk.clock.now - timedelta(minutes=minutes_ago))
    with desk.store.transaction():
        desk.store.insert_batch(batch_id, operator, "sha", "[]")
        desk.store.insert_intents([
            {"intent_id": f"{batch_id}:{order_id}", "attempt": 1,
             "idempotency_key": f"k-{batch_id}-{order_id}", "batch_id": batch_id,
             "merchant_id": "M1", "order_id": order_id, "location_id": "L1", "version": 3,
             "amount": amount, "currency": "USD", "consent_id": "C1", "consent_sha256": "s",
             "operator": operator, "created_at": at, "body_json": "{}"}
            for order_id, amount in orders])
    if outcome is not None:
        for order_id, _ in orders:
            desk.store.settle_intent(f"{batch_id}:{order_id}", outcome, None, None, "")


def test_what_an_operator_sent_unapproved_in_the_window_counts_with_the_next_batch(
        desk: Desk) -> None:
    """Three batches of two under a threshold of three are a batch of six: the second one
    already needs a second operator. Another operator's batches are theirs."""
    _sent(desk, "r1", "ana", [("P1", 1000), ("P2", 1000)])
    one = [desk.queue("M1", "N1", 1000)]
    two = [*one, desk.queue("M1", "N2", 1000)]
    assert desk.approvals.why_needed(one, "ana") is None  # 2 + 1: at the threshold
    refusal = desk.refused(None, two, "ana")                # 2 + 2: over it
    assert refusal.code == "APPROVAL_MISSING"
    assert ("4 orders, more than 3, counting the 2 orders ana sent without a second operator "
            "in the last 60 minutes") in refusal.detail
    # Names are typed: another spelling of ana is ana.
    assert desk.approvals.why_needed(two, "  ANA") is not None
    desk.approvals.gate(None, two, "ben")  # ben's own window is empty
    # The batch's own orders are not counted twice (a retry of what was sent).
    assert desk.approvals.why_needed([desk.queue("M1", "N3", 1000), ApprovedItem(
        "M1", "P1", 3)], "ana") is None


def test_the_window_adds_amounts_and_ends(desk: Desk) -> None:
    _sent(desk, "r1", "ana", [("P1", 9000)], minutes_ago=59)
    small = [desk.queue("M1", "N1", 2000)]  # 20.00 alone; 110.00 with the 90.00 sent
    assert desk.approvals.why_needed(small, "ana") == (
        "11000 USD (minor units), more than 100.00 USD, counting the 1 orders ana sent "
        "without a second operator in the last 60 minutes")
    desk.clock.now += timedelta(minutes=1, seconds=1)  # the first batch is out of the window
    assert desk.approvals.why_needed(small, "ana") is None
    desk.approvals.gate(None, small, "ana")


def test_only_orders_sent_and_not_refused_in_unapproved_batches_count(desk: Desk) -> None:
    _sent(desk, "failed", "ana", [("F1", 1000), ("F2", 1000)], outcome="failed")
    _sent(desk, "skipped", "ana", [("S1", 1000), ("S2", 1000)], outcome="skipped")
    approved = desk.queue_set("approved")  # 4 orders, run with ben's approval
    desk.prepared_and_approved(approved, "approved")
    desk.approvals.gate("approved", approved, "ana")
    _sent(desk, "approved", "ana", [(i.order_id, 1000) for i in approved])
    two = [desk.queue("M1", "N1", 1000), desk.queue("M1", "N2", 1000)]
    assert desk.approvals.why_needed(two, "ana") is None
    _sent(desk, "doubt", "ana", [("D1", 1000), ("D2", 1000)], outcome=None)  # may be done
    assert desk.approvals.why_needed(two, "ana") == (
        "4 orders, more than 3, counting the 2 orders ana sent without a second operator in "
        "the last 60 minutes")


def test_a_window_of_zero_looks_at_the_batch_alone(desk: Desk) -> None:
    _sent(desk, "r1", "ana", [("P1", 1000), ("P2", 1000), ("P3", 1000)])
    alone = Approvals(desk.store, desk.audit, FourEyesPolicy(
        3, Decimal("100.00"), timedelta(minutes=30), timedelta(0)), desk.clock)
    assert alone.why_needed([desk.queue("M1", "N1", 1000)], "ana") is None
    assert desk.approvals.why_needed([desk.queue("M1", "N2", 1000)], "ana") is not None
