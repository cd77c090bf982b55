"""Issue 12, console items 2, 3, 4 and 7: where a new specialist could not tell what happened.
One Pilot test per point, driven by keys, waiting on conditions."""

from __future__ import annotations

import json
import re
from pathlib import Path

from textual.widgets import Input, Static

from console.app import ReconApp
from console.screens.audit import AuditEntryScreen, AuditScreen
from console.screens.confirm import ConfirmScreen
from console.screens.merchants import MerchantsScreen
from console.screens.progress import ProgressScreen
from console.screens.queue import QueueScreen
from console.widgets.order_detail import OrderDetail
from console.widgets.order_table import OrderTable
from services.demo import workspace_on_emulator
from services.emulator import FaultPlan
from tests.console_harness import app_for, demo, merchants_loaded, wait_until

# Seed order of the demo (services/demo.py): 0 has a consent of 500 orders per batch, 6 a
# consent that is not yet effective, 13 none, 12 a token without ORDERS_WRITE.
LIMITED, NOT_YET, NO_CONSENT, NO_WRITE = 0, 6, 13, 12


def text_of(app: ReconApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def open_queue(app: ReconApp, pilot: object, merchant_id: str | None) -> QueueScreen:
    app.push_screen(QueueScreen(merchant_id))
    await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))  # type: ignore[arg-type]
    assert isinstance(app.screen, QueueScreen)
    return app.screen


async def test_item2_counts_you_can_act_on_agree(tmp_path: Path) -> None:
    """Candidates, selection and confirmation count the same orders; the token's problem and
    the consent's batch limit hold orders back, each shown with why."""
    environment = demo(tmp_path, heavy_orders_per_location=400)
    app = app_for(environment)
    no_write = environment.merchants[NO_WRITE].merchant.id
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app), timeout=60)
        queue = await open_queue(app, pilot, None)
        table = queue.query_one(OrderTable)
        # The token without ORDERS_WRITE: its eligible orders are not candidates.
        riverbend = [o for o in queue.orders.values()
                     if o.merchant_id == no_write and o.eligible]
        assert riverbend
        assert all(queue.kinds[o.order_id] == "blocked" for o in riverbend)
        assert {queue.holds[o.order_id].detail for o in riverbend} == {"ORDERS_WRITE"}
        # The consent's batch limit: 500 now, the rest wait for the next batch.
        limited = environment.merchants[LIMITED].merchant.id
        waiting = [k for k, h in queue.holds.items() if h.reason == "BATCH_LIMIT_REACHED"]
        assert waiting and all(queue.orders[k].merchant_id == limited for k in waiting)
        candidates = len(table.view)
        assert f"Candidates {candidates:,} " in text_of(app, "#tabs")  # 1,234: thousands marked
        await pilot.press("a")
        selection = text_of(app, "#selection")
        assert f"{candidates:,} selected: {candidates:,} candidates" in selection
        assert f"500 per batch: {len(waiting):,} wait for the next batch" in selection
        # A held order shows its reason in the Blocked tab.
        await pilot.press("2")
        held_line = next(line for line in table.rows if line.key == riverbend[0].order_id)
        assert held_line.payload.reason == "held: token lacks ORDERS_WRITE"
        await pilot.press("1", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen)
        assert confirm.preview.count == candidates and not confirm.preview.held_back


