"""A deterministic demo app for Pilot and snapshot tests: frozen clock, fixed seed, small data."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from textual.pilot import Pilot

from console.app import ReconApp
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
    """Wait on a condition (never a fixed sleep)."""
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)
        waited += 0.05
    await pilot.pause()


def merchants_loaded(app: ReconApp) -> Callable[[], bool]:
    from textual.widgets import DataTable

    def check() -> bool:
        try:
            return app.screen.query_one("#merchants", DataTable).row_count > 0 and \
                app.status.startswith("Refreshed")
        except Exception:
            return False
    return check
