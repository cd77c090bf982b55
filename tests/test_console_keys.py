"""Keys behave the same on every screen (issue 12, item 5), and the merchants screen's detail
pane (item 6). Each test drives the console with Pilot at the size an operator uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual import events
from textual.widgets import DataTable, Input, Static

from console.app import ReconApp
from console.screens.audit import AuditScreen
from console.screens.help import HelpScreen
from console.screens.merchants import MerchantsScreen
from console.screens.progress import ProgressScreen
from console.screens.queue import QueueScreen
from console.screens.reminders import RemindersScreen
from console.widgets.merchant_detail import MerchantPane
from console.widgets.order_table import OrderTable
from services.completion import Outcome
from tests.console_harness import app_for, demo, merchants_loaded
from tests.console_harness import wait_until as _wait_until

SIZE = (160, 50)


async def wait_until(pilot: Any, condition: Callable[[], bool]) -> None:
    await _wait_until(pilot, condition)


def screen_lines(app: ReconApp) -> list[str]:
    """What the terminal shows, line by line, as the compositor rendered it."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def footer_text(app: ReconApp) -> str:
    return screen_lines(app)[-1]


async def open_queue(pilot: Any, app: ReconApp) -> QueueScreen:
    await wait_until(pilot, merchants_loaded(app))
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
    await pilot.pause()
    assert isinstance(app.screen, QueueScreen)
    return app.screen


# ---------------------------------------------------------------------- Home / End
async def _home_end_on_data_table(pilot: Any, table: DataTable[Any]) -> None:
    assert table.row_count > 2
    table.focus()
    table.move_cursor(row=1)
    await pilot.press("end")
    await pilot.pause()
    assert table.cursor_row == table.row_count - 1, "End goes to the last row"
    await pilot.press("home")
    await pilot.pause()
    assert table.cursor_row == 0, "Home goes to the first row"


