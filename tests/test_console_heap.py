"""What keeps a large queue from stalling the UI thread through the garbage collector and the
deallocator (bench.console_queue's 'longest stall' figures): the table's large sequences and
the selection are left out of collections, replaced or popped rows are freed off the UI
thread a slice at a time, and the confirmation tints the queue below it once."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.renderables.background_screen import BackgroundScreen

import console.heap as heap
import console.widgets.order_table as order_table_module
from console.app import ReconApp
from console.screens.confirm import ConfirmScreen
from console.screens.queue import QueueScreen
from console.widgets.order_table import KeySet, OrderTable
from tests.console_harness import app_for, demo, merchants_loaded, wait_until

SIZE = (160, 50)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[ReconApp]:
    yield app_for(demo(tmp_path))


async def open_all_queues(app: ReconApp, pilot: Any) -> tuple[QueueScreen, OrderTable]:
    await wait_until(pilot, merchants_loaded(app))
    await pilot.press("Q")
    await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen) and app.screen.loaded)
    screen = app.screen
    assert isinstance(screen, QueueScreen)
    return screen, screen.query_one(OrderTable)


async def test_a_loaded_queues_sequences_and_selection_are_left_out_of_collections(
        app: ReconApp) -> None:
    """A list or a set is walked by every full collection (a cache miss per item, holding the
    GIL); tuples of untracked items and dicts of strings are not."""
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_all_queues(app, pilot)
        await pilot.press("4", "a", "slash", "s")  # everything, all selected, then filtered
        await wait_until(pilot, lambda: table.filter_text == "s")
        assert len(table.selected) == len(table.rows) > 100 and len(table.view) > 0
        gc.collect()  # a tuple is untracked by the first collection that sees it
        large = {"rows": table.rows, "keys": table._keys, "index": table.index,
                 "view": table.view, "selection": table.selected.members,
                 "orders": screen.orders, "kinds": screen.kinds}
        assert table._bases is not None
        for kind, (positions, haystacks) in table._bases.items():
            large[f"positions of {kind}"], large[f"haystacks of {kind}"] = positions, haystacks
        assert [name for name, value in large.items() if gc.is_tracked(value)] == []


def test_the_selection_behaves_as_a_set() -> None:
    selection = KeySet(["a", "b"])
    selection.update(["c", "a"])
    selection.toggle(["a", "d", "d"])
    selection.discard("zz")
    selection.add("e")
    assert selection == {"b", "c", "d", "e"} and len(selection) == 4 and "b" in selection
    selection.keep_only({"b": 0, "e": 1}.keys())
    assert set(selection) == {"b", "e"}
    selection.clear()
    assert not selection and selection == set()


class Freed:
    """Records the thread that frees it."""

    threads: list[str] = []

    def __del__(self) -> None:
        Freed.threads.append(threading.current_thread().name)


def test_release_gradually_frees_in_its_thread_once_the_caller_let_go() -> None:
    Freed.threads = []
    rows = tuple(Freed() for _ in range(3 * heap.SLICE))
    orders = {i: Freed() for i in range(heap.SLICE)}
    thread = heap.release_gradually(rows, orders)
    assert thread is not None
    thread.join(0.05)
    assert thread.is_alive() and Freed.threads == []  # waits: the caller still holds them
    del rows, orders  # drops the containers only: the items are the thread's to free
    assert Freed.threads == []
    thread.join(5)
    assert not thread.is_alive()
    assert Freed.threads == ["release"] * (4 * heap.SLICE)
    assert heap.release_gradually((Freed(),)) is None  # small: not worth a thread


async def test_rows_replaced_or_popped_are_handed_to_the_release_thread(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeing a 100,000-row queue in one piece costs ~50 ms holding the GIL: a reload that
    swaps the rows, and a popped queue screen, hand theirs to `release_gradually`."""
    handed: list[int] = []
    original = heap.release_gradually
    monkeypatch.setattr(heap, "SLICE", 20)  # the demo's queue is a few hundred orders

    def recorded(*collections: Any) -> Any:
        handed.extend(id(c) for c in collections)
        return original(*collections)
    monkeypatch.setattr(order_table_module, "release_gradually", recorded)
    async with app.run_test(size=SIZE) as pilot:
        screen, table = await open_all_queues(app, pilot)
        rows = table.rows
        assert len(rows) > heap.SLICE
        screen.reload()  # the same orders read again: new rows swapped in
        await wait_until(pilot, lambda: table.rows is not rows and len(table.rows) == len(rows))
        assert id(rows) in handed
        rows = table.rows
        app.pop_screen()
        await wait_until(pilot, lambda: not isinstance(app.screen, QueueScreen))
        await pilot.pause()
        assert id(rows) in handed and table.rows == ()


async def test_the_confirmation_tints_the_queue_below_once(
        app: ReconApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Textual tints the whole screen below a modal on each of its renders (~30 ms over a
    160x50 queue, several renders while the confirmation mounts)."""
    tinted: list[object] = []
    original = BackgroundScreen.__rich_console__

    def counted(self: BackgroundScreen, *args: Any) -> Any:
        tinted.append(self.screen)
        return original(self, *args)
    monkeypatch.setattr(BackgroundScreen, "__rich_console__", counted)
    async with app.run_test(size=SIZE) as pilot:
        await open_all_queues(app, pilot)
        await pilot.press("space", "space", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = app.screen
        for _ in range(3):
            confirm.refresh()
            await pilot.pause()
        assert len(tinted) == 1 and isinstance(tinted[0], QueueScreen)
