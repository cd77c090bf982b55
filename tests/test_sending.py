"""Sending one intent (`services.completion.sending`) against the emulator: the last look before
the call, and what each kind of answer becomes. The real gateway talks to the emulator; a
script in front of it decides what happens to the next UpdateOrders: an error before the
request leaves, a request Square applies whose answer is lost, or a change to the order
first. Whether an order was completed is read from the emulator, never from the product."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.completion import Outcome
from services.completion.engine import CompletionEngine
from services.completion.journal import Run
from services.completion.model import Intent
from services.demo import consent_for
from services.emulator import FaultPlan
from services.errors import (
    SquareAuthError,
    SquareInvalidRequest,
    SquareRateLimited,
    SquareServerError,
    SquareUnavailable,
)
from services.square_gateway import SquareGateway
from services.square_models import SquareOrder
from services.workspace import Workspace
from tests.conftest import Emulator, make_emulator
from tests.test_completion import ready_workspace

LOST = "lost"  # sent and applied by Square; the answer never comes back
EMPTY = "empty"  # a 200 whose body holds no order


class Scripted:
    """The gateway, with what happens to the next UpdateOrder calls, in order. A step is an
    exception raised before the request leaves, LOST, EMPTY, or a callable run first (e.g. a
    change to the order) before the request goes to Square. Past the script: Square."""

    def __init__(self, gateway: SquareGateway, script: list[Any]) -> None:
        self.gateway = gateway
        self.script = list(script)
        self.keys: list[str] = []

    async def update_order(self, creds: Any, order_id: str, body: dict[str, Any],
                           timeout_s: float | None = None) -> Any:
        self.keys.append(body["idempotency_key"])
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if step == EMPTY:
            return None
        if callable(step):
            step()
        order = await self.gateway.update_order(creds, order_id, body, timeout_s=timeout_s)
        if step == LOST:
            raise SquareUnavailable("the connection dropped before the answer arrived")
        return order


class Bench:
    """One merchant's open orders, their intents written, the lease taken: ready to send."""

    def __init__(self, emulator: Emulator, workspace: Workspace, engine: CompletionEngine,
                 intents: list[Intent]) -> None:
        self.emulator = emulator
        self.workspace = workspace
        self.engine = engine
        self.intents = intents
        self.run = Run("b1", "sha", len(intents))
        self.progress: list[Any] = []
        self.run.on_progress = self.progress.append
        self.merchant_id = intents[0].item.merchant_id
        self.creds = engine.credentials[self.merchant_id]
        assert engine.journal.write_intents(self.run, intents)
        assert engine.leases.take(self.merchant_id) is None

    def script(self, *steps: Any) -> Scripted:
        scripted = Scripted(self.engine.gateway, list(steps))
        self.engine.sender.gateway = scripted  # type: ignore[assignment]
        return scripted

    async def send(self, index: int = 0) -> Any:
        return await self.engine.sender.send(self.run, self.creds, self.intents[index])

    def square(self, index: int = 0) -> tuple[str, int | None]:
        record = self.emulator.square.orders[self.intents[index].item.order_id]
        return record.state, record.version

    def approved(self, index: int = 0) -> tuple[str, int]:
        return "OPEN", self.intents[index].item.version


async def bench(tmp_path: Path, count: int = 2, *, strict: bool = False,
                **options: Any) -> Bench:
    emulator = make_emulator(strict=strict)
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    workspace.engine_options.update(options)
    engine = workspace.engine()
    items = workspace.preview().items[:count]
    intents = [engine._check(i, SquareOrder.model_validate(
        emulator.square.orders[i.order_id].copy_doc())) for i in items]
    assert all(isinstance(i, Intent) for i in intents)
    return Bench(emulator, workspace, engine, intents)  # type: ignore[arg-type]


def server_error() -> SquareServerError:
    return SquareServerError(status=503, code="SERVICE_UNAVAILABLE", detail="try later")


def rate_limited() -> SquareRateLimited:
    return SquareRateLimited(status=429, code="RATE_LIMITED", detail="slow down",
                             retry_after=0.0)


