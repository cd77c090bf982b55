"""The merchants screen's detail pane: the highlighted merchant in full, and a picture of its
backlog by age over the last 30 days (from the daily snapshots each refresh records)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static

from console.safe_text import SafeText, clip, safe_join
from console.wording import format_money

if TYPE_CHECKING:  # types only (see console/app.py)
    from services.workspace import MerchantDetail

__all__ = ["AGE_LABELS", "MerchantPane", "backlog_chart", "since"]

AGE_LABELS = ("<1d", "1-3d", "3-7d", "7-14d", "2w+")
# Fresh to old: the eye finds the red (two weeks and more) first.
AGE_STYLES = ("green", "bright_green", "yellow", "dark_orange", "red")
Snapshot = tuple[int, int, int, int, int]
FACTS_WIDTH = 64


def since(age: timedelta | None) -> str:
    """'3h 05m ago', '2d 4h ago': a refresh's age at a glance."""
    if age is None:
        return "never"
    minutes = max(0, int(age.total_seconds() // 60))
    days, minutes = divmod(minutes, 1440)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h ago"
    return f"{hours}h {minutes:02d}m ago" if hours else f"{minutes}m ago"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else "—"


def backlog_chart(history: Sequence[tuple[date, Snapshot | None, bool]],
                  height: int = 12) -> SafeText:
    """Stacked columns, one per day with a gap (oldest day left), split by age with the oldest
    orders on top in red. A recorded day is solid (█), a day rebuilt from the orders still open
    is shaded (▓), and a day with neither is a dim `·` on the baseline, not a zero."""
    top = max((sum(s) for _, s, _ in history if s), default=0)
    columns: list[list[int | None]] = []   # per day, per row from the bottom: bucket or None
    for _, snapshot, _ in history:
        cells: list[int | None] = [None] * height
        if snapshot and top:
            # Cumulative boundaries: the column's height follows the day's total exactly
            # (a larger backlog is never a shorter column); at least one cell for any orders.
            below = 0
            running = 0
            for bucket, count in enumerate(snapshot):
                running += count
                edge = max(1, round(running / top * height)) if running else 0
                for row in range(below, edge):
                    cells[row] = bucket
                below = max(below, edge)
        columns.append(cells)
    chart = SafeText()
    for row in range(height - 1, -1, -1):
        label = f"{top:>6} " if row == height - 1 else "     0 " if row == 0 else " " * 7
        chart.append(label, "dim")
        for (_, snapshot, rebuilt), cells in zip(history, columns, strict=True):
            cell = cells[row]
            if cell is not None:
                chart.append("▓ " if rebuilt else "█ ", AGE_STYLES[cell])
            elif row == 0 and snapshot is None:
                chart.append("· ", "dim")
            else:
                chart.append("  ")
        chart.append("\n")
    if history:
        first, last = history[0][0], history[-1][0]
        gap = max(1, 2 * len(history) - 12)
        chart.append(f"       {first:%b %d}{' ' * gap}{last:%b %d}\n", "dim")
    chart.append("       ")
    for label, style in zip(AGE_LABELS, AGE_STYLES, strict=True):
        chart.append("█", style)
        chart.append(f" {label}  ")
    recorded = sum(1 for _, s, rebuilt in history if s is not None and not rebuilt)
    rebuilt_days = sum(1 for _, s, rebuilt in history if s is not None and rebuilt)
    chart.append(f"\n       {recorded} day{'' if recorded == 1 else 's'} recorded at a "
                 "refresh (█)", "dim")
    if rebuilt_days:
        chart.append(f", {rebuilt_days} rebuilt from orders still open (▓)", "dim")
    return chart


def facts(detail: MerchantDetail) -> SafeText:
    """Consents, token, locations, last refresh and the last batches, as lines."""
    text = safe_join((clip(detail.business_name, 60), "bold"), "  ",
                     (detail.merchant_id, "dim"))
    text.append("\nConsents", "bold underline")
    if not detail.consents:
        text.append("\n  none on file: orders wait for a signed consent (send a reminder)")
    for consent in detail.consents:
        limits = []
        if consent.max_orders_per_batch:
            limits.append(f"{consent.max_orders_per_batch:,} orders")
        if consent.max_amount_per_batch:
            limits.append(format_money(*consent.max_amount_per_batch))
        places = ("all locations" if consent.location_ids == "ALL"
                  else f"{len(consent.location_ids)} locations")
        text.append("\n  ")
        text.append(consent.status.replace("_", " "),
                    "green" if consent.status == "active" else "yellow"
                    if consent.status == "not_yet_effective" else "red")
        until = (f" to {consent.expires_at:%Y-%m-%d}" if consent.expires_at
                 else ", no end date")
        text.append(f" {consent.consent_id[:8]}  from {consent.effective_from:%Y-%m-%d}{until}")
        if consent.revoked_at:
            text.append(f", revoked {consent.revoked_at:%Y-%m-%d}", "red")
        text.append(f"\n    per batch: {' and '.join(limits) or 'no limit'}; {places}")
    text.append("\nToken", "bold underline")
    text.append(f"\n  {detail.token_health.replace('_', ' ')}, expires "
                f"{_when(detail.token_expires_at)}")
    if detail.token_scopes:
        text.append(f"\n  scopes: {clip(', '.join(detail.token_scopes), FACTS_WIDTH - 10)}",
                    "dim")
    text.append("\nLocations", "bold underline")
    if not detail.locations:
        text.append("\n  none read yet")
    for name, status in detail.locations[:6]:
        text.append(f"\n  {clip(name, 44)}  ")
        text.append(status.lower(), "dim")
    if len(detail.locations) > 6:
        text.append(f"\n  … and {len(detail.locations) - 6} more", "dim")
    text.append("\nLast refresh", "bold underline")
    text.append(f"\n  {_when(detail.refreshed_at)} UTC, {since(detail.refreshed_age)}")
    if detail.error:
        text.append("\n  ")
        text.append(clip(detail.error, 140), "red")
    text.append("\nLast batches", "bold underline")
    if not detail.batches:
        text.append("\n  none yet")
    for batch in detail.batches:
        text.append(f"\n  {str(batch['created_at'])[:16].replace('T', ' ')}  "
                    f"{clip(batch['operator'], 16)}  ")
        text.append(f"{batch['completed'] or 0} completed", "green")
        text.append(f", {batch['skipped'] or 0} skipped, ")
        text.append(f"{batch['failed'] or 0} failed", "red" if batch["failed"] else "")
        if batch["open"]:
            text.append(f", {batch['open']} unsettled", "yellow")
    return text


class MerchantPane(Horizontal):
    """Facts on the left; the backlog chart on the right."""

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="merchant-facts"):
            yield Static("", id="merchant-facts-text")
        with Vertical(id="merchant-chart"):
            yield Static("Backlog by age, last 30 days: candidates at each day's last refresh",
                         classes="pane-title")
            yield Static("", id="backlog-chart")

    detail: MerchantDetail | None = None

    def on_resize(self) -> None:
        self._draw_chart()

    def _draw_chart(self) -> None:
        """The chart takes the pane's height: title, axis, legend and note take 5 lines."""
        chart = self.query_one("#backlog-chart", Static)
        if self.detail is None:
            chart.update("")
            return
        picture = backlog_chart(self.detail.history, max(6, self.size.height - 6))
        chart.update(picture)

    def show(self, detail: MerchantDetail | None) -> None:
        self.detail = detail
        text = self.query_one("#merchant-facts-text", Static)
        if detail is None:
            text.update("No merchant highlighted.")
        else:
            lines = facts(detail)
            text.update(lines)
        self._draw_chart()
