"""Reminders: who is due and when, the message, and sending to a real SMTP server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from services.audit import AuditTrail
from services.consent import ConsentRecord
from services.errors import ConfigurationError
from services.reminders import (
    ReminderKind,
    ReminderPolicy,
    ReminderService,
    SkipCode,
    SmtpTarget,
    SmtpUnavailable,
)
from services.reminders.local_server import LocalSmtpServer
from services.reminders.planning import (
    age_step,
    business_hours_open,
    message_id_for,
    next_opening,
    valid_address,
)
from services.store import Store
from tests.conftest import consent_document
from tests.reminders_support import ScriptedMailbox, add_merchant, add_orders

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)   # 12:00 in London, 07:00 in New York


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def store() -> Iterator[Store]:
    store = Store(":memory:")
    yield store
    store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def mail() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer() as server:
        yield server


def make_service(store: Store, clock: Clock, server: LocalSmtpServer | None = None,
                 consents: dict[str, list[ConsentRecord]] | None = None,
                 **options: Any) -> ReminderService:
    smtp = SmtpTarget.parse(server.url()) if server is not None else None
    return ReminderService(store, AuditTrail(store, clock),
                           sender="Reconciliation Team <recon@ledgerline.example>",
                           consent_link="https://ledgerline.example/consent",
                           consents=lambda: consents or {}, clock=clock, operator="tester",
                           smtp=smtp, backoff_s=0.001, **options)


def active_consent(merchant_id: str, **changes: Any) -> ConsentRecord:
    return ConsentRecord.model_validate(consent_document(merchant_id, **changes))


def by_merchant(plans: list[Any]) -> dict[str, Any]:
    return {p.merchant_id: p for p in plans}


# ---------------------------------------------------------------------- pure rules
def test_age_steps() -> None:
    assert [age_step(timedelta(days=d)) for d in (0, 2.9, 3, 6, 7, 13, 14, 29, 30, 400)] == \
        [0, 0, 3, 3, 7, 7, 14, 14, 30, 30]


@pytest.mark.parametrize(("zone", "utc_hour", "open_"), [
    ("Europe/London", 12, True), ("America/New_York", 12, False),   # 07:00
    ("America/New_York", 14, True), ("America/New_York", 22, False),  # 17:00 is closed
    ("Asia/Tokyo", 0, True), ("Asia/Tokyo", 8, False),              # 09:00 / 17:00 JST
    ("Australia/Sydney", 22, True), ("Not/AZone", 12, True),        # unknown zone: UTC
])
def test_business_hours_across_timezones(zone: str, utc_hour: int, open_: bool) -> None:
    moment = NOW.replace(hour=utc_hour)
    assert business_hours_open(moment, zone, ReminderPolicy()) is open_


def test_next_opening_is_the_next_local_nine() -> None:
    policy = ReminderPolicy()
    early = next_opening(NOW, "America/New_York", policy)          # 07:00 local
    assert (early.day, early.hour) == (26, 9)
    late = next_opening(NOW.replace(hour=23), "America/New_York", policy)   # 18:00 local
    assert (late.day, late.hour) == (27, 9)


@pytest.mark.parametrize(("address", "ok"), [
    ("orders@shop.example", True), ("orders at shop.example", False), ("", False),
    ("a@b.c\r\nBcc: x@y.z", False), ("<a@b.c>", False), ("a@b.c, d@e.f", False),
    ("ünï@shop.example", False), (None, False),
])
def test_address_validation(address: str | None, ok: bool) -> None:
    assert valid_address(address) is ok


def test_message_id_depends_on_merchant_and_window_only() -> None:
    assert message_id_for("M1", 5, "x.example") == message_id_for("M1", 5, "x.example")
    assert message_id_for("M1", 5, "x.example") != message_id_for("M1", 6, "x.example")
    assert message_id_for("M1", 5, "x.example") != message_id_for("M2", 5, "x.example")


# ---------------------------------------------------------------------- who is due
def test_no_consent_merchant_with_paid_orders_is_due(store: Store, clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="Europe/London")
    add_orders(store, "M1", loc, NOW, [0.2, 4, 9], amount=1000)   # the 5 h old one is too new
    add_orders(store, "M1", loc, NOW, [5], amount=700, currency="EUR", prefix="M1e")
    (plan,) = make_service(store, clock).plan()
    assert plan.due and plan.kind is ReminderKind.NO_CONSENT
    assert len(plan.orders) == 3 and plan.orders[0].created_at == NOW - timedelta(days=9)
    assert plan.totals == {"USD": 2000, "EUR": 700}
    assert plan.recipients == ("owner@shop.example",) and plan.age_step == 7


@pytest.mark.parametrize("reason", ["NO_CONSENT", "CONSENT_EXPIRED", "CONSENT_REVOKED",
                                    "CONSENT_NOT_YET_EFFECTIVE"])
def test_every_unusable_consent_reason_counts(store: Store, clock: Clock, reason: str) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [2], reason=reason)
    assert make_service(store, clock).plan()[0].due


def test_consenting_merchant_gets_needs_a_person_with_thresholds(store: Store,
                                                                   clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC", email="shop@m1.example")
    add_orders(store, "M1", loc, NOW, [2], reason="MANUAL_ONLY", prefix="man")
    add_orders(store, "M1", loc, NOW, [2], reason="PAYMENT_NOT_CAPTURED", prefix="auth")
    add_orders(store, "M1", loc, NOW, [2, 5], reason="NOT_FULLY_PAID", prefix="part")
    add_orders(store, "M1", loc, NOW, [1, 4], reason="REFUNDED", prefix="ref")
    add_orders(store, "M1", loc, NOW, [9], reason="NO_CONSENT", prefix="nc")  # not this kind
    service = make_service(store, clock, consents={"M1": [active_consent("M1")]})
    (plan,) = service.plan()
    assert plan.kind is ReminderKind.NEEDS_A_PERSON
    # Partly paid and refunded only once older than 3 days.
    assert sorted(o.order_id for o in plan.orders) == ["auth-O1", "man-O0", "part-O3",
                                                       "ref-O5"]
    assert plan.recipients == ("owner@example.com", "shop@m1.example")  # grantor too


def test_expired_consent_is_no_consent_and_grantor_is_not_written_to(store: Store,
                                                                      clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC", email="shop@m1.example")
    add_orders(store, "M1", loc, NOW, [5], reason="CONSENT_EXPIRED")
    expired = active_consent("M1", expires_at="2026-11-20T00:00:00Z")
    (plan,) = make_service(store, clock, consents={"M1": [expired]}).plan()
    assert plan.kind is ReminderKind.NO_CONSENT and plan.recipients == ("shop@m1.example",)


@pytest.mark.parametrize("email", [None, "orders at shop.example"])
def test_no_usable_address_says_what_to_do(store: Store, clock: Clock,
                                           email: str | None) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC", email=email)
    add_orders(store, "M1", loc, NOW, [5])
    (plan,) = make_service(store, clock).plan()
    assert plan.skip is SkipCode.NO_ADDRESS and "Square Dashboard" in plan.detail
    if email:
        assert email in plan.detail


def test_recipients_are_the_locations_with_waiting_orders(store: Store, clock: Clock) -> None:
    first, _ = add_merchant(store, "M1", timezone="UTC", locations=2)
    store.upsert_merchant({"merchant_id": "M1", "locations_json":
                           '[{"id":"M1-L0","business_email":"a@one.example"},'
                           '{"id":"M1-L1","business_email":"b@two.example"}]'})
    add_orders(store, "M1", first, NOW, [5])
    assert make_service(store, clock).plan()[0].recipients == ("a@one.example",)


def test_outside_business_hours_is_queued_for_the_next_opening(store: Store,
                                                                clock: Clock) -> None:
    (ny,) = add_merchant(store, "NY", timezone="America/New_York")
    add_orders(store, "NY", ny, NOW, [5])
    (tokyo,) = add_merchant(store, "TK", timezone="Asia/Tokyo")     # 21:00 there
    add_orders(store, "TK", tokyo, NOW, [5])
    (london,) = add_merchant(store, "LN", timezone="Europe/London")
    add_orders(store, "LN", london, NOW, [5])
    plans = by_merchant(make_service(store, clock).plan())
    assert plans["NY"].skip is SkipCode.OUTSIDE_BUSINESS_HOURS
    assert "2026-11-26 09:00" in plans["NY"].detail
    assert plans["TK"].skip is SkipCode.OUTSIDE_BUSINESS_HOURS
    assert "2026-11-27 09:00" in plans["TK"].detail
    assert plans["LN"].due
    clock.now = NOW.replace(hour=15)                                # 10:00 in New York
    assert by_merchant(make_service(store, clock).plan())["NY"].due


def test_stale_merchant_is_not_reminded(store: Store, clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC", error="Square did not answer")
    add_orders(store, "M1", loc, NOW, [5])
    assert make_service(store, clock).plan()[0].skip is SkipCode.STALE_ORDERS


def test_unknown_merchant_is_a_usage_error(store: Store, clock: Clock) -> None:
    with pytest.raises(ConfigurationError, match="Unknown merchant NOPE"):
        make_service(store, clock).plan(["NOPE"])


# ---------------------------------------------------------------------- window and steps
def test_window_new_orders_and_age_steps(store: Store, clock: Clock,
                                         mail: LocalSmtpServer) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [1.5])             # oldest 1.5 days: step 0
    service = make_service(store, clock, mail)
    (first,) = service.send(service.plan())
    assert first.status == "sent"
    # Within the window: nothing, even with a new order.
    clock.now = NOW + timedelta(days=3)
    add_orders(store, "M1", loc, clock.now, [1.2])
    assert service.plan()[0].skip is SkipCode.NOT_DUE
    # After the window, the new order makes it due.
    clock.now = NOW + timedelta(days=7, hours=1)
    plan = service.plan()[0]
    assert plan.due and plan.message_id != first.message_id
    (second,) = service.send([plan])
    assert second.status == "sent"
    # Another window on: nothing new, oldest is 15.5 days (step 14, was 7): due again.
    clock.now = NOW + timedelta(days=14, hours=2)
    plan = service.plan()[0]
    assert plan.due and plan.age_step == 14
    service.send([plan])
    # A window later the oldest is 22.6 days: still step 14 and nothing new: not due.
    clock.now = NOW + timedelta(days=21, hours=3)
    assert service.plan()[0].skip is SkipCode.NOTHING_NEW
    ids = [m.message_id for m in mail.mailbox.messages]
    assert len(ids) == len(set(ids)) == 3


def test_opt_out_and_opt_in_are_honoured_and_audited(store: Store, clock: Clock,
                                                     mail: LocalSmtpServer) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [5])
    service = make_service(store, clock, mail)
    service.set_opt_out("M1", True, "Ana", "asked by phone")
    (plan,) = service.plan()
    assert plan.skip is SkipCode.OPTED_OUT and "asked by phone" in plan.detail
    assert service.send([plan])[0].status == "skipped" and not mail.mailbox.messages
    with pytest.raises(ConfigurationError, match="already opted out"):
        service.set_opt_out("M1", True, "Ana", "again")
    service.set_opt_out("M1", False, "Ana", "wants them back")
    assert service.plan()[0].due
    actions = [(e["action"], e["detail"]) for e in service.audit.entries()]
    assert actions == [("reminder_opt_out", "by Ana: asked by phone"),
                       ("reminder_opt_in", "by Ana: wants them back")]
    with pytest.raises(ConfigurationError, match="Unknown merchant"):
        service.set_opt_out("NOPE", True, "Ana", "x")


# ---------------------------------------------------------------------- the message
HOSTILE = ("Evil\r\nBcc: victim@attacker.example\r\nX-Injected: yes <b>bold</b> "
           "<script>alert(1)</script> & \x1b[31mred")


def test_headers_and_both_bodies_with_a_hostile_business_name(store: Store, clock: Clock,
                                                              mail: LocalSmtpServer) -> None:
    (loc,) = add_merchant(store, "M1", name=HOSTILE, timezone="UTC")
    add_orders(store, "M1", loc, NOW, [4, 5, 6], amount=2599)
    service = make_service(store, clock, mail)
    (result,) = service.send(service.plan())
    assert result.status == "sent"
    (received,) = mail.mailbox.messages
    assert received.recipients == ("owner@shop.example",)      # nobody added by the name
    message = message_from_bytes(received.data, policy=policy.SMTP)
    assert message["Bcc"] is None and message["X-Injected"] is None
    assert "\n" not in str(message["Subject"]) and "3 online orders waiting at Evil" in str(
        message["Subject"])
    assert str(message["Message-ID"]).strip() == result.message_id
    assert message["To"] == "owner@shop.example"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    # The name is in the body, harmless there: no terminal escape, no line break of its own.
    assert "\x1b" not in text and "\x1b" not in html
    assert "Hello Evil Bcc: victim@attacker.example X-Injected: yes" in " ".join(text.split())
    assert "3 Square Online orders are paid" in text and "77.97 USD" in text
    assert "https://app.squareup.com/dashboard/orders/overview/M1-O0" in text
    assert "https://ledgerline.example/consent" in text
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "&amp;" in html
    assert 'href="https://app.squareup.com/dashboard/orders/overview/M1-O0"' in html


def test_at_most_twenty_orders_are_listed(store: Store, clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [2 + i / 10 for i in range(26)])
    service = make_service(store, clock)
    rendered = service.render(service.plan()[0])
    assert rendered.text.count("/dashboard/orders/overview/") == 20
    assert "...and 6 more" in rendered.text and "26 Square Online orders" in rendered.text


def test_templates_can_be_overridden_from_the_config_dir(store: Store, clock: Clock,
                                                         tmp_path: Path) -> None:
    (tmp_path / "no_consent.txt.j2").write_text("Hi {{ business_name }}: {{ count }}.\n")
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [5])
    service = make_service(store, clock, templates=tmp_path)
    rendered = service.render(service.plan()[0])
    assert rendered.text == "Hi Shop M1: 1.\n"
    assert "Managed Reconciliation Service" in rendered.html   # the shipped HTML remains


# ---------------------------------------------------------------------- SMTP answers
def test_4xx_is_retried_then_sent(store: Store, clock: Clock) -> None:
    handler = ScriptedMailbox({1: "451 4.3.0 Try again later"})
    with LocalSmtpServer(handler) as server:
        (loc,) = add_merchant(store, "M1", timezone="UTC")
        add_orders(store, "M1", loc, NOW, [5])
        service = make_service(store, clock, server)
        (result,) = service.send(service.plan())
    assert result.status == "sent" and handler.attempts == 2 and len(handler.messages) == 1


def test_4xx_that_persists_is_deferred_and_retried_later_with_the_same_id(
        store: Store, clock: Clock) -> None:
    handler = ScriptedMailbox(default="452 4.2.2 Mailbox full")
    with LocalSmtpServer(handler) as server:
        (loc,) = add_merchant(store, "M1", timezone="UTC")
        add_orders(store, "M1", loc, NOW, [5])
        service = make_service(store, clock, server)
        (result,) = service.send(service.plan())
        assert (result.status, result.reason) == ("deferred", "SMTP_452")
        assert "Mailbox full" in result.detail and handler.attempts == 3
        assert service.plan()[0].skip is SkipCode.RETRY_LATER
        handler.default = None
        clock.now = NOW + timedelta(hours=1)
        plan = service.plan()[0]
        assert plan.due and plan.retry_of == result.message_id
        (again,) = service.send([plan])
    assert again.status == "sent" and again.message_id == result.message_id
    assert [m.message_id for m in handler.messages] == [result.message_id]
    outcomes = [(e["action"], e["outcome"]) for e in service.audit.entries()]
    assert outcomes == [("reminder_failed", "deferred"), ("reminder_sent", "sent")]


def test_deferred_past_its_window_fails_and_a_new_window_starts(store: Store,
                                                                 clock: Clock) -> None:
    handler = ScriptedMailbox(default="451 4.3.0 later")
    with LocalSmtpServer(handler) as server:
        (loc,) = add_merchant(store, "M1", timezone="UTC")
        add_orders(store, "M1", loc, NOW, [5])
        service = make_service(store, clock, server)
        (first,) = service.send(service.plan())
        handler.default = None
        clock.now = NOW + timedelta(days=7, hours=1)
        plan = service.plan()[0]
        assert plan.expire == first.message_id and plan.message_id != first.message_id
        (second,) = service.send([plan])
    history = {h["message_id"]: h for h in service.history("M1")}
    assert history[first.message_id]["status"] == "failed"
    assert history[first.message_id]["reason"] == "WINDOW_PASSED"
    assert second.status == "sent"


def test_5xx_fails_with_the_servers_reason(store: Store, clock: Clock) -> None:
    handler = ScriptedMailbox(default="550 5.1.1 No such user here")
    with LocalSmtpServer(handler) as server:
        (loc,) = add_merchant(store, "M1", timezone="UTC")
        add_orders(store, "M1", loc, NOW, [5])
        service = make_service(store, clock, server)
        (result,) = service.send(service.plan())
    assert (result.status, result.reason) == ("failed", "SMTP_550")
    assert "No such user here" in result.detail and handler.attempts == 1
    (entry,) = service.audit.entries()
    assert entry["action"] == "reminder_failed" and "No such user here" in entry["detail"]
    assert service.plan()[0].skip is SkipCode.NOT_DUE    # not hammered within the window


def test_dropped_connection_is_resent_with_the_same_id_on_a_new_one(store: Store,
                                                                     clock: Clock) -> None:
    handler = ScriptedMailbox({2: "drop"})
    with LocalSmtpServer(handler) as server:
        for index in range(3):
            (loc,) = add_merchant(store, f"M{index}", timezone="UTC")
            add_orders(store, f"M{index}", loc, NOW, [5])
        service = make_service(store, clock, server)
        results = service.send(service.plan())
    assert [r.status for r in results] == ["sent"] * 3
    assert sorted({m.message_id for m in handler.messages}) == sorted(
        r.message_id for r in results)


def test_one_connection_is_reused_for_the_batch(store: Store, clock: Clock,
                                                mail: LocalSmtpServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from services.reminders import smtp as smtp_module
    sessions: list[Any] = []
    original = smtp_module.SmtpSession.__init__

    def track(self: Any, target: Any) -> None:
        original(self, target)
        sessions.append(self)
    monkeypatch.setattr(smtp_module.SmtpSession, "__init__", track)
    for index in range(30):
        (loc,) = add_merchant(store, f"M{index:02d}", timezone="UTC")
        add_orders(store, f"M{index:02d}", loc, NOW, [5])
    service = make_service(store, clock, mail)
    assert all(r.status == "sent" for r in service.send(service.plan()))
    assert [s.connections for s in sessions] == [1] and len(mail.mailbox.messages) == 30


def test_connection_refused_names_the_server_and_writes_nothing(store: Store,
                                                                clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [5])
    server = LocalSmtpServer()          # never started: nothing listens on its port
    service = make_service(store, clock, server)
    with pytest.raises(SmtpUnavailable, match=rf"smtp://127.0.0.1:{server.port}"):
        service.send(service.plan())
    assert service.history() == [] and service.audit.size() == 0


def test_tls_failure_names_the_server(store: Store, clock: Clock,
                                      mail: LocalSmtpServer) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [5])
    service = make_service(store, clock, mail)
    service.smtp = SmtpTarget.parse(f"smtps://127.0.0.1:{mail.port}")  # plain server
    with pytest.raises(SmtpUnavailable, match=r"TLS with SMTP server smtps://127.0.0.1"):
        service.send(service.plan())


def test_login_on_loopback_and_a_wrong_password(store: Store, clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [5])
    with LocalSmtpServer(auth=("recon", "s3cret")) as server:
        service = make_service(store, clock, server)
        service.smtp = SmtpTarget.parse(server.url("recon"), SecretStr("wrong"))
        with pytest.raises(SmtpUnavailable, match="refused the login of 'recon'") as caught:
            service.send(service.plan())
        assert "wrong" not in str(caught.value)
        service.smtp = SmtpTarget.parse(server.url("recon"), SecretStr("s3cret"))
        assert service.send(service.plan())[0].status == "sent"


def test_password_is_never_sent_without_tls_off_loopback(
        store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server here offers no STARTTLS; pretend it is remote: nothing may be sent."""
    from services.reminders import smtp as smtp_module
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [5])
    with LocalSmtpServer(auth=("recon", "s3cret")) as server:
        monkeypatch.setattr(smtp_module, "is_loopback", lambda host: False)
        service = make_service(store, clock, server)
        service.smtp = SmtpTarget.parse(server.url("recon"), SecretStr("s3cret"))
        with pytest.raises(SmtpUnavailable, match="does not offer STARTTLS"):
            service.send(service.plan())
        assert not server.mailbox.messages and service.history() == []


