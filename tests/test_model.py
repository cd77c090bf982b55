"""What the engine decides and reports, alone and fast: the idempotency key of each attempt
(what makes a resend a replay, not a second completion), the skip reason an operator reads for
an order no longer eligible, the results `complete --json` prints (interfaces.md), and the
intent `recover` reads back exactly as it was written before the request left."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

from services.audit import AuditTrail
from services.completion.journal import IntentJournal, Run
from services.completion.model import (
    ApprovedItem,
    Intent,
    OrderResult,
    Outcome,
    SkipReason,
    idempotency_key,
    skip_for,
    token_skip,
)
from services.eligibility import Classification, EligibilityReason
from services.store import SQLiteStore

SQUARE_KEY_LIMIT = 192  # Square refuses a longer idempotency_key (VALUE_TOO_LONG)


def test_each_attempt_has_its_own_key_and_every_resend_of_one_attempt_the_same() -> None:
    assert idempotency_key("ORDER1", 3) == "recon-complete:ORDER1:3"
    assert idempotency_key("ORDER1", 3, 1) == "recon-complete:ORDER1:3"
    # Attempt 2 (after Square answered 200 and left the order OPEN) must not reuse attempt
    # 1's key: Square would replay that cached OPEN answer instead of trying again.
    assert idempotency_key("ORDER1", 3, 2) == "recon-complete:ORDER1:3:2"
    assert idempotency_key("ORDER1", 3, 3) == "recon-complete:ORDER1:3:3"
    assert len({idempotency_key("ORDER1", 3, a) for a in (1, 2, 3)}) == 3


def test_a_key_longer_than_square_allows_is_hashed_and_still_ours() -> None:
    prefix = len("recon-complete::1")
    fits = "X" * (SQUARE_KEY_LIMIT - prefix)  # exactly 192 characters: sent as it is
    assert idempotency_key(fits, 1) == f"recon-complete:{fits}:1"
    assert len(idempotency_key(fits, 1)) == SQUARE_KEY_LIMIT
    too_long = fits + "Y"  # 193: Square would refuse it, so it is hashed
    hashed = idempotency_key(too_long, 1)
    assert hashed == "recon-complete:" + hashlib.sha256(
        f"recon-complete:{too_long}:1".encode()).hexdigest()
    assert len(hashed) <= SQUARE_KEY_LIMIT
    # Still one key per (order, version, attempt), and still recognisably the product's in
    # Square's API logs.
    assert hashed == idempotency_key(too_long, 1)
    assert len({idempotency_key(too_long, v, a) for v in (1, 2) for a in (1, 2)}) == 4


def test_an_order_no_longer_eligible_is_skipped_with_its_consent_reason_by_name() -> None:
    consent_skips = {
        EligibilityReason.CONSENT_REVOKED: SkipReason.CONSENT_REVOKED,
        EligibilityReason.CONSENT_EXPIRED: SkipReason.CONSENT_EXPIRED,
        EligibilityReason.CONSENT_NOT_YET_EFFECTIVE: SkipReason.NO_CONSENT,
        EligibilityReason.NO_CONSENT: SkipReason.NO_CONSENT,
        EligibilityReason.OUTSIDE_CONSENT_SCOPE: SkipReason.OUTSIDE_CONSENT_SCOPE,
    }
    for reason in EligibilityReason:
        skip, detail = skip_for(Classification(False, reason, "what classify said."))
        assert skip is consent_skips.get(reason, SkipReason.NO_LONGER_ELIGIBLE), reason
        assert detail == f"{reason.value}: what classify said."


def test_a_refused_token_keeps_our_own_code_else_is_token_rejected() -> None:
    assert token_skip("TOKEN_MERCHANT_MISMATCH") is SkipReason.TOKEN_MERCHANT_MISMATCH
    assert token_skip("UNAUTHORIZED") is SkipReason.TOKEN_REJECTED
    assert token_skip("ACCESS_TOKEN_REVOKED") is SkipReason.TOKEN_REJECTED


def test_results_print_as_the_complete_json_contract_says() -> None:
    item = ApprovedItem("M1", "O1", 3)
    skipped = OrderResult.of(item, Outcome.SKIPPED, SkipReason.VERSION_CHANGED, "moved on")
    completed = OrderResult.of(item, Outcome.COMPLETED, None, "COMPLETED at version 4.")
    assert orjson.loads(orjson.dumps([skipped.to_json(), completed.to_json()])) == [
        {"merchant_id": "M1", "order_id": "O1", "version": 3, "outcome": "skipped",
         "reason": "VERSION_CHANGED", "detail": "moved on"},
        {"merchant_id": "M1", "order_id": "O1", "version": 3, "outcome": "completed",
         "reason": None, "detail": "COMPLETED at version 4."}]


def test_recover_reads_back_each_open_intent_exactly_as_it_was_written(
        tmp_path: Path) -> None:
    """Recovery resends an open intent with the same key and body (a replay if it applied),
    re-checks the consent against the version it relied on, and audits the same amount."""
    store = SQLiteStore(tmp_path / "recon.db")
    journal = IntentJournal(store, AuditTrail(store), "tester", lambda run: None)
    written = [
        Intent(ApprovedItem("M1", "O1", 3), "", {"idempotency_key": "", "order": {
            "location_id": "L1", "version": 3, "state": "COMPLETED"}},
            "L1", 1250, "USD", "consent-1", "c" * 64),
        Intent(ApprovedItem("M1", "O2", 7), "", {"idempotency_key": "", "order": {
            "location_id": "L2", "version": 7, "state": "COMPLETED"}},
            "L2", 99, "JPY", None, None),
    ]
    first = Run("b1", "sha", 2)
    journal.begin_batch(first, [i.item for i in written])
    assert journal.write_intents(first, written)
    again = Intent(ApprovedItem("M1", "O1", 3), "", {"idempotency_key": "", "order": {
        "location_id": "L1", "version": 3, "state": "COMPLETED"}},
        "L1", 1250, "USD", "consent-1", "c" * 64)
    second = Run("b2", "sha", 1)
    journal.begin_batch(second, [again.item])
    assert journal.write_intents(second, [again])  # a second attempt at O1: key :2
    assert again.attempt == 2 and again.key == idempotency_key("O1", 3, 2)
    read = sorted((Intent.from_row(row) for row in store.open_intents()),
                  key=lambda i: (i.item.order_id, i.attempt))
    assert read == sorted([*written, again], key=lambda i: (i.item.order_id, i.attempt))
    assert [(i.key, i.body["idempotency_key"], i.attempt, i.intent_id) for i in read] == [
        (idempotency_key("O1", 3), idempotency_key("O1", 3), 1, "b1:O1:1"),
        (idempotency_key("O1", 3, 2), idempotency_key("O1", 3, 2), 2, "b2:O1:2"),
        (idempotency_key("O2", 7), idempotency_key("O2", 7), 1, "b1:O2:1")]
    store.close()
