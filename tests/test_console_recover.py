"""Issue 8, holes 5 and 6 in the console: `R` settles open intents, and merchants another run
holds are marked."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from textual.widgets import DataTable

from console.screens.merchants import MerchantsScreen
from services.completion.leases import HOST
from services.emulator import FaultPlan
from services.store import Lease, utc_text
from tests.console_harness import app_for, demo, merchants_loaded, wait_until


async def test_hole5_the_console_recovers_open_intents(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    workspace = environment.workspace
    emulator = environment.emulator
    workspace.engine_options = {"max_attempts": 2, "base_backoff_s": 0.01,
                                "attempt_timeout_s": 2.0}
    # Left open as a lost answer leaves them: applied at Square, no outcome here.
    await workspace.refresh()
    emulator.set_faults(FaultPlan(lost_response_rate=1.0, operations=["UpdateOrder"]))
    items = workspace.preview(max_orders=3).items
    _, results = await workspace.engine().run(items)
    assert {r.reason for r in results} == {"OUTCOME_UNKNOWN"}
    # Square cannot be re-read while the console starts: its own recovery cannot settle them.
    emulator.set_faults(FaultPlan(server_error_rate=1.0, operations=["BatchRetrieveOrders"]))
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app), timeout=60)
        assert workspace.open_intent_count() == 3
        assert "press R to recover" in app.status
        emulator.set_faults(FaultPlan())
        assert "app.recover" in {b.binding.id for b in app.active_bindings.values()}
        await pilot.press("R")
        await wait_until(pilot, lambda: app.status.startswith("Recovered"))
        assert "settled 3 (3 completed" in app.status and "0 still open" in app.status
        assert workspace.open_intent_count() == 0
        assert all(emulator.square.orders[i.order_id].state == "COMPLETED" for i in items)


async def test_read_only_offers_no_recover(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment, read_only=True)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        assert "app.recover" not in {b.binding.id for b in app.active_bindings.values()}


async def test_hole6_the_merchants_screen_marks_leased_merchants(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    leased = environment.merchants[0].merchant.id
    now = datetime.now(UTC)
    environment.workspace.store.take_lease(Lease(
        leased, "bob", HOST, os.getppid(), utc_text(now), utc_text(now),
        utc_text(now + timedelta(minutes=5)), "bobs-token"), lambda lease: True)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        screen = app.screen
        assert isinstance(screen, MerchantsScreen)
        table = screen.query_one("#merchants", DataTable)
        notes = {row.merchant_id: str(table.get_row(row.merchant_id)[-1])
                 for row in screen.rows}
        assert notes[leased].startswith("LEASED by bob on"), notes[leased]
        assert not any(n.startswith("LEASED") for m, n in notes.items() if m != leased)
