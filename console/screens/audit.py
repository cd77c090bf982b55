"""Audit: entries with filters, the chain status, export."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Iterable
from pathlib import Path

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from console.messages import describe
from console.safe_text import SafeText, safe
from console.widgets.row_table import RowTable

FILTER_KEYS = {"merchant": "merchant_id", "operator": "operator", "order": "order_id",
               "outcome": "outcome", "since": "since", "until": "until", "action": "action"}
SHOWN = 2000


def parse_filter(text: str) -> tuple[dict[str, str], str | None]:
    """`merchant:ID outcome:failed since:2026-11-01` -> filters, or an error sentence."""
    filters: dict[str, str] = {}
    try:
        words = shlex.split(text)
    except ValueError:
        return {}, "Unbalanced quotes in the filter."
    for word in words:
        name, _, value = word.partition(":")
        if name not in FILTER_KEYS or not value:
            return {}, (f"Unknown filter {word!r}: use merchant:, operator:, order:, "
                        "outcome:, action:, since:, until:.")
        filters[FILTER_KEYS[name]] = value
    return filters, None


class AuditScreen(Screen[None]):
    AUTO_FOCUS = "#entries"
    BINDINGS = [
        Binding("slash", "filter", "Filter", id="audit.filter"),
        Binding("v", "verify", "Verify chain", id="audit.verify"),
        Binding("e", "export('jsonl')", "Export JSONL", id="audit.export_jsonl"),
        Binding("E", "export('csv')", "Export CSV", id="audit.export_csv"),
        Binding("escape", "back", "Back", id="audit.back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filters: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Audit trail", classes="title", id="audit-title")
        yield Static("Chain: not verified yet (v verifies)", id="chain")
        field = Input(placeholder="merchant:ID operator:NAME order:ID outcome:failed "
                                  "since:2026-11-01", id="audit-filter")
        field.display = False
        field.cursor_blink = False  # steady cursor: calmer, and stable snapshots
        yield field
        table: DataTable[SafeText] = RowTable(id="entries", cursor_type="row", zebra_stripes=True)
        table.add_columns("#", "At (UTC)", "Operator", "Action", "Merchant", "Order", "v",
                          "Outcome", "Detail")
        yield table
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.action_verify()

    def reload(self) -> None:
        workspace = self.app.workspace  # type: ignore[attr-defined]
        table = self.query_one("#entries", DataTable)
        table.clear()
        entries = list(workspace.audit.entries(**self.filters, limit=SHOWN, newest_first=True))
        names = workspace.merchant_names()
        for entry in entries:
            merchant = entry["merchant_id"] or ""
            # Names, ids and details are third-party text: SafeText cells, never markup.
            table.add_row(safe(entry["seq"]), safe((entry["at"] or "")[:19].replace("T", " ")),
                          safe(entry["operator"]), safe(entry["action"]),
                          safe(names.get(merchant, merchant)[:22]),
                          safe((entry["order_id"] or "")[:14]), safe(entry["version"] or ""),
                          safe(entry["outcome"]), safe((entry["detail"] or "")[:48]))
        shown = ", ".join(f"{k}={v}" for k, v in self.filters.items()) or "all entries"
        self.query_one("#audit-title", Static).update(
            safe(f"Audit trail: {len(entries)} newest shown ({shown}); / filters"))

    @work(exclusive=True, group="verify")
    async def action_verify(self) -> None:
        workspace = self.app.workspace  # type: ignore[attr-defined]
        chain = self.query_one("#chain", Static)
        chain.update("Chain: verifying…")
        # The same check as `audit verify`: every link, then the latest signed checkpoint.
        # Its own connection: SQLite connections stay in their thread.
        try:
            report = await asyncio.to_thread(workspace.verify, own_connection=True)
        except Exception as error:  # e.g. a key file others can read: shown, never fatal
            chain.update(safe(f"Chain: ✘ not checked: {describe(error)}"))
            chain.add_class("error")
            return
        checked = report.checkpoint
        against = (f" against checkpoint {Path(checked['path']).name} ({checked['size']} "
                   f"entries, {checked['created_at']})" if checked else "")
        if report.ok:
            if report.warning:
                against = "; ⚠ no signed checkpoint yet: the tail of the chain is not anchored"
            chain.update(safe(f"Chain: ✔ verified to entry {report.entries} "
                              f"(head {report.head_hash[:12]}){against}"))
            chain.remove_class("error")
        else:
            where = f" at entry {report.broken_at}" if report.broken_at is not None else ""
            chain.update(safe(f"Chain: ✘ BROKEN{where}: {report.problem}" +
                              (f" (checked{against})" if checked else "")))
            chain.add_class("error")

    def action_filter(self) -> None:
        field = self.query_one("#audit-filter", Input)
        field.display = True
        # Focus now, not on the next tick (Widget.focus defers): keys typed right after `/`
        # must land in the filter, not trigger the screen's one-letter bindings.
        self.set_focus(field)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        filters, error = parse_filter(event.value)
        if error:
            self.notify(error, severity="error")
            return
        self.filters = filters
        self.reload()
        self.set_focus(self.query_one("#entries", DataTable))

    def action_export(self, fmt: str) -> None:
        workspace = self.app.workspace  # type: ignore[attr-defined]
        stamp = workspace.clock().strftime("%Y%m%dT%H%M%S")
        path = Path(str(workspace.settings.db)).parent / f"audit-{stamp}.{fmt}"
        filters = {k: v for k, v in self.filters.items() if k in ("merchant_id", "since")}
        try:
            with path.open("w", newline="") as handle:
                count = workspace.audit.export(handle, fmt, **filters)
        except OSError as error:  # a message, not a crash
            self.app.set_status(  # type: ignore[attr-defined]
                f"Audit export not written: {path}: {error.strerror or error}; check the "
                "folder exists and is writable.", error=True)
            return
        self.notify(f"{count} entries exported to {path}")

    def action_back(self) -> None:
        field = self.query_one("#audit-filter", Input)
        if field.display:
            field.display = False
            self.set_focus(self.query_one("#entries", DataTable))
            return
        self.app.pop_screen()

    def palette_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Verify audit chain", "Recompute every link", self.action_verify)
        yield SystemCommand("Export audit (JSON Lines)", "Beside the database",
                            lambda: self.action_export("jsonl"))
        yield SystemCommand("Export audit (CSV)", "Beside the database",
                            lambda: self.action_export("csv"))