@pytest.mark.parametrize(("url", "message"), [
    ("http://host", "not an SMTP URL"), ("smtp://u:pw@host", "must not hold a password"),
    ("smtp://user@host:587", "no \\[smtp\\] password"), ("smtp://host:99999", "invalid port"),
])
def test_bad_smtp_urls_are_usage_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SmtpTarget.parse(url)


def test_smtp_url_defaults() -> None:
    assert SmtpTarget.parse("smtps://mail.example").port == 465
    target = SmtpTarget.parse("smtp://me%40corp@mail.example", SecretStr("pw-Zq81"))
    assert (target.port, target.user) == (587, "me@corp")
    assert "pw-Zq81" not in repr(target)


def test_header_text_is_always_one_line() -> None:
    """The last guard before a header: even a template that bypasses the cleaned context
    (an operator's override using raw text) cannot put a line break in the Subject."""
    from services.reminders.message import header_text
    assert header_text("Evil\r\nBcc: x@y.z\u2028X: 1\x00\tend") == "Evil Bcc: x@y.z X: 1 end"
    assert len(header_text("a " * 500)) <= 120


def test_two_runs_with_the_same_plan_send_once(tmp_path: Path, clock: Clock,
                                               mail: LocalSmtpServer) -> None:
    """Two operators plan at the same moment; the database lets only one of them send."""
    first_store, second_store = Store(tmp_path / "r.db"), Store(tmp_path / "r.db")
    (loc,) = add_merchant(first_store, "M1", timezone="UTC")
    add_orders(first_store, "M1", loc, NOW, [5])
    first = make_service(first_store, clock, mail)
    second = make_service(second_store, clock, mail)
    plans_first, plans_second = first.plan(), second.plan()
    assert plans_first[0].due and plans_second[0].due
    assert first.send(plans_first)[0].status == "sent"
    (late,) = second.send(plans_second)
    assert (late.status, late.reason) == ("skipped", "NOT_DUE")
    assert len(mail.mailbox.messages) == 1
    first_store.close()
    second_store.close()


