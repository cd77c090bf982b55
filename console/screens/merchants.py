"""Merchants: one row per merchant with credentials, most urgent first."""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from console.safe_text import SafeText, clip, safe, safe_join
from console.screens.base import LOAD_GROUP, ConsoleScreen
from console.widgets.merchant_detail import MerchantPane
from console.widgets.row_table import RowTable
from console.wording import format_money
from services.private_files import open_private
from services.processes import HOST
from services.text_safety import csv_cell
from services.timestamps import parse_time

if TYPE_CHECKING:  # types only (see console/app.py)
    from services.store import OperatorSession
    from services.workspace import MerchantOverview, Workspace

_SPARK = " ▁▂▃▄▅▆▇█"
_CONSENT_STYLE = {"active": "green", "expiring": "yellow", "expired": "red", "revoked": "red",
                  "not_yet_effective": "yellow", "none": "dim"}
_TOKEN_STYLE = {"valid": "green", "expiring": "yellow", "expired": "red", "revoked": "red",
                "invalid": "red", "missing_scopes": "yellow", "merchant_mismatch": "red",
                "unknown": "dim"}


def sparkline(buckets: Iterable[int]) -> str:
    values = list(buckets)
    top = max(values) if values else 0
    if not top:
        return "·" * len(values)
    # A band with any order is at least the lowest bar: rounded down to the blank, 1 order
    # beside 40 looked like none, and unlike `·` (none) the blank is explained nowhere.
    return "".join(_SPARK[max(1, round(v / top * (len(_SPARK) - 1)))] if v else "·"
                   for v in values)


def online_line(sessions: list[OperatorSession], me: str | None, limit: int = 8) -> SafeText:
    """"Online: ann (you) · bob (console on laptop-2) · cat (complete)"; `me` is this
    console's session id. Names are the operators' own text: shown literally, clipped."""
    if not sessions:
        return safe("Online: nobody (presence could not be recorded)", "dim")
    parts: list[object | tuple[object, str]] = [("Online: ", "bold")]
    for index, session in enumerate(sessions[:limit]):
        if index:
            parts.append(" · ")
        where = "you" if session.session_id == me else \
            session.kind + ("" if session.host == HOST else f" on {clip(session.host, 24)}")
        parts += [(clip(session.operator, 24), "bold"), f" ({where})"]
    if len(sessions) > limit:
        parts.append(f" · and {len(sessions) - limit} more")
    return safe_join(*parts)