async def test_a_lost_answer_is_asked_again_under_the_same_key_and_completes_once(
        tmp_path: Path) -> None:
    b = await bench(tmp_path)
    try:
        scripted = b.script(LOST, server_error())
        result = await b.send()
        version = b.intents[0].item.version
        assert b.square() == ("COMPLETED", version + 1)  # applied once, by the first call
        assert (result.outcome, result.reason, result.detail) == (
            Outcome.COMPLETED, None, f"COMPLETED at version {version + 1}.")
        assert scripted.keys == [b.intents[0].key] * 3
    finally:
        await b.workspace.aclose()


async def test_an_answer_that_never_comes_leaves_the_outcome_unknown(tmp_path: Path) -> None:
    b = await bench(tmp_path, max_attempts=3, breaker_threshold=10)
    try:
        scripted = b.script(*[SquareUnavailable("timed out")] * 5)
        assert await b.send() is None  # unknown: the intent stays open for `recover`
        assert len(scripted.keys) == 3  # max_attempts
        assert b.square() == b.approved()
        assert b.workspace.open_intent_count() == 2
    finally:
        await b.workspace.aclose()


async def test_a_merchant_that_keeps_failing_is_given_up_on(tmp_path: Path) -> None:
    b = await bench(tmp_path, max_attempts=6, breaker_threshold=2)
    try:
        scripted = b.script(*[server_error()] * 6)
        assert await b.send(0) is None
        assert len(scripted.keys) == 2  # the breaker opened at the second failure
        result = await b.send(1)  # never sent: the merchant is given up on
        assert len(scripted.keys) == 2
        assert (result.outcome, result.reason) == (Outcome.SKIPPED, "SQUARE_UNREACHABLE")
        assert result.detail.startswith(
            "Stopped sending to this merchant after 2 consecutive failures: Square had an "
            "internal error (503 SERVICE_UNAVAILABLE)")
        assert b.square(1) == b.approved(1)
    finally:
        await b.workspace.aclose()


async def test_any_answer_resets_the_count_of_consecutive_failures(tmp_path: Path) -> None:
    b = await bench(tmp_path, max_attempts=6, breaker_threshold=2)
    try:
        b.script(server_error(), None, server_error(), None)
        assert (await b.send(0)).outcome is Outcome.COMPLETED
        assert (await b.send(1)).outcome is Outcome.COMPLETED
        assert b.engine.breaker.open == {}
        assert b.square(1)[0] == "COMPLETED"
    finally:
        await b.workspace.aclose()


async def test_rate_limits_wait_without_using_up_attempts_and_halve_concurrency(
        tmp_path: Path) -> None:
    b = await bench(tmp_path, max_attempts=1, max_rate_limit_waits=3, overall=64,
                    per_merchant=4)
    try:
        scripted = b.script(rate_limited(), rate_limited())
        result = await b.send()
        assert result.outcome is Outcome.COMPLETED and len(scripted.keys) == 3
        assert b.square()[0] == "COMPLETED"
        assert b.engine.limit.limit == 16  # 64, halved twice
        # 4 -> 2 -> 1, then the fast answer grows it back by one.
        assert b.engine.sender.merchant_limit(b.merchant_id).limit == 2
        assert len(b.progress) == 2  # the console is told at each wait
    finally:
        await b.workspace.aclose()


async def test_square_that_keeps_rate_limiting_fails_the_order_unsent(tmp_path: Path) -> None:
    b = await bench(tmp_path, max_rate_limit_waits=2)
    try:
        scripted = b.script(*[rate_limited()] * 3)
        result = await b.send()
        assert len(scripted.keys) == 3
        assert (result.outcome, result.reason, result.detail) == (
            Outcome.FAILED, "RATE_LIMITED",
            "Square kept rate limiting; retry the failed orders later.")
        assert b.square() == b.approved()
    finally:
        await b.workspace.aclose()


