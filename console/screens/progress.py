"""A running batch: progress with rate and ETA, cancel, per-order results, retry the failed."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from console.messages import describe
from console.safe_text import SafeText, safe, safe_join
from console.screens.base import AppScreen, Refreshed
from console.widgets.order_table import OrderTable
from console.widgets.row_table import RowTable
from services.completion import (
    ApprovedItem,
    BatchProgress,
    OrderResult,
    Outcome,
    SkipReason,
)
from services.workspace import Preview


class ProgressScreen(AppScreen):
    BINDINGS = [
        Binding("x", "cancel", "Cancel batch", id="progress.cancel"),
        Binding("f", "retry_failed", "Retry failed", id="progress.retry"),
        Binding("escape", "close", "Back to queue", id="progress.close"),
    ]

    def __init__(self, preview: Preview, *, start: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 batch_id: str | None = None) -> None:
        super().__init__()
        self.preview = preview
        # A prepared batch (four-eyes) runs under its id, so the engine checks its approval.
        self.batch_id = batch_id
        self.start = start
        # Rate, ETA and elapsed come from this clock (injectable: snapshots freeze it).
        self.clock = clock
        self.started = clock()
        self.ended: float | None = None
        self.cancel_event = asyncio.Event()
        self.latest: BatchProgress | None = None
        self.results: list[OrderResult] = []
        self.finished = False
        self.cancelled_at: float | None = None  # monotonic, when `x` was handled
        self.paints: deque[tuple[float, int]] = deque(maxlen=1000)  # (monotonic, done)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(safe(f"Completing {self.preview.count} approved orders"), classes="title",
                     id="progress-title")
        yield Static("", id="bar")
        yield Static("Starting…", id="progress-stats")
        table: DataTable[SafeText] = RowTable(id="results", cursor_type="row", zebra_stripes=True)
        table.add_columns("Merchant", "Order", "Version", "Outcome", "Reason", "Detail")
        yield table
        yield Footer()

    def on_mount(self) -> None:
        # Progress arrives per order; the screen repaints at most 10 times a second.
        self.set_interval(0.1, self._paint)
        if self.start:
            self.run_batch(self.preview.items, self.batch_id)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return not self.finished
        if action == "retry_failed":
            return self.finished  # then `f` says why when there is nothing to retry
        if action == "close":
            return self.finished
        return True

    @work(exclusive=True, group="batch", description="batch")
    async def run_batch(self, items: list[ApprovedItem], batch_id: str | None = None) -> None:
        workspace = self.workspace
        self.finished = False
        self.started, self.ended = self.clock(), None
        self.cancel_event = asyncio.Event()
        self.cancelled_at = None
        self.refresh_bindings()
        try:
            # Through the workspace, which anchors the audit with a signed checkpoint after.
            _, results = await workspace.complete(items, cancel=self.cancel_event,
                                                  on_progress=self._on_progress,
                                                  batch_id=batch_id)
            self.results = results
        except Exception as error:
            self.notify(describe(error), severity="error", timeout=10)
        if workspace.checkpoint_problem:
            self.notify(workspace.checkpoint_problem, severity="warning", timeout=10)
        self.finished = True
        self.ended = self.clock()
        self._paint()
        self.show_results()
        self.refresh_bindings()

    def _on_progress(self, event: BatchProgress) -> None:
        self.latest = event

    def show_progress(self, event: BatchProgress) -> None:
        self.latest = event
        self._paint()

    def _paint(self) -> None:
        event = self.latest
        if event is None:
            return
        self.paints.append((time.monotonic(), event.done))
        width = 60
        filled = round(width * event.done / event.total) if event.total else width
        percent = round(100 * event.done / event.total) if event.total else 100
        self.query_one("#bar", Static).update(
            safe_join(("█" * filled, "green"), ("░" * (width - filled), "dim"), f" {percent}%"))
        elapsed = max(0.0, (self.ended if self.ended is not None else self.clock())
                      - self.started)
        rate = event.done / elapsed if elapsed > 0 else 0.0
        eta = f"{(event.total - event.done) / rate:.0f}s" if rate > 0 else "—"
        if self.finished:
            state = "cancelled" if self.cancel_event.is_set() else "finished"
        else:
            state = ("cancelling: waiting for calls in flight" if event.cancelled
                     else "running")
        backing = "  ⚠ backing off: Square is rate limiting" if event.backing_off else ""
        self.query_one("#progress-stats", Static).update(safe(
            f"{event.done}/{event.total} done   completed {event.completed}   skipped "
            f"{event.skipped}   failed {event.failed}   {rate:.1f}/s   ETA {eta}   elapsed "
            f"{elapsed:.0f}s   concurrency {event.concurrency}   {state}{backing}"))

    def show_results(self) -> None:
        table = self.query_one("#results", DataTable)
        table.clear()
        names = self.workspace.merchant_names()
        order = {Outcome.FAILED: 0, Outcome.SKIPPED: 1, Outcome.COMPLETED: 2}
        for result in sorted(self.results, key=lambda r: (order[r.outcome], r.order_id)):
            table.add_row(safe(names.get(result.merchant_id, result.merchant_id)[:20]),
                          safe(result.order_id), safe(result.version), safe(result.outcome.value),
                          safe(result.reason), safe(result.detail[:60]))
        failed = sum(1 for r in self.results if r.outcome is Outcome.FAILED)
        if self.cancel_event.is_set():
            completed = sum(1 for r in self.results if r.outcome is Outcome.COMPLETED)
            title = (f"Cancelled: {completed} completed, {len(self.unsent())} not sent "
                     "(still selected in the queue)")
        else:
            title = f"Finished: {len(self.results)} results"
        if failed:
            title += f", {failed} failed: press f to retry only those"
        self.query_one("#progress-title", Static).update(safe(title))

    def unsent(self) -> set[str]:
        """The orders a cancel kept from being sent: they go back to the queue selected."""
        return {r.order_id for r in self.results if r.reason == SkipReason.CANCELLED}

    def action_cancel(self) -> None:
        if not self.cancel_event.is_set():
            self.cancelled_at = time.monotonic()
        self.cancel_event.set()
        self.notify("Cancelling: no new orders will be sent; calls in flight finish and are "
                    "recorded.")

    async def action_retry_failed(self) -> None:
        from console.screens.confirm import ConfirmScreen, confirmation_of
        failed = [r.order_id for r in self.results if r.outcome is Outcome.FAILED]
        if self.recon.read_only:
            self.notify("Nothing to retry here: this console is read-only (--read-only).",
                        severity="warning")
            return
        if not failed:
            self.notify("Nothing to retry: no order of this batch failed.")
            return
        # A retry is a new batch: a fresh preview of those orders, so the consents' batch
        # limits as they are now (a new version may allow fewer), leases, token health and
        # four-eyes apply as to any batch. Made off the UI thread, as every preview.
        retry, why, text = await asyncio.to_thread(confirmation_of, self.workspace, failed)
        if not retry.count:
            held = ", ".join(sorted({reason for _, reason in retry.held_back}))
            self.notify(f"Nothing to retry now: the failed orders are held back ({held}).",
                        severity="warning")
            return

        def confirmed(approved: bool | None) -> None:
            if approved and why:
                self.recon.prepare_for_second_operator(retry, why, "This retry")
            elif approved:
                self.preview = retry
                self.latest = None
                self.query_one("#progress-title", Static).update(
                    safe(f"Retrying {retry.count} failed orders"))
                self.run_batch(list(retry.items))

        self.app.push_screen(ConfirmScreen(retry, why, text), confirmed)

    def action_close(self) -> None:
        self.app.pop_screen()
        app = self.app
        unsent = self.unsent() if self.cancel_event.is_set() else None
        app.post_message(Refreshed())  # the app has every screen show the new state
        for screen in app.screen_stack:
            if unsent is not None:
                # Ready for another run: exactly what the cancel kept back is selected.
                for table in screen.query(OrderTable):
                    table.clear_selection()
                    table.select_keys(unsent)
