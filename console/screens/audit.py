"""Audit: entries with filters, the chain status, export, and one entry in full."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Static

from console.messages import describe
from console.safe_text import SafeText, safe
from console.screens.base import ConsoleScreen
from console.widgets.row_table import RowTable
from console.wording import plural
from services.private_files import open_private
from services.store import utc_text

FILTER_KEYS = {"merchant": "merchant_id", "operator": "operator", "order": "order_id",
               "outcome": "outcome", "since": "since", "until": "until", "action": "action"}
SHOWN = 2000


def parse_filter(text: str) -> tuple[dict[str, str], str | None]:
    """`merchant:ID outcome:failed since:2026-11-01` -> filters, or an error sentence.
    `since:`/`until:` become UTC instants in the audit's own text form."""
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
        if name in ("since", "until"):
            instant, error = parse_instant(name, value)
            if error:
                return {}, error
            value = instant
        filters[FILTER_KEYS[name]] = value
    return filters, None


def parse_instant(name: str, value: str) -> tuple[str, str | None]:
    """A date (UTC midnight) or a time with its zone -> the audit's UTC text; else an error
    that says what is accepted. The audit's `at` is compared as text, so it must be UTC."""
    try:
        day = date.fromisoformat(value)
    except ValueError:
        pass
    else:
        return utc_text(datetime(day.year, day.month, day.day, tzinfo=UTC)), None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return "", (f"{name}:{value} is not a date or time: use e.g. {name}:2026-11-01 or "
                    f"{name}:2026-11-01T10:30Z.")
    if moment.tzinfo is None:
        return "", (f"{name}:{value} has no zone: add one, e.g. {name}:{value}Z for UTC or "
                    f"{name}:{value}+02:00.")
    return utc_text(moment), None


def resolve_merchant(value: str, names: Mapping[str, str]) -> tuple[str, str | None]:
    """A merchant id, or a name or part of one (any case) -> the id, or an error sentence
    (no match, or several: the operator is told which)."""
    if value in names:
        return value, None
    wanted = value.casefold()
    matches = sorted((name, merchant_id) for merchant_id, name in names.items()
                     if wanted in name.casefold() or wanted in merchant_id.casefold())
    if len(matches) == 1:
        return matches[0][1], None
    if not matches:
        return "", f"merchant:{value} matches no merchant's id or name."
    listed = ", ".join(name for name, _ in matches[:5]) + ("…" if len(matches) > 5 else "")
    return "", f"merchant:{value} matches {len(matches)} merchants ({listed}): be more specific."


class AuditEntryScreen(ModalScreen[None]):
    """One entry, every field, in full: all of it is inert text (details carry Square's and
    merchants' words)."""

    BINDINGS = [Binding("escape", "close", "Close", id="audit_entry.close"),
                Binding("enter", "close", "Close", show=False, id="audit_entry.enter")]

    def __init__(self, entry: Mapping[str, Any], merchant_name: str = "") -> None:
        super().__init__()
        self.entry = dict(entry)
        self.merchant_name = merchant_name

    def compose(self) -> ComposeResult:
        text = SafeText(f"Audit entry {self.entry.get('seq')}\n\n", "bold")
        width = max(len(k) for k in self.entry)
        for key, value in self.entry.items():
            text.append(f"{key:<{width}}  ", style="dim")
            text.append(safe("" if value is None else value))
            if key == "merchant_id" and self.merchant_name and value:
                text.append("  (")
                text.append(safe(self.merchant_name))
                text.append(")")
            text.append("\n")
        text.append("\nEscape closes.", style="dim")
        with VerticalScroll(id="audit-entry-box"):
            yield Static(text, id="audit-entry-text")

    def action_close(self) -> None:
        self.dismiss(None)


