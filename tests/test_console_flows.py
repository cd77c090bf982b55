"""One Pilot test per user flow, driven by keys, waiting on conditions."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from console.app import ReconApp
from console.screens.audit import AuditScreen
from console.screens.confirm import ConfirmScreen
from console.screens.merchants import MerchantsScreen
from console.screens.progress import ProgressScreen
from console.screens.queue import QueueScreen
from console.widgets.order_table import OrderTable
from services.completion import Outcome
from services.demo import DemoEnvironment
from services.emulator import FaultPlan
from services.emulator.state import OrderRecord
from tests.console_harness import app_for, demo, merchants_loaded, wait_until


async def test_whole_flow_merchants_to_audit(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        assert isinstance(app.screen, MerchantsScreen)
        first = app.screen.rows[0]
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        queue = app.screen
        assert isinstance(queue, QueueScreen) and queue.merchant_id == first.merchant_id
        table = queue.query_one(OrderTable)
        candidates = len(table.view)
        assert candidates == first.candidates
        await pilot.press("slash", *"ship", "enter")
        filtered = len(table.view)
        assert 0 < filtered < candidates
        await pilot.press("a")
        assert len(table.selected) == filtered
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen)
        count = confirm.preview.count
        assert count == filtered
        if confirm.typed:
            await pilot.press("y")  # does nothing for a large batch
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press(*str(count + 1), "enter")  # the wrong count sends nothing
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press(*str(count), "enter")
        else:
            await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen))
        progress = app.screen
        assert isinstance(progress, ProgressScreen)
        await wait_until(pilot, lambda: progress.finished)
        assert len(progress.results) == count
        assert {r.outcome for r in progress.results} == {Outcome.COMPLETED}
        square = environment.emulator.square
        assert all(square.orders[r.order_id].state == "COMPLETED" for r in progress.results)
        assert progress.query_one("#results", DataTable).row_count == count
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        assert len(app.screen.query_one(OrderTable).rows) < candidates + 1000
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        audit = app.screen
        await wait_until(pilot, lambda: "verified" in str(audit.query_one("#chain").render()))
        # The console's batch wrote a signed checkpoint, and verify checked against it.
        (checkpoint,) = environment.workspace.checkpoints.files()
        assert f"against checkpoint {checkpoint.name}" in str(audit.query_one("#chain").render())
        entries = audit.query_one("#entries", DataTable)
        assert entries.row_count >= 2 * count
        await pilot.press("slash", *"outcome:completed", "enter")
        assert entries.row_count == count


async def three_failed_orders(pilot: Pilot[Any], app: ReconApp,
                              environment: DemoEnvironment) -> ProgressScreen:
    """Three orders of a small merchant sent while Square fails every UpdateOrder; returns
    the finished progress screen."""
    await wait_until(pilot, merchants_loaded(app))
    await pilot.press("down", "down", "enter")  # a small merchant
    await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
    table = app.screen.query_one(OrderTable)
    await pilot.press("space", "space", "space")
    assert len(table.selected) == 3
    environment.emulator.set_faults(FaultPlan(server_error_rate=1.0,
                                              operations=["UpdateOrder"]))
    await pilot.press("c")
    await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
    await pilot.press("y")
    await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen))
    progress = app.screen
    assert isinstance(progress, ProgressScreen)
    await wait_until(pilot, lambda: progress.finished)
    return progress


async def test_retry_only_the_failed(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        progress = await three_failed_orders(pilot, app, environment)
        assert {r.outcome for r in progress.results} == {Outcome.FAILED}
        environment.emulator.set_faults(FaultPlan())
        await pilot.press("f")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen))
        await wait_until(pilot, lambda: progress.finished and len(progress.results) == 3 and
                         all(r.outcome is Outcome.COMPLETED for r in progress.results))
        assert environment.workspace.verify().ok


async def test_a_retry_keeps_to_the_consents_batch_limits_as_they_are_now(
        tmp_path: Path) -> None:
    """A retry of the failed orders is a new batch: when the merchant's consent has since
    come to allow fewer orders per batch, the retry sends only that many and holds the rest
    back, as any new preview would. Judged by the emulator's orders."""
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        progress = await three_failed_orders(pilot, app, environment)
        failed = [r.order_id for r in progress.results if r.outcome is Outcome.FAILED]
        assert len(failed) == 3
        environment.emulator.set_faults(FaultPlan())
        # The merchant signs a new version of its consent: one order per batch from now on.
        workspace = environment.workspace
        merchant_id = progress.results[0].merchant_id
        consent_ids = {o.consent_id for o in workspace.queue(merchant_id)
                       if o.order_id in failed}
        (record,) = [r for r, _ in workspace.consents_for(merchant_id)
                     if r.consent_id in consent_ids]
        document = record.model_dump(mode="json", exclude_none=True)
        document["scope"]["max_orders_per_batch"] = 1
        path = tmp_path / "narrower.json"
        path.write_text(json.dumps([document]))
        workspace.import_consent_files([path])
        await pilot.press("f")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen))
        await wait_until(pilot, lambda: progress.finished and len(progress.results) == 1)
        square = environment.emulator.square
        completed = [oid for oid in failed if square.orders[oid].state == "COMPLETED"]
        assert len(completed) == 1, completed
        assert workspace.verify().ok