async def test_home_and_end_go_to_the_first_and_last_row_in_every_table(tmp_path: Path
                                                                         ) -> None:
    app = app_for(demo(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await _home_end_on_data_table(pilot, app.screen.query_one("#merchants", DataTable))

        queue = await open_queue(pilot, app)
        orders = queue.query_one(OrderTable)
        await pilot.press("end")
        await pilot.pause()
        assert orders.cursor == len(orders.view) - 1
        await pilot.press("home")
        await pilot.pause()
        assert orders.cursor == 0
        await pilot.press("escape")

        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        await wait_until(pilot, lambda: app.screen.query_one("#entries", DataTable).row_count
                         > 2)
        await _home_end_on_data_table(pilot, app.screen.query_one("#entries", DataTable))
        await pilot.press("escape")

        await pilot.press("M")
        await wait_until(pilot, lambda: isinstance(app.screen, RemindersScreen))
        reminders = app.screen.query(DataTable).first()
        await wait_until(pilot, lambda: reminders.row_count > 2)
        await _home_end_on_data_table(pilot, reminders)


# ---------------------------------------------------------------------- space
async def test_space_selects_the_row_and_moves_to_the_next_as_help_says(tmp_path: Path
                                                                        ) -> None:
    app = app_for(demo(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        queue = await open_queue(pilot, app)
        table = queue.query_one(OrderTable)
        first = table.current_key
        await pilot.press("space")
        await pilot.pause()
        assert table.selected == {first}
        assert table.cursor == 1  # moved on: holding space selects a run
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        shown = "\n".join(str(s.render()) for s in app.screen.query(Static))
        assert "space" in shown and "AND moves to the next row" in shown


# ---------------------------------------------------------------------- esc
async def test_escape_closes_the_innermost_thing_then_goes_back(tmp_path: Path) -> None:
    app = app_for(demo(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        merchants = app.screen
        pane = merchants.query_one(MerchantPane)
        # Merchants: the reminder list's filter first, then the detail pane.
        await pilot.press("n")
        await pilot.pause()
        assert isinstance(merchants, MerchantsScreen) and merchants.reminders_only
        await pilot.press("escape")
        await pilot.pause()
        assert not merchants.reminders_only and pane.display
        await pilot.press("escape")
        await pilot.pause()
        assert not pane.display
        await pilot.press("d")
        await pilot.pause()
        assert pane.display

        # Help is a dialog: esc closes it.
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is merchants)

        # Queue: the filter first, then back to the merchants.
        queue = await open_queue(pilot, app)
        await pilot.press("slash", "z", "z")
        await pilot.pause()
        field = queue.query_one("#filter", Input)
        assert field.display and field.value == "zz"
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is queue and not field.display and not field.value
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is merchants)

        # Audit: the filter first, then back.
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        audit = app.screen
        await pilot.press("slash")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is audit
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is merchants)


# ---------------------------------------------------------------------- footer at 160
async def test_the_key_that_matters_most_is_on_the_footer_at_160_columns(tmp_path: Path
                                                                          ) -> None:
    app = app_for(demo(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        assert "⏎ Open queue" in footer_text(app), footer_text(app)
        await open_queue(pilot, app)
        assert "c Complete" in footer_text(app), footer_text(app)


# ---------------------------------------------------------------------- burst after /
async def test_keys_typed_in_a_burst_after_slash_land_in_the_filter(tmp_path: Path) -> None:
    app = app_for(demo(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        queue = await open_queue(pilot, app)
        table = queue.query_one(OrderTable)
        # "c", "a", "x", "s", "o", "1" are all bindings of the queue: in the burst they must
        # be text. No pause between the keys (tmux send-keys of a whole word).
        await pilot.press("slash", *"cash1ox")
        await pilot.pause()
        assert queue.query_one("#filter", Input).value == "cash1ox"
        assert not table.selected and isinstance(app.screen, QueueScreen)
        await pilot.press("escape")
        await pilot.pause()
        # As the terminal delivers a burst: every key queued before the first is handled
        # (pilot.press waits for each key to settle; tmux send-keys does not).
        for key, char in [("slash", "/"), *((c, c) for c in "cash1ox")]:
            app.post_message(events.Key(key, char))
        await pilot.pause()
        await pilot.pause()
        assert queue.query_one("#filter", Input).value == "cash1ox"
        assert not table.selected and isinstance(app.screen, QueueScreen)
        await pilot.press("escape")
        await pilot.pause()
        # A paste right after `/`, before the screen has had a tick.
        await pilot.press("slash")
        app.screen.query_one("#filter", Input).post_message(events.Paste("fern cash"))
        app.post_message(events.Paste(" main"))
        await pilot.pause()
        await pilot.pause()
        assert queue.query_one("#filter", Input).value == "fern cash main"
        assert not table.selected and isinstance(app.screen, QueueScreen)


# ---------------------------------------------------------------------- say why
async def test_complete_in_read_only_says_why_on_the_status_line(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        queue = await open_queue(pilot, app)
        await pilot.press("a", "c")
        await pilot.pause()
        status = str(queue.query_one("#status", Static).render())
        assert "read-only" in status.lower() and "--read-only" in status, status
        assert app.screen is queue
        assert environment.workspace.store.db["intents"].count == 0


async def test_retry_with_nothing_failed_says_why(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=SIZE) as pilot:
        await open_queue(pilot, app)
        await pilot.press("space", "space", "c")
        await wait_until(pilot, lambda: not isinstance(app.screen, QueueScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen)
                         and app.screen.finished)
        screen = app.screen
        assert isinstance(screen, ProgressScreen)
        assert not any(r.outcome is Outcome.FAILED for r in screen.results)
        await pilot.press("f")
        await pilot.pause()
        assert any("Nothing to retry" in str(n.message) for n in app._notifications), \
            [n.message for n in app._notifications]


# ---------------------------------------------------------------------- item 6: merchants
def pane_text(app: ReconApp) -> str:
    return str(app.screen.query_one("#merchant-facts-text", Static).render())


def chart_text(app: ReconApp) -> str:
    return str(app.screen.query_one("#backlog-chart", Static).render())


async def test_merchants_screen_uses_its_space_with_a_detail_pane(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        table = app.screen.query_one("#merchants", DataTable)
        # The table takes the lines its merchants need, and no column runs off the screen.
        assert table.size.height <= table.row_count + 2
        assert table.virtual_size.width <= table.size.width, "the Note column is cut off"
        pane = app.screen.query_one(MerchantPane)
        assert pane.display and pane.size.height >= 20
        first = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        assert first is not None
        detail = environment.workspace.merchant_detail(first)
        assert detail is not None
        text = pane_text(app)
        assert detail.business_name in text
        consent = detail.consents[0]
        assert f"from {consent.effective_from:%Y-%m-%d}" in text
        if consent.expires_at:
            assert f"to {consent.expires_at:%Y-%m-%d}" in text
        assert "per batch: " in text
        assert "Token" in text and "expires 20" in text
        for name, _ in detail.locations:
            assert name in text
        assert "Last refresh" in text and "0m ago" in text
        assert "Last batches" in text and "none yet" in text
        chart = chart_text(app)
        assert "█" in chart and "1 day recorded at a refresh" in chart
        assert "29 rebuilt from orders still open" in chart

        # The pane follows the highlight.
        await pilot.press("down")
        await pilot.pause()
        second = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        assert second is not None
        second_detail = environment.workspace.merchant_detail(second)
        assert second_detail is not None and second_detail.business_name in pane_text(app)

        # A batch shows with its outcomes once it ran.
        await pilot.press("up")
        await open_queue(pilot, app)
        await pilot.press("space", "space", "c")
        await wait_until(pilot, lambda: not isinstance(app.screen, QueueScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen)
                         and app.screen.finished)
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, MerchantsScreen))
        await pilot.pause()
        assert "2 completed" in pane_text(app), pane_text(app)


async def test_backlog_history_is_recorded_at_each_refresh(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    workspace = environment.workspace
    merchant = environment.merchants[0].merchant.id
    assert not workspace.store.has_backlog_history(merchant)
    await workspace.refresh()
    detail = workspace.merchant_detail(merchant)
    assert detail is not None and len(detail.history) == 30
    today, counts, rebuilt = detail.history[-1]
    assert counts is not None and not rebuilt
    overview = next(r for r in workspace.overview() if r.merchant_id == merchant)
    assert counts == overview.age_buckets  # the same bands as the Ages column
    # Earlier days were rebuilt from the orders open now: never more than today.
    assert all(c is not None and r and sum(c) <= sum(counts) for _, c, r in detail.history[:-1])
    # A later refresh the same day replaces today's row, and never a rebuilt day's record.
    workspace.store.record_backlog([(today.isoformat(), merchant, (1, 2, 3, 4, 5))], "x",
                                   rebuilt=True)
    assert workspace.merchant_detail(merchant).history[-1][1] == counts  # type: ignore[union-attr]
    await workspace.refresh()
    assert workspace.store.conn.execute(
        "SELECT COUNT(*) FROM backlog_history WHERE merchant_id = ?", [merchant]
    ).fetchone()[0] == 30


def test_backlog_chart_heights_follow_the_totals_and_gaps_are_not_zeros() -> None:
    from datetime import date

    from console.widgets.merchant_detail import backlog_chart
    history = [(date(2026, 11, day), None if day == 3 else (day, 0, 0, 0, 10 * day),
                day < 5) for day in range(1, 7)]
    lines = backlog_chart(history, height=12).plain.split("\n")[:12]
    heights = [sum(1 for line in lines if line[7 + 2 * n] in "█▓") for n in range(6)]
    assert heights[2] == 0 and lines[11][7 + 2 * 2] == "·"  # no snapshot: a dot, no bar
    known = [h for n, h in enumerate(heights) if n != 2]
    assert known == sorted(known) and known[-1] == 12  # a larger total is never shorter
    assert lines[0][7 + 2 * 5] == "█" and lines[0][7 + 2 * 3] != "▓"
    assert all(line[7 + 2 * n] == "▓" for n in (0, 1, 3) for line in lines[11:])


async def test_help_shows_keys_as_the_footer_does_and_names_them_for_the_keymap(
        tmp_path: Path) -> None:
    """A newcomer reads `?`, not `question_mark`; a keymap file needs the name."""
    app = app_for(demo(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        rows = {key.strip(): binding_id for key, _, binding_id in app.screen.bindings}
        assert rows["?  (question_mark)"] == "app.help"
        assert rows["⏎  (enter)"] == "merchants.open"
        assert rows["A"] == "app.audit"
        assert not any(key.startswith(("question_mark", "enter")) for key in rows)


async def test_every_footer_key_fits_at_160_columns(tmp_path: Path) -> None:
    """The key bar of each main screen, at the width the README is written for: no key cut
    off (the queue's lost `M Reminders` and `q Quit` at 160 columns)."""
    from textual.widgets._footer import FooterKey

    app = app_for(demo(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        for step in range(2):
            screen = app.screen if step == 0 else await open_queue(pilot, app)
            await pilot.pause()
            keys = list(screen.query(FooterKey))
            assert {key.key for key in keys} >= {"question_mark", "q"}, screen
            cut = [f"{key.key_display} {key.description}" for key in keys
                   if key.region.right > SIZE[0] or not key.region.width]
            assert not cut, f"{type(screen).__name__}: cut off at {SIZE[0]} columns: {cut}"
