"""The Reminders screen: a Pilot test of the flow (list, preview, select, confirm, send,
history, demo mailbox) on the demo with its local SMTP server, and a snapshot of the preview."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from console.app import ReconApp
from console.screens.reminders import MailboxScreen, ReminderConfirm, RemindersScreen
from services.demo import DemoEnvironment
from tests.console_harness import app_for, demo, merchants_loaded, wait_until

SIZE = (160, 45)


@pytest.fixture
def environment(tmp_path: Path) -> Iterator[DemoEnvironment]:
    env = demo(tmp_path, mail=True)
    yield env
    assert env.mail is not None
    env.mail.stop()


async def open_reminders(pilot: Pilot[Any]) -> RemindersScreen:
    await wait_until(pilot, merchants_loaded(pilot.app))  # type: ignore[arg-type]
    await pilot.press("M")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, RemindersScreen))
    screen = pilot.app.screen
    assert isinstance(screen, RemindersScreen)
    await wait_until(pilot, lambda: screen.query_one("#reminders", DataTable).row_count > 0)
    return screen


def text_of(screen: Any, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


async def test_reminders_flow(environment: DemoEnvironment) -> None:
    app = app_for(environment)
    assert environment.mail is not None
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_reminders(pilot)
        due = [p for p in screen.plans if p.due]
        skipped = {str(p.skip) for p in screen.plans if not p.due}
        assert due and "NO_ADDRESS" in skipped
        assert {p.kind.value for p in due} == {"no_consent", "needs_a_person"}
        # Preview of the highlighted reminder: its recipients and the text body.
        await pilot.press("enter")
        first = screen.plans[0]
        preview = text_of(screen, "#preview-text")
        assert f"To: {', '.join(first.recipients) or '(no address)'}" in preview
        assert "Subject:" in preview and "A friendly reminder" in preview
        # Select every due one, send, confirm (typed when more than ten).
        await pilot.press("a", "s")
        await wait_until(pilot, lambda: isinstance(app.screen, ReminderConfirm))
        confirm = app.screen
        assert isinstance(confirm, ReminderConfirm)
        if confirm.typed:
            await pilot.press(*str(len(due)), "enter")
        else:
            await pilot.press("y")
        try:
            await wait_until(pilot, lambda: text_of(screen, "#status").startswith("Reminders:"))
        except AssertionError:
            raise AssertionError(text_of(screen, "#status")) from None
        assert text_of(screen, "#status") == f"Reminders: {len(due)} sent."
        received = environment.mail.mailbox.messages
        assert sorted(m.message_id for m in received) == sorted(p.message_id for p in due)
        assert len(list((environment.directory / "mailbox").glob("*.eml"))) == len(due)
        # Now they are not due, and the history says what was sent.
        await wait_until(pilot, lambda: not any(p.due for p in screen.plans))
        table = screen.query_one("#reminders", DataTable)
        table.move_cursor(row=next(i for i, p in enumerate(screen.plans)
                                   if p.merchant_id == due[0].merchant_id))
        await pilot.press("h")
        history = text_of(screen, "#preview-text")
        assert "sent" in history and due[0].message_id in history
        # The merchants screen says when each was last reminded.
        merchants = app.screen_stack[-2]
        row = merchants.query_one("#merchants", DataTable).get_row(due[0].merchant_id)
        assert str(row[-1]).startswith("reminded 2026-11-26")
        # The demo mailbox shows what the local server received.
        await pilot.press("b")
        await wait_until(pilot, lambda: isinstance(app.screen, MailboxScreen))
        mailbox = app.screen
        await wait_until(pilot, lambda: mailbox.query_one("#mailbox", DataTable).row_count
                         == len(due))
        await pilot.pause()
        assert "Message-ID: <reminder." in text_of(mailbox, "#mail-body")


async def test_cancelled_confirmation_sends_nothing(environment: DemoEnvironment) -> None:
    app = app_for(environment)
    assert environment.mail is not None
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_reminders(pilot)
        index = next(i for i, p in enumerate(screen.plans) if p.due)
        screen.query_one("#reminders", DataTable).move_cursor(row=index)
        await pilot.press("space", "s")
        await wait_until(pilot, lambda: isinstance(app.screen, ReminderConfirm))
        await pilot.press("n")
        await wait_until(pilot, lambda: app.screen is screen)
        assert environment.mail.mailbox.messages == []


def test_reminder_preview_snapshot(snap_compare: Any, environment: DemoEnvironment) -> None:
    app: ReconApp = app_for(environment)

    async def run(pilot: Pilot[Any]) -> None:
        await open_reminders(pilot)
        await pilot.press("enter")
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


async def test_the_mailbox_is_where_the_demo_says_not_beside_the_database(
        environment: DemoEnvironment, tmp_path: Path) -> None:
    """A team demo's database is a postgresql:// URL, with no folder beside it: the demo
    names its mailbox in the settings, and the screen opens that one."""
    assert environment.workspace.settings.demo_mailbox == environment.directory / "mailbox"
    elsewhere = tmp_path / "elsewhere" / "mailbox"
    elsewhere.mkdir(parents=True)
    (elsewhere / "one.eml").write_text("Message-ID: <reminder.one@example.com>\n"
                                       "Subject: hello\n\nbody\n")
    environment.workspace.settings.demo_mailbox = elsewhere
    app = app_for(environment)
    async with app.run_test(size=SIZE) as pilot:
        await open_reminders(pilot)
        await pilot.press("b")
        await wait_until(pilot, lambda: isinstance(app.screen, MailboxScreen))
        mailbox = app.screen
        assert isinstance(mailbox, MailboxScreen) and mailbox.folder == elsewhere
        await wait_until(pilot, lambda: mailbox.query_one("#mailbox", DataTable).row_count
                         == 1)


async def test_no_demo_mailbox_says_so(environment: DemoEnvironment) -> None:
    environment.workspace.settings.demo_mailbox = None
    app = app_for(environment)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_reminders(pilot)
        await pilot.press("b")
        await pilot.pause()
        assert app.screen is screen