def duration(delta: timedelta | None) -> str:
    if delta is None:
        return "—"
    minutes = int(delta.total_seconds() // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


Cells = tuple[SafeText, ...]


def overview_cells(row: MerchantOverview, now: datetime, reminded: dict[str, str]) -> Cells:
    """One merchant's row of the table, as text (pure: made in the overview's worker)."""
    total = ", ".join(format_money(a, c) for c, a in sorted(row.totals.items())) or "—"
    oldest = "—"
    if row.oldest_candidate_at:
        age = now - parse_time(row.oldest_candidate_at)
        oldest = f"{age.days}d" if age.days else f"{age.seconds // 3600}h"
    note = row.error or (f"{row.waiting_without_consent} waiting: send a reminder"
                         if row.waiting_without_consent else "")
    if not row.error and row.merchant_id in reminded:
        note = f"reminded {reminded[row.merchant_id][:10]}" + (f"; {note}" if note else "")
    if row.leased_by:  # another operator's run is sending for this merchant now
        note = f"LEASED by {row.leased_by}" + (f"; {note}" if note else "")
    consent = row.consent_status.replace("_", " ")
    if row.consent_expires_at and row.consent_status == "expiring":
        consent += f" {row.consent_expires_at[:10]}"
    # Every cell is SafeText: a str cell would be parsed as markup by DataTable.
    return (safe(clip(row.business_name, 40)),
            safe(consent, _CONSENT_STYLE.get(row.consent_status, "")),
            safe(row.token_health.replace("_", " "), _TOKEN_STYLE.get(row.token_health, "")),
            safe(f"{row.candidates:,}" if row.candidates else "—"), safe(total), safe(oldest),
            safe(sparkline(row.age_buckets)), safe(duration(row.next_sync_in)),
            safe(clip(note, 36),  # in full in the detail pane
                 "red" if row.error else "yellow"))


def same_cells(a: Cells, b: Cells | None) -> bool:
    """Text, style and spans (Rich's Text == leaves the style out)."""
    return b is not None and len(a) == len(b) and all(
        x.plain == y.plain and x.style == y.style and x.spans == y.spans
        for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class OverviewData:
    """The merchants screen's data, read and written out as cells off the UI thread."""

    rows: list[MerchantOverview]
    cells: dict[str, Cells]              # merchant id -> its row's cells
    sessions: list[OperatorSession]      # who is online


def overview_of(workspace: Workspace, expiry_s: float) -> OverviewData:
    """Runs in a worker thread, on a connection of its own: reads every open order."""
    from services.reminders.service import last_reminded
    with workspace.own_connection() as own:
        rows = own.overview()
        now = own.clock()
        reminded = last_reminded(own.store)
        sessions = own.online(expiry_s)
    return OverviewData(rows, {r.merchant_id: overview_cells(r, now, reminded) for r in rows},
                        sessions)


class MerchantTable(RowTable[SafeText]):
    # The table has focus and its enter shadows the screen's: shown, as the key that matters.
    BINDINGS = [Binding("enter", "select_cursor", "Open queue", id="merchants.open")]


class MerchantsScreen(ConsoleScreen):
    BINDINGS = [
        Binding("Q", "all_queues", "All queues", id="merchants.all"),
        Binding("n", "toggle_reminders", "Reminder list", id="merchants.reminders"),
        Binding("e", "export_reminders", "Export reminders", id="merchants.export"),
        Binding("r", "app.refresh", "Refresh", id="merchants.refresh"),
        # Innermost first: the reminder list's filter, then the detail pane; the merchants
        # screen is the first screen, so there is nothing to go back to.
        Binding("escape", "close", "Close", show=False, id="merchants.close"),
        Binding("d", "toggle_detail", "Detail", id="merchants.detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.reminders_only = False
        self.rows: list[MerchantOverview] = []
        self._cells: dict[str, Cells] = {}
        self._shown_keys: list[str] = []           # the table's rows, in order
        self._shown_cells: dict[str, Cells] = {}   # and what each shows
        self._online = SafeText()

    def compose(self) -> ComposeResult:
        yield Header()
        if self.recon.read_only:
            yield Static("READ-ONLY: this console offers no write actions.", id="read-only")
        yield Static("", id="banner")
        yield Static("Merchants", id="title", classes="title")
        yield Static("", id="presence")
        table = MerchantTable(id="merchants", cursor_type="row", zebra_stripes=True)
        table.add_columns("Merchant", "Consent", "Token", "Eligible", "Total", "Oldest",
                          "Ages <1d…2w+", "Next sync", "Note")
        yield table
        yield MerchantPane(id="merchant-detail")
        yield Static(safe(self.recon.status), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#banner", Static).display = False
        self.reload()

    def reload(self) -> None:
        workspace = self.recon.workspace
        if workspace is None:
            return
        banner = self.query_one("#banner", Static)
        banner.display = bool(workspace.credentials_error)
        if workspace.credentials_error:
            banner.update(safe(workspace.credentials_error))
            banner.add_class("error")
        self.load_overview(workspace)

    @work(exclusive=True, group=LOAD_GROUP, description="merchant overview")
    async def load_overview(self, workspace: Workspace) -> None:
        """The overview reads every open order: in a thread, on a connection of its own,
        which also writes its cells out, so the UI thread only paints them (exclusive: a
        newer reload cancels this one before it lands)."""
        data = await asyncio.to_thread(overview_of, workspace, self.recon.presence_expiry_s)
        self.rows, self._cells = data.rows, data.cells
        self._fill()
        self._show_online(data.sessions)
        self._show_detail(self._current_merchant())

    def _fill(self) -> None:
        """Show `rows`. The same merchants in the same order (a live reload, once a second
        while another operator sends) change only the cells that changed: clearing and
        refilling would flicker, and for a frame paint the header at the empty table's widths."""
        table = self.query_one("#merchants", DataTable)
        rows = [r for r in self.rows if not self.reminders_only or
                (r.consent_status in ("none", "expired", "revoked", "not_yet_effective")
                 and r.waiting_without_consent)]
        keys = [row.merchant_id for row in rows]
        if keys and keys == self._shown_keys:
            for key in keys:
                cells: Cells = self._cells[key]
                if not same_cells(cells, self._shown_cells.get(key)):
                    for column, cell in zip(table.columns, cells, strict=True):
                        table.update_cell(key, column, cell, update_width=True)
        else:
            current = None
            if table.row_count and table.cursor_row is not None:
                try:
                    current = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
                except Exception:
                    current = None
            table.clear()
            for row in rows:
                cells = self._cells[row.merchant_id]  # SafeText, from overview_cells
                table.add_row(*cells, key=row.merchant_id)
            if current is not None:
                for index, row in enumerate(rows):
                    if row.merchant_id == current:
                        table.move_cursor(row=index)
        self._shown_keys = keys
        self._shown_cells = {key: self._cells[key] for key in keys}
        title = "Reminder list: merchants without usable consent who have waiting orders" \
            if self.reminders_only else f"Merchants ({len(rows)}), most urgent first"
        self.query_one("#title", Static).update(safe(title))

    def _show_online(self, sessions: list[OperatorSession] | None = None) -> None:
        """`sessions`: as the overview's worker read them, else read now (a one-row-per-
        session read, once a second)."""
        workspace = self.recon.workspace
        if workspace is not None:
            if sessions is None:
                sessions = workspace.online(self.recon.presence_expiry_s)
            me = workspace.presence.session.session_id if workspace.presence else None
            line: SafeText = online_line(sessions, me)
            if line != self._online:  # once a second: repaint only a change
                self._online = line
                self.query_one("#presence", Static).update(line)

    def tick(self) -> None:
        """Who is online now; and a lease whose holder died (no release, so no change for
        the feed) stops showing once it has expired."""
        workspace = self.recon.workspace
        if workspace is None:
            return
        shown = {r.merchant_id for r in self.rows if r.leased_by}
        if self.rows and set(workspace.leased_merchants()) != shown:
            self.reload()
        else:
            self._show_online()

    def _current_merchant(self) -> str | None:
        table = self.query_one("#merchants", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """The highlighted merchant's problem, in full, where the operator looks."""
        key = event.row_key.value if event.row_key is not None else None
        row = next((r for r in self.rows if r.merchant_id == key), None)
        self._show_detail(key)
        if row is not None and row.error:
            self.show_status(f"{row.business_name}: {row.error}", error=True)
        else:
            self.show_status(self.recon.status)

    def _show_detail(self, merchant_id: str | None) -> None:
        pane = self.query_one(MerchantPane)
        workspace = self.recon.workspace
        if not pane.display or workspace is None:
            return
        pane.show(workspace.merchant_detail(merchant_id) if merchant_id else None)

    def action_toggle_detail(self) -> None:
        pane = self.query_one(MerchantPane)
        pane.display = not pane.display
        self.query_one("#merchants", DataTable).set_class(not pane.display, "alone")
        self._show_detail(self._current_merchant())

    def action_close(self) -> None:
        if self.reminders_only:
            self.action_toggle_reminders()
        elif self.query_one(MerchantPane).display:
            self.action_toggle_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open_queue()

    def action_open_queue(self) -> None:
        from console.screens.queue import QueueScreen
        merchant = self._current_merchant()
        if merchant is not None:
            self.app.push_screen(QueueScreen(merchant))

    def action_all_queues(self) -> None:
        from console.screens.queue import QueueScreen
        if self.recon.workspace is not None:
            self.app.push_screen(QueueScreen(None))

    def action_toggle_reminders(self) -> None:
        self.reminders_only = not self.reminders_only
        self._fill()

    def action_export_reminders(self) -> None:
        workspace = self.recon.workspace
        if workspace is None:
            return
        rows = [r for r in self.rows if r.waiting_without_consent]
        path = workspace.settings.local_dir / "reminders.csv"
        try:
            with open_private(path, newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["merchant_id", "business_name", "consent_status",
                                 "orders_waiting"])
                for row in rows:
                    writer.writerow([csv_cell(row.merchant_id), csv_cell(row.business_name),
                                     csv_cell(row.consent_status), row.waiting_without_consent])
        except OSError as error:  # a message, not a crash
            self.recon.set_status(f"Reminder list not written: {path}: {error.strerror or error}"
                                  "; check the folder exists and is writable.", error=True)
            return
        self.notify(f"Reminder list ({len(rows)} merchants) written to {path}")

    def palette_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Reminder list", "Merchants without consent who have waiting "
                            "orders", self.action_toggle_reminders)
        yield SystemCommand("Export reminder list", "Write reminders.csv beside the database",
                            self.action_export_reminders)
        yield SystemCommand("All queues", "Every merchant's orders in one queue",
                            self.action_all_queues)
