"""One SVG snapshot per screen state at 160x45 (pytest-textual-snapshot). Data, ids and every
clock are fixed, so a difference is a real change: look at it with `snapshot_report.html`, and
accept it with `pytest --snapshot-update` only when it is intended."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Static

from console.app import ReconApp
from console.screens.confirm import ConfirmScreen
from console.screens.help import HelpScreen
from console.screens.progress import ProgressScreen
from console.screens.queue import QueueScreen
from services.completion import Outcome
from services.emulator import EmulatorApp, FaultPlan
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


class FrozenClock:
    """The progress screen's clock: it moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_asgi = EmulatorApp.asgi


class GatedEmulator:
    """The in-process emulator's ASGI app with UpdateOrder calls past the first `passing` held
    until `release` is set: the batch stops at a known point, for as long as the test looks."""

    def __init__(self, emulator: EmulatorApp, passing: int) -> None:
        self.square = emulator.square
        self.app = _asgi(emulator)
        self.passing = passing
        self.held = 0
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "PUT" and \
                scope["path"].startswith("/v2/orders/"):
            if self.passing:
                self.passing -= 1
            else:
                self.held += 1
                await self.release.wait()
                self.held -= 1
        await self.app(scope, receive, send)


def gated_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passing: int, *,
                strict: bool = False) -> tuple[ReconApp, GatedEmulator, FrozenClock]:
    """The demo app on a gated, fixed-latency emulator (strict: Square's strictest reading)."""
    gates: list[GatedEmulator] = []

    def gated(self: EmulatorApp) -> Any:
        gates.append(GatedEmulator(self, passing))
        return gates[-1]

    monkeypatch.setattr(EmulatorApp, "asgi", gated)
    environment = demo(tmp_path)
    environment.emulator.set_faults(FaultPlan(latency_ms=5))
    environment.emulator.square.strict = strict
    app = app_for(environment)
    # Held calls must not time out while the test looks (a loaded machine is slow).
    environment.workspace.engine_options["attempt_timeout_s"] = 120.0
    # Four calls in flight at most, so the batch stops at the same point every time.
    environment.workspace.engine_options["max_per_merchant"] = 4
    return app, gates[0], FrozenClock()


async def start_batch(pilot: Pilot[Any], gate: GatedEmulator, clock: FrozenClock,
                      version_changes: int) -> ProgressScreen:
    """Approve the eligible orders of the merchant with the most, then (as someone else might
    in the meantime) change `version_changes` of them in Square, and start the batch for real."""
    await loaded(pilot)
    workspace = pilot.app.workspace  # type: ignore[attr-defined]
    preview = max((workspace.preview([m.merchant_id], record=False)
                   for m in workspace.overview()), key=lambda p: p.count)
    for item in preview.items[-version_changes:]:
        gate.square.touch(gate.square.orders[item.order_id])
    screen = ProgressScreen(preview, clock=clock)
    await pilot.app.push_screen(screen)
    return screen


async def painted(pilot: Pilot[Any], screen: ProgressScreen, text: str) -> None:
    """Give the screen's own repaint the time to show `text`; never fail here, so that a
    screen that does not repaint fails on the snapshot itself."""
    for _ in range(200):  # up to 10 s: a loaded CI machine repaints late
        if text in str(screen.query_one("#progress-stats", Static).render()):
            break
        await pilot.pause(0.05)
    await pilot.pause()


def test_progress(snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real batch: 6 calls answered, 2 orders changed in Square since approval (skipped at the
    # re-read), the next 4 calls held in flight. The screen shows it through its own repaint.
    app, gate, clock = gated_batch(tmp_path, monkeypatch, passing=6)

    async def run(pilot: Pilot[Any]) -> None:
        screen = await start_batch(pilot, gate, clock, version_changes=2)
        await wait_until(pilot, lambda: gate.held == 4 and screen.latest is not None
                         and screen.latest.done == 8)
        assert screen.latest is not None
        assert (screen.latest.completed, screen.latest.skipped) == (6, 2)
        clock.now += 4.0
        # "8/N done" is on screen already; only a repaint after the clock moved shows 4 s.
        await painted(pilot, screen, "elapsed 4s")
    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_results(snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real batch to the end under Square's strictest reading: orders whose fulfillment is
    # still PROPOSED are refused (failed), 2 changed since approval are skipped, the rest done.
    app, gate, clock = gated_batch(tmp_path, monkeypatch, passing=0, strict=True)

    async def run(pilot: Pilot[Any]) -> None:
        screen = await start_batch(pilot, gate, clock, version_changes=2)
        await wait_until(pilot, lambda: gate.held > 0)
        clock.now += 6.0
        gate.release.set()
        await wait_until(pilot, lambda: screen.finished)
        assert {r.outcome for r in screen.results} == set(Outcome)
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
        # The merchants behind it as laid out when it opened (a reload then would show them
        # half done: seen once in a full run).
        await wait_until(pilot, merchants_loaded(pilot.app, under=HelpScreen))  # type: ignore[arg-type]
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
    await wait_until(pilot, lambda: not pilot.app.busy and merchants_loaded(  # type: ignore
        pilot.app, status=lambda text: "Refreshed" in text)())  # type: ignore[arg-type]
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
