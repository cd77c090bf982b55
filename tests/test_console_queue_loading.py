"""The queue paints its first screenful before the rest has loaded, and the work that reads
the whole queue (the load, the preview, the merchant overview) runs off the UI thread: each
test holds that work in a gate and shows the console still answering keys meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

import console.screens.queue as queue_module
from console.app import ReconApp
from console.screens.confirm import ConfirmScreen
from console.screens.merchants import MerchantsScreen
from console.screens.queue import QueueScreen
from console.widgets.order_table import OrderTable
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