async def test_item3_unknown_outcomes_reach_the_audit_and_recover_runs_at_start(
        tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("down", "down", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        await pilot.press("space", "space", "space", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        # Square applies each update, but its answer never arrives.
        environment.emulator.set_faults(FaultPlan(lost_response_rate=1.0,
                                                  operations=["UpdateOrder"]))
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen))
        progress = app.screen
        assert isinstance(progress, ProgressScreen)
        await wait_until(pilot, lambda: progress.finished)
        assert {r.reason for r in progress.results} == {"OUTCOME_UNKNOWN"}
        environment.emulator.set_faults(FaultPlan())
        await pilot.press("escape", "A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        audit = app.screen
        assert isinstance(audit, AuditScreen)
        await pilot.press("slash", *"outcome:failed", "enter")
        # Every failure the operator saw is in the audit.
        assert {e["order_id"] for e in audit.shown} == {r.order_id for r in progress.results}
        assert all("OUTCOME_UNKNOWN" in e["detail"] for e in audit.shown)
        assert environment.workspace.open_intent_count() == 3
    # The next start settles them on its own, and says what it settled.
    workspace = workspace_on_emulator(environment.emulator, environment.merchants,
                                      environment.workspace.settings.db, "next-operator")
    app = ReconApp(workspace)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        assert "Recovered: settled 3 (3 completed, 0 skipped, 0 failed); 0 still open" \
            in text_of(app, "#status")
        assert workspace.open_intent_count() == 0


async def test_item4_audit_filter_by_name_bad_since_export_and_entry(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    await environment.workspace.refresh()
    environment.workspace.preview()  # a preview entry: a detail longer than its column
    app = app_for(environment)
    merchant = environment.merchants[1].merchant
    part = merchant.business_name.split()[0].lower()
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        audit = app.screen
        assert isinstance(audit, AuditScreen)
        everything = len(audit.shown)
        # A bad since: is an error on the status line; the entries stay as they were.
        await pilot.press("slash", *"since:yesterday", "enter")
        status = audit.query_one("#status", Static)
        assert "since:yesterday is not a date or time" in str(status.render())
        assert status.has_class("error") and len(audit.shown) == everything
        # merchant: takes part of a name, in any case.
        field = audit.query_one("#audit-filter", Input)
        field.value = ""
        await pilot.press(*f"merchant:{part} action:consent_imported", "enter")
        assert audit.shown and {e["merchant_id"] for e in audit.shown} == {merchant.id}
        assert len(audit.shown) < everything
        # Export writes what the filter shows (any filter), and says where.
        field.value = ""
        await pilot.press("slash", *"action:consent_imported", "enter")
        assert 0 < len(audit.shown) < everything
        await pilot.press("e")
        said = str(audit.query_one("#status", Static).render())
        path = Path(said.rsplit(" to ", 1)[1])
        exported = [json.loads(line) for line in path.read_text().splitlines()]
        assert [e["seq"] for e in exported] == sorted(e["seq"] for e in audit.shown)
        assert f"Exported {len(exported)} entr" in said
        assert path.stat().st_mode & 0o777 == 0o600  # audit data: readable by its owner only
        # enter shows every field of an entry, the detail in full.
        field.value = ""
        await pilot.press("slash", *"action:preview", "enter")
        (entry,) = audit.shown
        assert len(entry["detail"]) > 48
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditEntryScreen))
        shown = text_of(app, "#audit-entry-text")
        assert entry["detail"] in shown.replace("\n", "")
        assert all(key in shown for key in entry)
        await pilot.press("escape")
        assert app.screen is audit


async def test_item7_small_things(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    app = app_for(environment)
    ids = [m.merchant.id for m in environment.merchants]
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        # Manual-only orders have no version: no "vNone".
        queue = await open_queue(app, pilot, None)
        await pilot.press("3", "down", "up")
        detail = queue.query_one(OrderDetail).content.renderables[0].plain  # type: ignore[union-attr]
        assert "no version" in detail and "vNone" not in detail
        await pilot.press("escape")
        # "1 order", not "1 orders".
        queue = await open_queue(app, pilot, ids[1])
        await pilot.press("space", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm = text_of(app, "#confirm-text")
        assert "Complete 1 order in Square?" in confirm and ": 1 order, " in confirm
        await pilot.press("n", "escape")
        # The empty Candidates tab says why: no consent, a consent with its start date.
        await open_queue(app, pilot, ids[NO_CONSENT])
        assert "No candidates: " in text_of(app, "#tabs")
        assert "NO_CONSENT" in text_of(app, "#tabs")
        await pilot.press("escape")
        await open_queue(app, pilot, ids[NOT_YET])
        assert re.search(r"No candidates: .*not yet effective: it starts \d{4}-\d\d-\d\d",
                         text_of(app, "#tabs"))
        await pilot.press("escape")
        # A status-line message of one screen does not linger on the next.
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        await pilot.press("slash", *"since:yesterday", "enter", "escape", "escape")
        await wait_until(pilot, lambda: isinstance(app.screen, MerchantsScreen))
        assert "since:yesterday" not in text_of(app, "#status")
        assert text_of(app, "#status").startswith("Refreshed")  # the app's own line is back
