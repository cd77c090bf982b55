"""The queue paints its first screenful before the rest has loaded, and the work that reads
the whole queue (the load, the preview, the merchant overview) runs off the UI thread: each
test holds that work in a gate and shows the console still answering keys meanwhile."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

import console.screens.queue as queue_module
from console.app import ReconApp
from console.screens.base import Refreshed
from console.screens.confirm import ConfirmScreen
from console.screens.merchants import MerchantsScreen
from console.screens.queue import QueueScreen
from console.widgets.order_table import OrderTable
from services.eligibility import LimitedItem
from services.workspace import Workspace
from tests.console_harness import app_for, demo, merchants_loaded, wait_until

SIZE = (160, 50)


class Gate:
    """Holds a Workspace method until released, and records the threads it was called in.
    Called on the UI thread it would freeze the console: it gives up after a few seconds so
    the test fails on its assertions instead of hanging."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        original = getattr(Workspace, name)

        def gated(workspace: Workspace, *args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.current_thread())
            self.release.wait(5)
            return original(workspace, *args, **kwargs)
        monkeypatch.setattr(Workspace, name, gated)

    @property
    def off_the_ui_thread(self) -> bool:
        return bool(self.threads) and threading.main_thread() not in self.threads


async def poll(pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for a condition without waiting for the screen's loading to finish."""
    waited = 0.0
    while not condition():
        assert waited < timeout, "condition not met in time"
        await pilot.pause(0.02)
        waited += 0.02


@pytest.fixture
def app(tmp_path: Path) -> Iterator[ReconApp]:
    yield app_for(demo(tmp_path))


def keys_shown(table: OrderTable) -> list[str]:
    return [table.rows[i].key for i in table.view]


async def test_first_screenful_before_the_rest_then_all_with_cursor_and_selection_kept(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = app.workspace
    assert workspace is not None
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        everything = workspace.queue(ordered=False)
        by_age = sorted(everything, key=lambda o: (o.created_at, o.order_id))
        holds = workspace.holds(everything)
        candidates = [o.order_id for o in by_age if o.eligible and o.order_id not in holds]
        # A first page that holds 4 candidates (what the Candidates tab shows of it) and
        # leaves most of the queue for later.
        page = [o.order_id for o in by_age].index(candidates[3]) + 1
        first_candidates = candidates[:4]
        assert page < len(everything) // 2
        monkeypatch.setattr(queue_module, "FIRST_PAGE", page)
        gate = Gate(monkeypatch, "queue")  # the full read waits; the first page does not
        await pilot.press("Q")
        await poll(pilot, lambda: isinstance(app.screen, QueueScreen)
                   and bool(app.screen.query_one(OrderTable).rows))
        screen = app.screen
        assert isinstance(screen, QueueScreen)
        table = screen.query_one(OrderTable)
        # The first screenful is up while the full read is still held in its gate.
        assert not screen.loaded and not gate.release.is_set()
        assert len(table.rows) == page and keys_shown(table) == first_candidates
        # The console answers keys meanwhile: select the second row, then move down.
        await pilot.press("down", "space", "down")
        selected, cursor_key, top = set(table.selected), table.current_key, table.scroll_y
        assert selected == {first_candidates[1]} and cursor_key == first_candidates[3]
        assert gate.off_the_ui_thread
        gate.release.set()
        await poll(pilot, lambda: screen.loaded)
        await pilot.pause()
        # Everything arrived, sorted by age like the first page, which did not move.
        assert len(table.rows) == len(everything)
        shown = keys_shown(table)
        assert shown[:len(first_candidates)] == first_candidates
        ages = [(table.rows[i].payload.order.created_at, table.rows[i].key)
                for i in table.view]
        assert ages == sorted(ages)
        assert table.selected == selected and table.current_key == cursor_key
        assert table.scroll_y == top


async def test_preview_runs_in_a_worker_while_the_queue_answers_keys(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("Q")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        screen = app.screen
        assert isinstance(screen, QueueScreen)
        table = screen.query_one(OrderTable)
        await pilot.press("space", "space")
        gate = Gate(monkeypatch, "preview")
        await pilot.press("c")
        await poll(pilot, lambda: bool(gate.threads))
        before = table.cursor
        await pilot.press("down")  # handled while the preview is held
        assert app.screen is screen and table.cursor == before + 1
        assert gate.off_the_ui_thread
        gate.release.set()
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen) and confirm.preview.count == 2


async def test_merchant_overview_runs_in_a_worker_while_the_screen_answers_keys(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        screen = app.screen
        assert isinstance(screen, MerchantsScreen)
        gate = Gate(monkeypatch, "overview")
        screen.reload()
        await poll(pilot, lambda: bool(gate.threads))
        await pilot.press("n")  # the reminder list, shown while the overview is held
        assert screen.reminders_only
        assert gate.off_the_ui_thread
        rows = screen.rows
        gate.release.set()
        await wait_until(pilot, lambda: screen.rows is not rows)
        assert {r.merchant_id for r in screen.rows} == {
            m["merchant_id"] for m in app.workspace.store.merchants()}  # type: ignore[union-attr]


async def test_preview_four_eyes_check_and_dialog_text_are_made_off_the_ui_thread(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 70,000 orders the four-eyes check (it prices every order) and the dialog's text
    cost the UI thread ~0.5 s: both are made in the preview's worker; the UI thread only
    mounts the finished dialog."""
    import console.screens.confirm as confirm_module
    texts: list[threading.Thread] = []
    original_text = confirm_module.confirmation_text

    def recorded(*args: Any) -> Any:
        texts.append(threading.current_thread())
        return original_text(*args)
    monkeypatch.setattr(confirm_module, "confirmation_text", recorded)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("Q")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        gate = Gate(monkeypatch, "needs_second_operator")
        await pilot.press("space", "space", "space", "c")
        await poll(pilot, lambda: bool(gate.threads))
        assert gate.off_the_ui_thread
        gate.release.set()
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen) and confirm.preview.count == 3
        assert texts and threading.main_thread() not in texts
        # The text the worker made is the one shown.
        shown = str(confirm.query_one("#confirm-text").render())
        assert shown.startswith("Complete 3 orders in Square?")
        assert f"Approved set {confirm.preview.sha256[:16]}" in shown


async def test_preview_reads_the_queue_once_with_the_totals_a_fresh_read_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The preview prices its orders from the candidates it has just read (one read of the
    queue, not two); the totals are those a separate read of the queue gives."""
    workspace = demo(tmp_path).workspace
    await workspace.refresh()
    reads: list[object] = []
    original = type(workspace.store).queued_orders

    def counted(store: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(kwargs)
        return original(store, *args, **kwargs)
    monkeypatch.setattr(type(workspace.store), "queued_orders", counted)
    preview = workspace.preview(record=False)
    assert len(reads) == 1 and preview.count > 10
    # Priced again the old way (the whole queue read apart): the same totals, per merchant.
    again = workspace.preview_of(preview.items, preview.held_back)
    assert len(reads) == 2
    assert preview.totals == again.totals and preview.per_merchant() == again.per_merchant()
    assert preview.sha256 == again.sha256


async def test_a_large_queue_sorts_in_a_worker_keeping_selection_and_cursor(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above SYNC_SORT_ROWS the sort runs in a thread: the console answers keys meanwhile,
    the rows keep their order until the new one lands, and the selection (and the cursor's
    row) are the same after it."""
    import console.widgets.order_table as table_module
    monkeypatch.setattr(table_module, "SYNC_SORT_ROWS", 0)  # the demo's queue counts large
    release = threading.Event()
    threads: list[threading.Thread] = []
    original = OrderTable.prepare_sort

    def gated(table: OrderTable, *args: Any) -> Any:
        threads.append(threading.current_thread())
        release.wait(5)
        return original(table, *args)
    monkeypatch.setattr(OrderTable, "prepare_sort", gated)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("Q")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        screen = app.screen
        assert isinstance(screen, QueueScreen)
        table = screen.query_one(OrderTable)
        await pilot.press("4", "space", "down", "space", "down", "down", "space")
        selected, cursor_key = set(table.selected), table.current_key
        before = keys_shown(table)
        assert len(selected) == 3 and len(before) > 20
        await pilot.press("o")  # age -> total (largest first)
        await poll(pilot, lambda: bool(threads))
        assert threading.main_thread() not in threads and table.sort_pending
        assert keys_shown(table) == before  # the old order until the new one lands
        await pilot.press("down")  # answered while the sort is held
        cursor_key = table.current_key
        release.set()
        await poll(pilot, lambda: not table.sort_pending)
        await pilot.pause()
        totals = [table.rows[i].payload.order.total_amount for i in table.view]
        assert totals == sorted(totals, reverse=True) and keys_shown(table) != before
        assert table.selected == selected and table.current_key == cursor_key
        assert "sorting" not in str(screen.query_one("#tabs").render())


async def test_merchant_overview_cells_are_written_out_in_the_worker(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overview's worker also writes the rows' cells (and reads who is online and who
    was reminded): the UI thread only adds the finished rows to the table."""
    import console.screens.merchants as merchants_module
    threads: list[threading.Thread] = []
    original = merchants_module.overview_cells

    def recorded(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return original(*args)
    monkeypatch.setattr(merchants_module, "overview_cells", recorded)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        screen = app.screen
        assert isinstance(screen, MerchantsScreen)
        assert threads and threading.main_thread() not in threads
        table = screen.query_one("#merchants", DataTable)
        assert table.row_count == len(screen.rows) > 0
        for index, row in enumerate(screen.rows):
            assert tuple(table.get_row_at(index)) == screen._cells[row.merchant_id]


async def test_a_loaded_queue_costs_the_garbage_collector_nothing(app: ReconApp) -> None:
    """A full collection runs holding the GIL: over 100,000 queue rows of tracked objects
    it stalled the UI thread 0.8 s (bench.console_queue's 'longest garbage collection').
    A row, its line and its order hold only strings and numbers, and are left untracked."""
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("Q")
        await poll(pilot, lambda: isinstance(app.screen, QueueScreen) and app.screen.loaded)
        table = app.screen.query_one(OrderTable)
        assert table.rows
        tracked = [type(item).__name__ for row in table.rows
                   for item in (row, row.payload, row.payload.order) if gc.is_tracked(item)]
        assert tracked == []
        # And what a preview makes per order (its approved items, the batch limits' items).
        workspace = app.workspace
        assert workspace is not None
        preview = workspace.preview(order_ids=[row.key for row in table.rows], record=False)
        assert preview.items and not any(gc.is_tracked(item) for item in preview.items)
        consent = next(iter(workspace.consents_by_merchant().values()))[0]
        assert not gc.is_tracked(LimitedItem(("M", "O"), consent, 100))


async def test_the_started_console_leaves_its_long_lived_heap_out_of_collections(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The console's own process (run_console, run_demo) freezes what lives once it has
    started, so a full collection walks only what came after: the modules, Textual's and
    the workspace's objects made each one a 50-200 ms UI stall. Garbage is collected first."""
    app = app_for(demo(tmp_path))
    app.freeze_heap_after_start = True
    assert gc.get_freeze_count() == 0
    freezes = []
    freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(freeze()))
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, merchants_loaded(app))
            await poll(pilot, lambda: gc.get_freeze_count() > 0)
            assert gc.get_freeze_count() > 10_000
            app.post_message(Refreshed())  # once only: a later freeze would keep garbage
            await wait_until(pilot, merchants_loaded(app))
            await pilot.pause()
            assert len(freezes) == 1
    finally:
        gc.unfreeze()  # this test process runs other apps after this one
