"""One SVG snapshot per screen state at 160x45 (pytest-textual-snapshot). Data, ids and every
clock are fixed, so a difference is a real change: look at it with `snapshot_report.html`, and
accept it with `pytest --snapshot-update` only when it is intended."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from console.app import ReconApp
from console.screens.confirm import ConfirmScreen
from console.screens.progress import ProgressScreen
from console.screens.queue import QueueScreen
from services.completion import BatchProgress, OrderResult, Outcome
from services.emulator import FaultPlan
from tests.console_harness import app_for, demo, hostile_names, merchants_loaded, wait_until

SIZE = (160, 45)


@pytest.fixture
def app(tmp_path: Path) -> ReconApp:
    return app_for(demo(tmp_path))


async def loaded(pilot: Pilot[Any]) -> None:
    await wait_until(pilot, merchants_loaded(pilot.app))  # type: ignore[arg-type]


async def open_queue(pilot: Pilot[Any], *keys: str) -> None:
    await loaded(pilot)
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, QueueScreen))
    await pilot.press(*keys)
    await pilot.pause()


def test_merchants(snap_compare: Any, app: ReconApp) -> None:
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded)


def test_reminder_list(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        await pilot.press("n")
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_queue(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await open_queue(pilot, "space", "space", "4")
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_queue_detail_of_a_blocked_order(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await open_queue(pilot, "2", "down", "down")
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_queue_filtered(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await open_queue(pilot, "slash", *"pick", "enter", "a")
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_small_confirmation(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await open_queue(pilot, "space", "space", "c")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_typed_confirmation(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await open_queue(pilot, "a", "c")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
        await pilot.press("9", "enter")  # a wrong count: refused, nothing sent
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def _progress_screen(pilot: Pilot[Any], finished: bool) -> ProgressScreen:
    workspace = pilot.app.workspace  # type: ignore[attr-defined]
    merchant = workspace.overview()[0].merchant_id
    preview = workspace.preview([merchant], record=False)
    screen = ProgressScreen(preview, start=False)
    return screen


def test_progress(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        screen = _progress_screen(pilot, finished=False)
        await pilot.app.push_screen(screen)
        screen.show_progress(BatchProgress(done=7, total=screen.preview.count, completed=6,
                                           skipped=0, failed=1, rate_per_s=12.5, eta_s=4.0,
                                           backing_off=True, concurrency=8))
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_results(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        screen = _progress_screen(pilot, finished=True)
        await pilot.app.push_screen(screen)
        items = screen.preview.items
        outcomes = [(Outcome.COMPLETED, None, "COMPLETED at version 3."),
                    (Outcome.SKIPPED, "VERSION_CHANGED", "Version is now 4, approved 2."),
                    (Outcome.FAILED, "RATE_LIMITED", "Square kept rate limiting.")]
        screen.results = [OrderResult(i.merchant_id, i.order_id, i.version, *outcomes[n % 3])
                          for n, i in enumerate(items[:9])]
        screen.finished = True
        screen.show_progress(BatchProgress(done=9, total=9, completed=3, skipped=3, failed=3,
                                           rate_per_s=20.0, eta_s=0.0, backing_off=False,
                                           concurrency=32))
        screen.show_results()
        screen.refresh_bindings()
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_audit(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        await pilot.press("A")
        await wait_until(pilot, lambda: "verified" in str(
            pilot.app.screen.query_one("#chain").render()))
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_help(snap_compare: Any, app: ReconApp) -> None:
    async def run(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        await pilot.press("question_mark")
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_read_only(snap_compare: Any, tmp_path: Path) -> None:
    app = app_for(demo(tmp_path), read_only=True)

    async def run(pilot: Pilot[Any]) -> None:
        await open_queue(pilot)
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_square_down_error(snap_compare: Any, tmp_path: Path) -> None:
    environment = demo(tmp_path)
    environment.emulator.set_faults(FaultPlan(server_error_rate=1.0))
    environment.workspace.gateway.retry = __import__(
        "services.square_gateway", fromlist=["RetryPolicy"]).RetryPolicy(attempts=1)
    app = app_for(environment)
    assert snap_compare(app, terminal_size=SIZE, run_before=loaded_with_errors)


async def loaded_with_errors(pilot: Pilot[Any]) -> None:
    await wait_until(pilot, lambda: pilot.app.status != "Starting…" and
                     not pilot.app.busy and "Refreshed" in pilot.app.status)  # type: ignore
    await pilot.pause()


def test_merchants_with_hostile_names(snap_compare: Any, tmp_path: Path) -> None:
    """Names from tests/data/hostile_strings.txt, shown literally: markup as brackets, escapes
    as ␛, bidi overrides as <U+202E>, the 10,000-character name cut."""
    environment = demo(tmp_path)
    hostile_names(environment)
    assert snap_compare(app_for(environment), terminal_size=SIZE, run_before=loaded)


def test_confirmation_with_a_hostile_name(snap_compare: Any, tmp_path: Path) -> None:
    """The merchant named `[@click=screen.dismiss(True)]x[/]`: its name is text, not a button."""
    environment = demo(tmp_path)
    hostile_names(environment)
    merchant = environment.merchants[0].merchant.id

    async def run(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        await pilot.app.push_screen(QueueScreen(merchant))
        await pilot.pause()
        await pilot.press("a", "c")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
    assert snap_compare(app_for(environment), terminal_size=SIZE, run_before=run)