async def test_after_a_lost_answer_no_refusal_is_reported_as_a_known_outcome(
        tmp_path: Path) -> None:
    """Once a request may have applied, a later refusal says nothing about the order: the
    outcome is unknown (None) and `recover` settles it against Square."""
    b = await bench(tmp_path, count=5, max_rate_limit_waits=1)
    refusals = [
        rate_limited(),
        SquareAuthError(status=401, code="ACCESS_TOKEN_REVOKED", detail="revoked"),
        SquareInvalidRequest(status=400, code="INVALID_VALUE", detail="no"),
    ]
    try:
        for index, refusal in enumerate(refusals):
            steps = [LOST, refusal, refusal] if refusal.status == 429 else [LOST, refusal]
            b.script(*steps)
            b.engine.sender.rejected_tokens.clear()
            assert await b.send(index) is None, refusal
            assert b.square(index)[0] == "COMPLETED"
        # A version moved by our own lost attempt, or by someone else: recover looks.
        moved = b.emulator.square.orders[b.intents[3].item.order_id]
        b.script(server_error(), lambda: b.emulator.square.touch(moved))
        assert await b.send(3) is None
        assert b.square(3) == ("OPEN", b.intents[3].item.version + 1)
        b.engine.leases.release(b.merchant_id)  # this run is over: recover may take it
        settled = {r.order_id: r for r in await b.workspace.recover()}
        assert {settled[i.item.order_id].outcome for i in b.intents[:3]} == {
            Outcome.COMPLETED}
        assert settled[b.intents[3].item.order_id].reason == "VERSION_CHANGED"
    finally:
        await b.workspace.aclose()


async def test_a_refused_token_fails_the_order_and_stops_the_merchant(tmp_path: Path) -> None:
    b = await bench(tmp_path, count=3)
    try:
        revoked = SquareAuthError(status=401, code="ACCESS_TOKEN_REVOKED", detail="revoked")
        scripted = b.script(revoked, SquareAuthError(status=401, code="UNAUTHORIZED",
                                                     detail="other"))
        result = await b.send(0)
        assert (result.outcome, result.reason, result.detail) == (
            Outcome.FAILED, "ACCESS_TOKEN_REVOKED", str(revoked))
        later = await b.send(1)  # not sent: the first refusal is what the operator sees
        assert len(scripted.keys) == 1
        assert (later.outcome, later.reason, later.detail) == (
            Outcome.SKIPPED, "TOKEN_REJECTED", str(revoked))
        assert [b.square(i) for i in (0, 1)] == [b.approved(0), b.approved(1)]
    finally:
        await b.workspace.aclose()


async def test_a_token_of_another_merchant_is_skipped_with_its_own_code(
        tmp_path: Path) -> None:
    b = await bench(tmp_path, count=2)
    try:
        mismatch = SquareAuthError(status=401, code="TOKEN_MERCHANT_MISMATCH",
                                   detail="another merchant's")
        scripted = b.script(mismatch)
        result = await b.send()
        assert (result.outcome, result.reason, result.detail) == (
            Outcome.SKIPPED, "TOKEN_MERCHANT_MISMATCH", str(mismatch))
        # The merchant's other orders are held back under the same code, unsent.
        later = await b.send(1)
        assert (later.outcome, later.reason) == (Outcome.SKIPPED, "TOKEN_MERCHANT_MISMATCH")
        assert len(scripted.keys) == 1
        assert [b.square(i) for i in (0, 1)] == [b.approved(0), b.approved(1)]
    finally:
        await b.workspace.aclose()


async def test_a_version_moved_before_the_call_is_skipped_under_either_reading(
        tmp_path: Path) -> None:
    """Square's VERSION_MISMATCH (400), or the 409 that strict mode answers instead."""
    for strict, code in ((False, "VERSION_MISMATCH"), (True, "CONFLICT")):
        (tmp_path / code).mkdir()
        b = await bench(tmp_path / code, count=1, strict=strict)
        try:
            moved = b.emulator.square.orders[b.intents[0].item.order_id]
            b.emulator.square.touch(moved)
            b.script()
            result = await b.send()
            assert (result.outcome, result.reason) == (Outcome.SKIPPED, "VERSION_CHANGED")
            assert result.detail.startswith(f"{code}: Supplied version ")
            assert b.square() == ("OPEN", b.intents[0].item.version + 1)
        finally:
            await b.workspace.aclose()


async def test_another_refusal_fails_the_order_with_squares_code_and_words(
        tmp_path: Path) -> None:
    b = await bench(tmp_path, count=1)
    try:
        b.intents[0].body["order"]["location_id"] = "ANOTHER-LOCATION"
        b.script()
        result = await b.send()
        assert (result.outcome, result.reason, result.detail) == (
            Outcome.FAILED, "BAD_REQUEST", "The order's location_id cannot be changed.")
        assert b.square() == b.approved()
    finally:
        await b.workspace.aclose()