async def test_cancel_stops_a_fast_batch(tmp_path: Path) -> None:
    """Issue 12 item 1, at 0 ms latency (the in-process Square never suspends) with about
    5,500 orders (3,000 could end before the cancel once completion got faster): the progress
    screen keeps painting, `x` stops the sending at once, the header says what happened, and
    the unsent orders stay selected for another run. Timing comes from the emulator's own
    record of the UpdateOrders it applied, relative to the moment the cancel was handled;
    every wait is on a condition."""
    environment = demo(tmp_path, heavy_orders_per_location=3100)
    app = app_for(environment)
    applied: list[tuple[float, str]] = []  # the emulator's UpdateOrders, (monotonic, order)
    square = environment.emulator.square
    update_order = square.update_order

    def recorded(merchant_id: str, order_id: str, body: dict[str, Any]) -> OrderRecord:
        record = update_order(merchant_id, order_id, body)
        applied.append((time.monotonic(), order_id))
        return record

    square.update_order = recorded  # type: ignore[method-assign]
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app), timeout=60)
        await pilot.press("Q")  # every merchant's queue
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        await pilot.press("a", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen) and confirm.typed
        total = confirm.preview.count
        assert 5300 <= total <= 6400, total
        await pilot.press(*str(total), "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen))
        progress = app.screen
        assert isinstance(progress, ProgressScreen)
        # The screen paints while orders are being completed: the batch yields to the UI.
        # (Polled without `wait_until`'s wait for an idle app: a running batch is not idle.)
        deadline = time.monotonic() + 60
        while len({done for _, done in progress.paints if 0 < done < total}) < 6:
            assert time.monotonic() < deadline, "no progress painted while the batch ran"
            await asyncio.sleep(0.01)
        # The key goes in as a person's would, without Pilot's wait for an idle app: a
        # running batch is never idle, and a fast one could end within that wait.
        assert not progress.finished
        app.simulate_key("x")
        await wait_until(pilot, lambda: progress.finished, timeout=60)
        cancelled_at = progress.cancelled_at
        assert cancelled_at is not None
        # At least 10 paints a second while it ran (the median gap; 2x slack for a loaded
        # machine): a batch that holds the event loop paints every 0.4 s or less often.
        running = [t for t, done in progress.paints if 0 < done < total and t < cancelled_at]
        gaps = sorted(b - a for a, b in itertools.pairwise(running))
        assert gaps and gaps[len(gaps) // 2] <= 0.2, gaps
        # No UpdateOrder reaches Square more than 100 ms after the cancel: only calls
        # already past their last look finish, and there are at most `overall` of those.
        late = [t - cancelled_at for t, _ in applied if t > cancelled_at]
        assert len(late) <= environment.workspace.engine().limit.maximum, late
        assert all(delay <= 0.1 for delay in late), late
        # What the screen and the results say agrees with what Square applied.
        completed = {r.order_id for r in progress.results if r.outcome is Outcome.COMPLETED}
        unsent = {r.order_id for r in progress.results if r.reason == "CANCELLED"}
        assert completed == {order_id for _, order_id in applied}
        assert completed and unsent and len(completed) + len(unsent) <= total
        title = str(progress.query_one("#progress-title", Static).render())
        assert title.startswith(f"Cancelled: {len(completed)} completed, {len(unsent)} not "
                                "sent"), title
        assert environment.workspace.open_intent_count() == 0
        assert environment.workspace.verify().ok
        # Back in the queue, the orders that were not sent are the selection.
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        assert app.screen.query_one(OrderTable).selected == unsent


async def test_read_only_offers_no_write(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment, read_only=True)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        assert app.screen.query_one("#read-only")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        await pilot.press("a", "c")
        await pilot.pause()
        assert isinstance(app.screen, QueueScreen)  # no confirmation, no batch
        assert "queue.complete" not in {b.binding.id for b in app.active_bindings.values()}
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Complete selected" not in titles
        assert environment.workspace.store.db["intents"].count == 0


async def test_expired_token_shows_on_its_merchant_only(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        screen = app.screen
        assert isinstance(screen, MerchantsScreen)
        by_id = {r.merchant_id: r for r in screen.rows}
        expired = by_id[environment.merchants[8].merchant.id]
        assert expired.token_health == "expired" and "re-authorize" in (expired.error or "")
        healthy = [r for r in screen.rows if r.token_health == "valid" and r.candidates]
        assert len(healthy) >= 5


async def test_help_lists_bindings_and_reminders_toggle(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("n")
        table = app.screen.query_one("#merchants", DataTable)
        assert 0 < table.row_count < 14
        await pilot.press("e")
        assert (tmp_path / "reminders.csv").read_text().count("\n") >= 3
        await pilot.press("question_mark")
        await pilot.pause()
        from console.screens.help import HelpScreen
        assert isinstance(app.screen, HelpScreen)
        ids = {binding_id for _, _, binding_id in app.screen.bindings}
        assert {"merchants.all", "merchants.reminders", "merchants.export", "app.audit"} <= ids


async def test_keymap_rebinds_by_binding_id(tmp_path: Path) -> None:
    from console.app import load_keymap
    keymap = tmp_path / "keymap.toml"
    keymap.write_text('"queue.select_all" = "ctrl+a"\n')
    environment = demo(tmp_path / "demo")
    app = app_for(environment)
    app.set_keymap(load_keymap(keymap))
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        table = app.screen.query_one(OrderTable)
        await pilot.press("ctrl+a")
        assert len(table.selected) == len(table.view) > 0


def test_bad_keymap_is_a_one_line_error(tmp_path: Path) -> None:
    import pytest

    from console.app import load_keymap
    from services.errors import ConfigurationError
    bad = tmp_path / "keymap.toml"
    bad.write_text('"queue.complete" = 3\n')
    with pytest.raises(ConfigurationError) as error:
        load_keymap(bad)
    assert "\n" not in str(error.value)
    assert load_keymap(tmp_path / "missing.toml") == {}


async def test_a_reload_changes_only_the_cells_that_changed(tmp_path: Path) -> None:
    """A live reload comes once a second while another operator sends: the same merchants in
    the same order keep their rows (no clear: no flicker, no header at the empty table's
    widths for a frame), and a changed value still shows."""
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        screen = app.screen
        assert isinstance(screen, MerchantsScreen)
        table = screen.query_one("#merchants", DataTable)
        clears = 0
        clear = table.clear

        def counted_clear(columns: bool = False) -> Any:
            nonlocal clears
            clears += 1
            return clear(columns)
        table.clear = counted_clear  # type: ignore[method-assign]
        before = [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]
        screen.reload()
        await wait_until(pilot, merchants_loaded(app))
        assert clears == 0
        assert [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)] == before

        # Square now reports another name for the first merchant: a refresh shows it.
        first = screen.rows[0].merchant_id
        environment.emulator.square.merchants[first].business_name = "Maple & Main Books Ltd"
        await pilot.press("r")
        await wait_until(pilot, lambda: str(table.get_row(first)[0]) == "Maple & Main Books Ltd")
        assert clears == 0
        assert [str(c) for c in table.get_row_at(1)] == before[1]


async def test_a_queue_answer_landing_after_the_screen_went_leaves_the_console_running(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A worker's read or sum that ends while its queue screen is being taken down (the
    console quitting removes the widgets before it cancels the workers) finds no table to
    fill: it drops its answer. It used to raise NoMatches, which Textual turns into a
    WorkerFailed that stops the console with a traceback (seen in the suite under load)."""
    import threading

    from console.screens import queue as queue_module

    release = threading.Event()
    reading = threading.Event()
    holding = {"start": ""}  # which of the two is held
    real_read, real_totals = QueueScreen._read, queue_module.selection_totals

    def held_read(self: QueueScreen, *args: Any) -> Any:
        if self.loaded and holding["start"] == "reload":  # after the first, full read
            reading.set()
            release.wait(10)
        return real_read(self, *args)

    def held_totals(*args: Any) -> Any:
        if holding["start"] == "select all":
            reading.set()
            release.wait(10)
        return real_totals(*args)

    monkeypatch.setattr(QueueScreen, "_read", held_read)
    monkeypatch.setattr(queue_module, "selection_totals", held_totals)
    monkeypatch.setattr(queue_module, "SELECTION_IN_WORKER", 0)
    for start in ("reload", "select all"):
        reading.clear()
        release.clear()
        holding["start"] = start
        app = app_for(demo(tmp_path / start.replace(" ", "-")))
        async with app.run_test(size=(160, 45)) as pilot:
            await wait_until(pilot, merchants_loaded(app), timeout=60)
            await pilot.press("Q")
            await wait_until(pilot, lambda a=app: isinstance(a.screen, QueueScreen))
            queue = app.screen
            assert isinstance(queue, QueueScreen)
            if start == "reload":
                queue.reload()
            else:
                await pilot.press("a")
            while not reading.is_set():
                await pilot.pause(0.02)
            await queue.query_one(OrderTable).remove()  # as a closing screen's, first
            release.set()
            await pilot.pause(0.3)
            assert app._exception is None, (start, app._exception)


async def test_a_queue_load_starting_after_the_screen_went_leaves_the_console_running(
        tmp_path: Path) -> None:
    """A reload whose worker only starts once the queue's table is gone (a change announced
    as the console quits, or as the screen is popped): it finds nothing to fill and stops.
    It looked the table up first, before any guard: NoMatches, a WorkerFailed that stopped
    the console (seen in the full suite under load, test_four_eyes)."""
    app = app_for(demo(tmp_path / "late-load"))
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app), timeout=60)
        await pilot.press("Q")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        queue = app.screen
        assert isinstance(queue, QueueScreen)
        await wait_until(pilot, lambda: queue.loaded, timeout=60)
        await queue.query_one(OrderTable).remove()  # as a closing screen's, first
        queue.reload()
        await wait_until(pilot, lambda: not any(
            w.group == "load" and not w.is_finished for w in queue.workers))
        await pilot.pause(0.1)
        assert app._exception is None, app._exception
