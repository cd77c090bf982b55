"""A deterministic demo app for Pilot and snapshot tests: frozen clock, fixed seed, small data."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from textual.pilot import Pilot

from console.app import ReconApp
from console.screens.base import LOAD_GROUP
from services.demo import DemoEnvironment, build_demo

FROZEN = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)


def demo(directory: Path, **options: object) -> DemoEnvironment:
    settings: dict[str, object] = {"orders_per_location": 8, "heavy_orders_per_location": 25,
                                   "now": FROZEN, "directory": directory}
    settings.update(options)
    return build_demo(**settings)  # type: ignore[arg-type]


def app_for(environment: DemoEnvironment, read_only: bool = False) -> ReconApp:
    environment.workspace.engine_options = {"max_attempts": 2, "base_backoff_s": 0.01,
                                            "attempt_timeout_s": 2.0}
    return ReconApp(environment.workspace, read_only=read_only)


async def wait_until(pilot: Pilot[object], condition: Callable[[], bool],
                     timeout: float = 20.0) -> None:
    """Wait on a condition (never a fixed sleep), then for the screen on top to have its
    data in (its LOAD_GROUP workers done: a queue read in full, the merchants' overview)."""
    waited = 0.0
    while not condition() or screen_loading(pilot.app):
        if waited > timeout:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)
        waited += 0.05
    await pilot.pause()


def screen_loading(app: object) -> bool:
    from textual.app import App
    assert isinstance(app, App)
    return any(worker.group == LOAD_GROUP and worker.node is app.screen
               and not worker.is_finished for worker in app.workers)


def change_pending(app: ReconApp) -> bool:
    """A write the change feed has seen (or will at its next poll) that the screens have not
    reloaded for yet: a snapshot taken now could catch the reload half done."""
    if app.changes is None:
        return False
    return bool(app._live_pending) or app.changes.version() != app.changes_loaded


def painted(screen: Any) -> bool:
    """Nothing left for the screen on top to lay out or paint. A dialog opened over it
    shows it as last painted: the help's snapshot once caught the merchants laid out but
    not yet painted, with header-wide columns."""
    return not (screen._layout_required or screen._scroll_required or
                screen._repaint_required or screen._recompose_required or
                screen._dirty_widgets)


def merchants_loaded(app: ReconApp, under: type | None = None,
                     status: Callable[[str], bool] | None = None) -> Callable[[], bool]:
    """The merchants screen's rows in and laid out, nothing left to reload, and the status
    a refresh's (`status`: another test of it); on top, or right under a screen of type
    `under` (a dialog showing it behind)."""
    from textual.widgets import DataTable

    from console.screens.base import LOAD_GROUP

    def check() -> bool:
        stack = app.screen_stack
        if under is not None and not (isinstance(stack[-1], under) and len(stack) > 1):
            return False
        screen = stack[-2] if under is not None else stack[-1]
        try:
            # And no overview load still running: the refresh's own reload may land after
            # the first rows and the "Refreshed" status (a snapshot then raced it). And the
            # rows laid out: a DataTable sizes its columns to new rows when next idle, and a
            # snapshot taken before had header-wide columns (seen once in a full run).
            table = screen.query_one("#merchants", DataTable)
            said = status(app.status) if status is not None else \
                app.status.startswith("Refreshed")
            return table.row_count > 0 and not table._require_update_dimensions and \
                (under is not None or painted(screen)) and \
                said and not change_pending(app) and not any(
                    worker.group == LOAD_GROUP and not worker.is_finished
                    for worker in app.workers)
        except Exception:
            return False
    return check


HOSTILE_FILE = Path(__file__).parent / "data" / "hostile_strings.txt"
# The name that turned the confirmation dialog into an approve button.
DISMISS = "[@click=screen.dismiss(True)]x[/]"


def hostile_strings() -> list[str]:
    """tests/data/hostile_strings.txt: one JSON string per line, # lines are comments."""
    lines = HOSTILE_FILE.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip() and not line.startswith("#")]


def hostile_names(environment: DemoEnvironment, first: str = DISMISS) -> list[str]:
    """Give the seeded merchants and locations (as Square would report them) hostile names:
    the first merchant `first`, the rest in corpus order; every location one of the corpus."""
    corpus = hostile_strings()
    names = [first] + [s for s in corpus if s != first]
    square = environment.emulator.square
    slot = 0
    for index, seeded in enumerate(environment.merchants):
        square.merchants[seeded.merchant.id].business_name = names[index % len(names)]
        for location in seeded.locations:
            square.locations[location.id].name = corpus[slot % len(corpus)]
            slot += 1
    return names[:len(environment.merchants)]
