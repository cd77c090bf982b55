"""Reminders: who is due a friendly reminder and why, the rendered message, send with
confirmation, history; and the demo's mailbox. Outside text (names, addresses, messages) is
shown through `SafeText` objects, never as markup."""

from __future__ import annotations

from collections.abc import Iterable
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Static

from console.safe_text import SafeText, safe
from console.screens.base import ConsoleScreen, Refreshed
from console.widgets.row_table import RowTable
from services.audit import AuditTrail
from services.reminders import ReminderPlan, ReminderProgress, ReminderService
from services.reminders.message import money, plain_text
from services.reminders.smtp import smtp_target_from
from services.store import Store

__all__ = ["MailboxScreen", "ReminderConfirm", "RemindersScreen"]

# Above this many reminders the operator types the count (as for completion).
TYPED_COUNT_THRESHOLD = 10


def _line(text: str) -> SafeText:
    return SafeText(plain_text(text, 400))


class ReminderConfirm(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "confirm", "Send these reminders", id="remind-confirm.yes"),
        Binding("n", "cancel", "Cancel", id="remind-confirm.no"),
        Binding("escape", "cancel", "Cancel", id="remind-confirm.cancel"),
    ]

    def __init__(self, plans: list[ReminderPlan]) -> None:
        super().__init__()
        self.plans = plans
        self.typed = len(plans) > TYPED_COUNT_THRESHOLD

    def compose(self) -> ComposeResult:
        text = SafeText(f"Send {len(self.plans)} reminder e-mail(s)?\n\n")
        for plan in self.plans[:12]:
            text.append(f"  {plain_text(plan.business_name, 40)}: {len(plan.orders)} orders "
                        f"→ {', '.join(plan.recipients)}\n")
        if len(self.plans) > 12:
            text.append(f"  …and {len(self.plans) - 12} more\n")
        text.append("\nEach gets one Message-ID for this window; a re-send after a crash "
                    "reuses it.")
        with Vertical(id="reminder-confirm-box"):
            yield Static(text, id="reminder-confirm-text")
            if self.typed:
                yield Static(safe(f"Type {len(self.plans)} and press Enter to send; Escape "
                                  "cancels."))
                field = Input(placeholder="type it here", id="reminder-confirm-input")
                field.cursor_blink = False
                yield field
                yield Static("", id="reminder-confirm-error")
            else:
                yield Static("Press y to send them, n or Escape to cancel.")

    def on_mount(self) -> None:
        if self.typed:
            self.set_focus(self.query_one(Input))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (action == "confirm" and self.typed)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip() == str(len(self.plans)):
            self.dismiss(True)
            return
        self.query_one("#reminder-confirm-error", Static).update(safe(
            f"That is not {len(self.plans)}: nothing was sent. Type it again or press Escape."))
        event.input.value = ""

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class RemindersScreen(ConsoleScreen):
    CSS_PATH = "../styles/reminders.tcss"
    BINDINGS = [
        Binding("enter", "preview", "Preview", id="reminders.preview"),
        Binding("space", "toggle_selected", "Select", id="reminders.select"),
        Binding("a", "select_due", "Select all due", id="reminders.all"),
        Binding("s", "send", "Send…", id="reminders.send"),
        Binding("h", "history", "History", id="reminders.history"),
        Binding("b", "mailbox", "Demo mailbox", id="reminders.mailbox"),
        Binding("r", "reload", "Reload", id="reminders.reload"),
        Binding("escape", "back", "Back", id="reminders.back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[ReminderPlan] = []
        self.selected: set[str] = set()
        self.sending = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Reminders", id="reminders-title", classes="title")
        with Horizontal(id="reminders-body"):
            table: DataTable[SafeText] = RowTable(id="reminders", cursor_type="row",
                                                     zebra_stripes=True)
            table.add_columns(" ", "Merchant", "Kind", "To", "Orders", "Totals", "Oldest",
                              "Status", "Last reminded")
            yield table
            with VerticalScroll(id="reminder-preview"):
                yield Static("Enter previews the highlighted reminder.", id="preview-text")
        yield Static(safe(self.recon.status), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()

    def service(self, store: Store | None = None) -> ReminderService:
        workspace = self.recon.workspace
        assert workspace is not None
        smtp = smtp_target_from(workspace.settings, required=False)
        service = ReminderService.for_workspace(workspace, smtp)
        if store is not None:  # a worker thread's own connection
            service.store = store
            service.audit = AuditTrail(store, workspace.clock)
        return service

    def reload(self) -> None:
        if self.recon.workspace is None or self.sending:
            return
        try:
            service = self.service()
            self.plans = service.plan()
            last = service.last_reminded()
        except Exception as error:  # a bad SMTP set-up or template: shown, never fatal
            from console.messages import describe
            self.show_status(describe(error), error=True)
            return
        self.selected &= {p.merchant_id for p in self.plans if p.due}
        table = self.query_one("#reminders", DataTable)
        table.clear()
        for plan in self.plans:
            status = SafeText("due", style="green") if plan.due else SafeText(
                str(plan.skip).replace("_", " ").lower(), style="yellow")
            # SafeText cells: a str cell of a DataTable is parsed as markup.
            recipients = _recipients(plan.recipients)
            table.add_row(
                safe("●" if plan.merchant_id in self.selected else " "),
                safe(plain_text(plan.business_name[:24], 400)),
                safe(plan.kind.value.replace("_", " ")), recipients, safe(len(plan.orders)),
                safe(", ".join(money(a, c) for c, a in sorted(plan.totals.items()))),
                safe(f"{plan.oldest_age.days}d"), status,
                safe((last.get(plan.merchant_id) or "—")[:16].replace("T", " ")),
                key=plan.merchant_id)
        due = sum(1 for p in self.plans if p.due)
        self.query_one("#reminders-title", Static).update(safe(
            f"Reminders: {due} due of {len(self.plans)} merchants with waiting orders; "
            f"{len(self.selected)} selected"))

    def _current(self) -> ReminderPlan | None:
        table = self.query_one("#reminders", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((p for p in self.plans if p.merchant_id == key), None)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Why the highlighted merchant is not due, or how to see its message."""
        plan = self._current()
        if plan is None:
            return
        text = SafeText(f"{plain_text(plan.business_name, 60)} ({plan.merchant_id})\n\n",
                    style="bold")
        text.append(plain_text(plan.detail, 1000) if not plan.due else
                    "Due. Enter previews the message; space selects; s sends.")
        for address in plan.rejected_addresses:
            text.append(f"\nNot a usable address: {plain_text(address, 100)}")
        self.query_one("#preview-text", Static).update(text)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_preview()

    def action_preview(self) -> None:
        plan = self._current()
        if plan is None:
            return
        rendered = self.service().render(plan)
        text = SafeText()
        text.append(f"To: {', '.join(plan.recipients) or '(no address)'}\n", style="bold")
        text.append(f"Subject: {rendered.subject}\n\n", style="bold")
        text.append(_body(rendered.text))
        self.query_one("#preview-text", Static).update(text)

    def action_toggle_selected(self) -> None:
        plan = self._current()
        if plan is None or not plan.due:
            return
        self.selected ^= {plan.merchant_id}
        table = self.query_one("#reminders", DataTable)
        table.update_cell(plan.merchant_id, table.ordered_columns[0].key,
                          "●" if plan.merchant_id in self.selected else " ")
        self.reload()

    def action_select_due(self) -> None:
        self.selected = {p.merchant_id for p in self.plans if p.due}
        self.reload()

    def action_history(self) -> None:
        plan = self._current()
        if plan is None:
            return
        rows = self.service().history(plan.merchant_id)
        text = SafeText(f"History of {plain_text(plan.business_name, 60)}\n\n", style="bold")
        for row in rows or []:
            text.append(f"{(row['settled_at'] or row['created_at'])[:16]}  {row['status']}"
                        f"{' ' + row['reason'] if row['reason'] else ''}  {row['orders']} "
                        f"orders → {', '.join(row['to'])}\n  {row['message_id']}\n")
        if not rows:
            text.append("No reminder yet.")
        self.query_one("#preview-text", Static).update(text)

    def action_send(self) -> None:
        if self.recon.read_only or self.sending:
            return
        chosen = [p for p in self.plans if p.due and (p.merchant_id in self.selected
                                                      or not self.selected)]
        if not self.selected:
            current = self._current()
            chosen = [current] if current is not None and current.due else []
        if not chosen:
            self.notify("Nothing due is selected (space selects, a selects all due).",
                        severity="warning")
            return
        workspace = self.recon.workspace
        if workspace is None or not workspace.settings.smtp_url:
            self.notify("RECON_SMTP_URL is not set: reminders cannot be sent.",
                        severity="error")
            return

        def confirmed(approved: bool | None) -> None:
            if approved:
                self.send_reminders(chosen)
            else:
                self.notify("Not confirmed: nothing was sent.")
        self.app.push_screen(ReminderConfirm(chosen), confirmed)

    @work(thread=True, exclusive=True, group="reminders", description="reminders")
    def send_reminders(self, plans: list[ReminderPlan]) -> None:
        workspace = self.recon.workspace
        assert workspace is not None
        self.sending = True
        store = workspace.store.for_thread()   # SQLite connections stay in their thread
        try:
            def progress(event: ReminderProgress) -> None:
                self.app.call_from_thread(
                    self.show_status, f"Sending… {event.done}/{event.total}: {event.sent} "
                    f"sent, {event.deferred} deferred, {event.failed} failed")
            self.app.call_from_thread(self.show_status, f"Sending {len(plans)} reminder(s)…")
            results = self.service(store).send(plans, on_progress=progress)
            counts: dict[str, int] = {}
            for result in results:
                counts[result.status] = counts.get(result.status, 0) + 1
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            self.app.call_from_thread(self.show_status, f"Reminders: {summary}.",
                                      any(r.status in ("failed", "deferred") for r in results))
        except Exception as error:
            from console.messages import describe
            self.app.call_from_thread(self.show_status, describe(error), True)
        finally:
            store.close()
            self.sending = False
            self.selected.clear()
            # Every screen reloads (the merchants screen shows "last reminded").
            self.app.call_from_thread(self.app.post_message, Refreshed())

    def action_mailbox(self) -> None:
        workspace = self.recon.workspace
        if workspace is None:
            return
        # Named by the demo (a team demo's database is a URL: nothing to look beside).
        folder = workspace.settings.demo_mailbox
        if folder is None or not folder.is_dir():
            self.notify("No demo mailbox here (it exists in `recon-console demo`).")
            return
        self.app.push_screen(MailboxScreen(folder))

    def action_reload(self) -> None:
        self.reload()

    def action_back(self) -> None:
        self.app.pop_screen()

    def palette_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Select all due reminders", "Select every due reminder",
                            self.action_select_due)
        yield SystemCommand("Demo mailbox", "The messages the demo's SMTP server received",
                            self.action_mailbox)


def _recipients(addresses: tuple[str, ...]) -> SafeText:
    """The first address, shortened, and how many more: the table stays readable."""
    if not addresses:
        return SafeText("no address", style="red")
    first = addresses[0] if len(addresses[0]) <= 30 else addresses[0][:29] + "…"
    return SafeText(first + (f" +{len(addresses) - 1}" if len(addresses) > 1 else ""))


def _body(text: str) -> SafeText:
    """A message body for the terminal: control characters out, line breaks kept."""
    return SafeText("\n".join(plain_text(line, 2000) for line in text.splitlines()))


class MailboxScreen(ConsoleScreen):
    """The demo's mailbox: the .eml files its local SMTP server wrote."""

    CSS_PATH = "../styles/reminders.tcss"
    BINDINGS = [Binding("escape", "back", "Back", id="mailbox.back")]

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.files: list[Path] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(safe(f"Demo mailbox: {self.folder}"), classes="title")
        with Horizontal(id="mailbox-body"):
            table: DataTable[SafeText] = RowTable(id="mailbox", cursor_type="row")
            table.add_columns("#", "To", "Subject")
            yield table
            with VerticalScroll(id="mail-text"):
                yield Static("", id="mail-body")
        yield Static(safe(self.recon.status), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.files = sorted(self.folder.glob("*.eml"))
        table = self.query_one("#mailbox", DataTable)
        for path in self.files:
            message = _parse(path)
            to, subject = _line(str(message["To"] or "")), _line(str(message["Subject"] or ""))
            table.add_row(safe(path.stem), to, subject, key=str(path))
        if not self.files:
            self.query_one("#mail-body", Static).update("No message yet.")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is None or event.row_key.value is None:
            return
        message = _parse(Path(event.row_key.value))
        body = message.get_body(("plain",))
        text = SafeText(f"From: {plain_text(str(message['From']))}\nTo: "
                    f"{plain_text(str(message['To']))}\nSubject: "
                    f"{plain_text(str(message['Subject']))}\nMessage-ID: "
                    f"{plain_text(str(message['Message-ID']))}\n\n", style="bold")
        text.append(_body(body.get_content() if body is not None else ""))
        self.query_one("#mail-body", Static).update(text)

    def action_back(self) -> None:
        self.app.pop_screen()


def _parse(path: Path) -> Any:
    return message_from_bytes(path.read_bytes(), policy=policy.default)