def test_smtp_password_section_beside_the_merchants(tmp_path: Path) -> None:
    from services.credentials import load_credentials, load_section_secret
    from services.errors import CredentialsError
    path = tmp_path / "credentials.toml"
    path.write_text('[merchants.M1]\naccess_token = "tok-1"\n\n[smtp]\npassword = "pw-9"\n\n'
                    '[audit]\ncheckpoint_key = "key-3"\n')
    path.chmod(0o600)
    assert list(load_credentials(path)) == ["M1"]
    secret = load_section_secret(path, "smtp", "password")
    assert secret is not None and secret.get_secret_value() == "pw-9" and "pw-9" not in repr(
        secret)
    assert load_section_secret(path, "postgres", "password") is None
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="readable by group or others"):
        load_section_secret(path, "smtp", "password")


def test_a_token_that_cannot_write_is_not_stale(store: Store, clock: Clock) -> None:
    (loc,) = add_merchant(store, "M1", timezone="UTC", error="Token lacks ORDERS_WRITE")
    store.upsert_merchant({"merchant_id": "M1", "token_health": "missing_scopes",
                           "token_scopes": "ORDERS_READ,PAYMENTS_READ,MERCHANT_PROFILE_READ"})
    add_orders(store, "M1", loc, NOW, [5])
    assert make_service(store, clock).plan()[0].due