async def test_a_200_that_did_not_complete_is_a_failure_saying_what_square_shows(
        tmp_path: Path) -> None:
    b = await bench(tmp_path)
    try:
        b.emulator.app.set_faults(FaultPlan(noop_update_rate=1.0))
        b.script()
        result = await b.send(0)
        assert (result.outcome, result.reason, result.detail) == (
            Outcome.FAILED, "NOT_COMPLETED",
            "Square answered 200 but the order is OPEN: nothing was completed.")
        b.emulator.app.set_faults(FaultPlan())
        b.script(EMPTY)
        result = await b.send(1)
        assert (result.outcome, result.reason) == (Outcome.FAILED, "NOT_COMPLETED")
        assert "the order is missing" in result.detail
        assert [b.square(i) for i in (0, 1)] == [b.approved(0), b.approved(1)]
    finally:
        await b.workspace.aclose()


async def test_fast_answers_grow_the_merchants_concurrency(tmp_path: Path) -> None:
    b = await bench(tmp_path, count=4, per_merchant=2, max_per_merchant=3)
    try:
        limit = b.engine.sender.merchant_limit(b.merchant_id)
        assert limit is b.engine.sender.merchant_limit(b.merchant_id)  # one per merchant
        assert (limit.limit, limit.maximum) == (2, 3)
        b.script()
        for index in range(4):
            assert (await b.send(index)).outcome is Outcome.COMPLETED
        assert limit.limit == 3  # grew, up to the maximum
    finally:
        await b.workspace.aclose()


def _skip(result: Any) -> tuple[Outcome, str, str]:
    return result.outcome, result.reason, result.detail


async def test_the_last_look_stops_what_may_not_be_sent(tmp_path: Path) -> None:
    """Cancelled, database broken, lease lost: skipped with the reason, nothing sent. A
    cancel is named first."""
    b = await bench(tmp_path, count=1)
    try:
        scripted = b.script()
        b.engine.leases.release(b.merchant_id)
        assert _skip(await b.send()) == (
            Outcome.SKIPPED, "LEASED", "Not sent: this run no longer holds the merchant's lease.")
        b.engine.journal.broken = "the database refused a write (disk I/O error)"
        assert _skip(await b.send()) == (
            Outcome.SKIPPED, "DATABASE_UNWRITABLE",
            "Not sent: the database refused a write (disk I/O error); run `recon-console "
            "recover`.")
        b.run.cancel.set()
        assert _skip(await b.send()) == (Outcome.SKIPPED, "CANCELLED",
                                         "Cancelled before it was sent.")
        assert scripted.keys == [] and b.square() == b.approved()
    finally:
        await b.workspace.aclose()


async def test_the_consent_is_looked_at_again_right_before_the_call(tmp_path: Path) -> None:
    b = await bench(tmp_path, count=1)
    try:
        scripted = b.script()
        sender = b.engine.sender
        intent = b.intents[0]
        consent_id = intent.consent_id
        now = datetime.now(UTC)
        sender.clock = lambda: now + timedelta(days=400)
        assert _skip(await b.send()) == (Outcome.SKIPPED, "CONSENT_EXPIRED",
                                         f"Consent {consent_id} is expired.")
        sender.clock = lambda: now - timedelta(days=31)
        assert _skip(await b.send()) == (Outcome.SKIPPED, "NO_CONSENT",
                                         f"Consent {consent_id} is not_yet_effective.")
        sender.clock = lambda: now
        intent.consent_id = "another-consent"
        assert _skip(await b.send()) == (Outcome.SKIPPED, "NO_CONSENT",
                                         "The consent relied on is gone.")
        intent.consent_id = consent_id
        # A new version of the same consent that no longer covers the order's location.
        merchant = next(m for m in b.emulator.merchants if m.merchant.id == b.merchant_id)
        narrowed = tmp_path / "narrowed.json"
        document = consent_for(merchant, now, locations=["SOME-OTHER-LOCATION"],
                               consent_id=consent_id)
        narrowed.write_text(json.dumps(document))
        b.workspace.import_consent_files([narrowed])
        assert _skip(await b.send()) == (Outcome.SKIPPED, "OUTSIDE_CONSENT_SCOPE",
                                         "Consent no longer covers the location.")
        b.workspace.revoke_consent(consent_id, "Owner", "changed their mind")
        sender.clock = lambda: datetime.now(UTC)  # the revocation takes effect now
        assert _skip(await b.send()) == (Outcome.SKIPPED, "CONSENT_REVOKED",
                                         f"Consent {consent_id} is revoked.")
        assert scripted.keys == [] and b.square() == b.approved()
    finally:
        await b.workspace.aclose()