class AuditScreen(ConsoleScreen):
    AUTO_FOCUS = "#entries"
    BINDINGS = [
        Binding("slash", "filter", "Filter", id="audit.filter"),
        Binding("enter", "open_entry", "Entry in full", id="audit.open", show=False),
        Binding("v", "verify", "Verify chain", id="audit.verify"),
        Binding("e", "export('jsonl')", "Export JSONL", id="audit.export_jsonl"),
        Binding("E", "export('csv')", "Export CSV", id="audit.export_csv"),
        Binding("escape", "back", "Back", id="audit.back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filters: dict[str, str] = {}
        self.filter_text = ""
        self.shown: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Audit trail", classes="title", id="audit-title")
        yield Static("Chain: not verified yet (v verifies)", id="chain")
        field = Input(placeholder="merchant:NAME-OR-ID operator:NAME order:ID outcome:failed "
                                  "since:2026-11-01", id="audit-filter")
        field.display = False
        field.cursor_blink = False  # steady cursor: calmer, and stable snapshots
        yield field
        table: DataTable[SafeText] = RowTable(id="entries", cursor_type="row", zebra_stripes=True)
        table.add_columns("#", "At (UTC)", "Operator", "Action", "Merchant", "Order", "v",
                          "Outcome", "Detail")
        yield table
        yield Static(safe(self.recon.status), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.action_verify()

    def reload(self) -> None:
        workspace = self.workspace
        table = self.query_one("#entries", DataTable)
        table.clear()
        self.shown = list(workspace.audit.entries(**self.filters, limit=SHOWN,
                                                  newest_first=True))
        names = workspace.merchant_names()
        for entry in self.shown:
            merchant = entry["merchant_id"] or ""
            # Names, ids and details are third-party text: SafeText cells, never markup.
            table.add_row(safe(entry["seq"]), safe((entry["at"] or "")[:19].replace("T", " ")),
                          safe(entry["operator"]), safe(entry["action"]),
                          safe(names.get(merchant, merchant)[:22]),
                          safe((entry["order_id"] or "")[:14]), safe(entry["version"] or ""),
                          safe(entry["outcome"]), safe((entry["detail"] or "")[:48]))
        shown = self.filter_text or "all entries"
        self.query_one("#audit-title", Static).update(
            safe(f"Audit trail: {plural(len(self.shown), 'newest entry', 'newest entries')} "
                 f"shown ({shown}); / filters, enter shows an entry in full"))

    @work(exclusive=True, group="verify")
    async def action_verify(self) -> None:
        workspace = self.workspace
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
        # The time of this check: `v` again shows it ran again (the line was the same).
        at = workspace.clock().astimezone(UTC).strftime("%H:%M:%S UTC")
        against = (f" against checkpoint {Path(checked['path']).name} ({checked['size']} "
                   f"entries, {str(checked['created_at'])[:19].replace('T', ' ')})"
                   if checked else "")
        if report.ok:
            if report.warning:
                against = "; ⚠ no signed checkpoint yet: the tail of the chain is not anchored"
            chain.update(safe(f"Chain: ✔ verified at {at} to entry {report.entries} "
                              f"(head {report.head_hash[:12]}){against}"))
            chain.remove_class("error")
        else:
            where = f" at entry {report.broken_at}" if report.broken_at is not None else ""
            chain.update(safe(f"Chain: ✘ BROKEN{where} (checked at {at}): {report.problem}" +
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
        if not error and "merchant_id" in filters:
            filters["merchant_id"], error = resolve_merchant(
                filters["merchant_id"], self.workspace.merchant_names())
        if error:
            # The entries shown stay those of the last good filter; the field keeps the text.
            self.say(error, error=True)
            return
        self.filters = filters
        self.filter_text = event.value.strip()
        self.say(f"Filter: {self.filter_text}" if self.filter_text else "Filter cleared.")
        self.reload()
        self.set_focus(self.query_one("#entries", DataTable))

    def action_open_entry(self) -> None:
        table = self.query_one("#entries", DataTable)
        if not self.shown or table.cursor_row is None or table.cursor_row >= len(self.shown):
            return
        entry = self.shown[table.cursor_row]
        names = self.workspace.merchant_names()
        self.app.push_screen(AuditEntryScreen(entry, names.get(entry["merchant_id"] or "", "")))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        # DataTable takes `enter` itself (as RowSelected) while it has focus.
        event.stop()
        self.action_open_entry()

    def action_export(self, fmt: str) -> None:
        """Every entry the filter selects (all of them, not only the newest shown), oldest
        first, beside the database; the status line says where."""
        workspace = self.workspace
        stamp = workspace.clock().strftime("%Y%m%dT%H%M%S")
        path = workspace.settings.local_dir / f"audit-{stamp}.{fmt}"
        try:
            with open_private(path, newline="") as handle:
                count = workspace.audit.export(handle, fmt, **self.filters)
        except OSError as error:  # a message, not a crash
            self.say(f"Audit export not written: {path}: {error.strerror or error}; check the "
                     "folder exists and is writable.", error=True)
            return
        which = f" matching {self.filter_text}" if self.filter_text else ""
        self.say(f"Exported {plural(count, 'entry', 'entries')}{which} to {path}")

    def action_back(self) -> None:
        field = self.query_one("#audit-filter", Input)
        if field.display:
            field.display = False
            self.set_focus(self.query_one("#entries", DataTable))
            return
        self.app.pop_screen()

    def palette_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Verify audit chain", "Recompute every link", self.action_verify)
        yield SystemCommand("Export audit (JSON Lines)", "What the filter shows, beside the "
                            "database", lambda: self.action_export("jsonl"))
        yield SystemCommand("Export audit (CSV)", "What the filter shows, beside the database",
                            lambda: self.action_export("csv"))