async def test_a_changed_consent_sends_back_to_the_queue_unless_none_was_relied_on(
        tmp_path: Path) -> None:
    b = await bench(tmp_path, count=2)
    try:
        scripted = b.script()
        intent = b.intents[0]
        merchant = next(m for m in b.emulator.merchants if m.merchant.id == b.merchant_id)
        # Stricter, and naming the locations one by one (the orders' among them).
        document = consent_for(merchant, datetime.now(UTC),
                               locations=sorted({i.location_id for i in b.intents}
                                                | {"ELSEWHERE"}),
                               limits={"min_order_age_hours": 3},
                               consent_id=intent.consent_id)
        changed = tmp_path / "changed.json"
        changed.write_text(json.dumps(document))
        b.workspace.import_consent_files([changed])
        assert _skip(await b.send(0)) == (
            Outcome.SKIPPED, "NO_LONGER_ELIGIBLE",
            f"Consent {intent.consent_id} changed since this order was checked: back to the "
            "queue for a new decision.")
        assert scripted.keys == []
        # An intent that names no version of the consent (written before hashes were kept)
        # is judged on the consent's status and scope alone.
        b.intents[1].consent_sha256 = None
        assert (await b.send(1)).outcome is Outcome.COMPLETED
        assert b.square(1)[0] == "COMPLETED"
    finally:
        await b.workspace.aclose()



async def test_attempts_count_only_calls_square_answered_with_an_error_or_not_at_all(
        tmp_path: Path) -> None:
    """A 429 is a wait, not an attempt: after one, the order still gets all its attempts."""
    b = await bench(tmp_path, count=1, max_attempts=2, breaker_threshold=10,
                    max_rate_limit_waits=5)
    try:
        scripted = b.script(rate_limited(), *[server_error()] * 4)
        assert await b.send() is None
        assert len(scripted.keys) == 3  # the wait, then max_attempts
        assert b.square() == b.approved()
    finally:
        await b.workspace.aclose()


async def test_a_rate_limit_waits_as_long_as_square_asks_or_backs_off_without_retry_after(
        tmp_path: Path) -> None:
    b = await bench(tmp_path, count=2, max_rate_limit_waits=5)
    try:
        b.script(SquareRateLimited(status=429, code="RATE_LIMITED", detail="slow down",
                                   retry_after=0.3))
        started = time.monotonic()
        assert (await b.send(0)).outcome is Outcome.COMPLETED
        assert time.monotonic() - started >= 0.3  # Retry-After honoured
        # Strict reading: Square may send no Retry-After; the back-off formula decides.
        b.script(SquareRateLimited(status=429, code="RATE_LIMITED", detail="slow down"),
                 SquareRateLimited(status=429, code="RATE_LIMITED", detail="slow down"))
        assert (await b.send(1)).outcome is Outcome.COMPLETED
        assert [b.square(i)[0] for i in (0, 1)] == ["COMPLETED", "COMPLETED"]
    finally:
        await b.workspace.aclose()


async def test_a_hung_call_is_given_up_after_the_attempt_timeout(tmp_path: Path) -> None:
    """Not after the gateway's general timeout (2 s here): the engine's own, per attempt."""
    b = await bench(tmp_path, count=1, max_attempts=1, attempt_timeout_s=0.2)
    try:
        b.emulator.app.set_faults(FaultPlan(hang_rate=1.0, hang_seconds=30,
                                            operations=["UpdateOrder"]))
        b.script()
        started = time.monotonic()
        assert await b.send() is None  # unknown: a hung call may still apply
        assert time.monotonic() - started < 1.9
    finally:
        b.emulator.app.set_faults(FaultPlan())
        await b.workspace.aclose()
