"""Approvals (four-eyes, issue 14): batches prepared by one operator that wait for another's
decision, or are approved and wait to run. The second operator sees the same orders and totals
the preparer saw, and approves (typing the count) or rejects, with a reason. Merchant names are
outside text: every cell and the detail pane are SafeText."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Static

from console.messages import describe
from console.safe_text import SafeText, clip, safe
from console.screens.base import ConsoleScreen
from console.widgets.row_table import RowTable
from console.wording import money_text, plural
from services.errors import ReconError
from services.store import Approval
from services.workspace import Preview

__all__ = ["ApprovalDecision", "ApprovalsScreen"]

SHOWN_ORDERS = 200  # in the detail pane; the rest are counted


def batch_text(approval: Approval, preview: Preview) -> SafeText:
    """The batch as its preparer saw it: per merchant, the count and totals per currency."""
    text = SafeText(f"Batch {approval.batch_id}\n", style="bold")
    text.append(f"Prepared by {approval.prepared_by} at {approval.prepared_at}\n")
    text.append(f"Needs a second operator: {approval.why}\n")
    text.append(f"Status: {approval.status}")
    if approval.decided_by:
        text.append(f" by {approval.decided_by}")
    if approval.expires_at:
        text.append(f", until {approval.expires_at}")
    text.append(f"\n\n{plural(preview.count, 'order')}\n")
    for merchant_id, count, totals in preview.per_merchant():
        text.append("  ")
        text.append(clip(preview.names.get(merchant_id, merchant_id), 60))
        text.append(f" ({merchant_id}): {plural(count, 'order')}, {money_text(totals)}\n")
    text.append(f"\nApproved set {approval.approved_set_sha256}\nEach order is re-checked at "
                "send time; anything changed since is skipped, not completed.\n\nOrders:\n")
    for item in preview.items[:SHOWN_ORDERS]:
        text.append(f"  {item.merchant_id}  {item.order_id}  version {item.version}\n")
    if preview.count > SHOWN_ORDERS:
        text.append(f"  …and {preview.count - SHOWN_ORDERS:,} more "
                    f"(`recon-console approve {approval.batch_id} --json` lists them all)\n")
    return text


class ApprovalDecision(ModalScreen[str | None]):
    """Approve (type the count, and optionally a reason) or reject (a reason is required).
    Returns the reason ("" for none) when confirmed, None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="approval-decision.cancel")]

    def __init__(self, approval: Approval, preview: Preview, approve: bool) -> None:
        super().__init__()
        self.approval = approval
        self.preview = preview
        self.approve = approve

    def compose(self) -> ComposeResult:
        verb = "Approve" if self.approve else "Reject"
        with Vertical(id="approval-decision-box"):
            yield Static(safe(f"{verb} this batch?"), classes="title")
            batch = VerticalScroll(id="approval-decision-batch")
            batch.can_focus = False  # a click on the names must not take the typing away
            shown: SafeText = batch_text(self.approval, self.preview)
            with batch:
                yield Static(shown)
            if self.approve:
                yield Static(safe(f"Type {self.preview.count} to approve; the reason is "
                                  "optional. Enter confirms, Escape cancels."))
                count = Input(placeholder="type it here", id="approval-count")
                count.cursor_blink = False
                yield count
            else:
                yield Static("Say why (recorded in the audit). Enter rejects, Escape cancels.")
            reason = Input(placeholder="reason", id="approval-reason")
            reason.cursor_blink = False
            yield reason
            yield Static("", id="approval-error")

    def on_mount(self) -> None:
        self.set_focus(self.query_one("#approval-count" if self.approve else "#approval-reason",
                                      Input))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        error = self.query_one("#approval-error", Static)
        reason = self.query_one("#approval-reason", Input).value.strip()
        if self.approve:
            typed = self.query_one("#approval-count", Input).value.strip()
            if typed != str(self.preview.count):
                error.update(safe(f"That is not {self.preview.count}: nothing was approved. "
                                  "Type it again or press Escape."))
                self.query_one("#approval-count", Input).value = ""
                self.set_focus(self.query_one("#approval-count", Input))
                return
            if event.input.id == "approval-count":
                self.set_focus(self.query_one("#approval-reason", Input))
                error.update(safe("Count confirmed: add a reason if you like, then Enter."))
                return
        elif not reason:
            error.update(safe("A rejection needs a reason."))
            return
        self.dismiss(reason)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ApprovalsScreen(ConsoleScreen):
    CSS_PATH = "../styles/approvals.tcss"
    BINDINGS = [
        Binding("a", "approve", "Approve…", id="approvals.approve"),
        Binding("x", "reject", "Reject…", id="approvals.reject"),
        Binding("c", "run", "Run approved", id="approvals.run"),
        Binding("r", "reload", "Reload", id="approvals.reload"),
        Binding("escape", "back", "Back", id="approvals.back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[Approval] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Approvals", id="approvals-title", classes="title")
        with Horizontal(id="approvals-body"):
            table: DataTable[SafeText] = RowTable(id="approvals", cursor_type="row",
                                                  zebra_stripes=True)
            table.add_columns("Batch", "Status", "Prepared by", "At", "Orders", "Merchants",
                              "Totals", "Approval expires")
            yield table
            with VerticalScroll(id="approval-detail"):
                yield Static("The highlighted batch shows here.", id="approval-text")
        yield Static(safe(self.recon.status), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("approve", "reject", "run"):
            return not self.recon.read_only
        return True

    def reload(self) -> None:
        if self.recon.workspace is None:
            return
        self.batches = self.workspace.pending_batches()
        table = self.query_one("#approvals", DataTable)
        table.clear()
        for approval in self.batches:
            _, preview = self.workspace.prepared_batch(approval.batch_id)
            names = [preview.names.get(m, m) for m, _, _ in preview.per_merchant()]
            totals: dict[str, int] = {}
            for by_currency in preview.totals.values():
                for currency, amount in by_currency.items():
                    totals[currency] = totals.get(currency, 0) + amount
            table.add_row(safe(approval.batch_id[:8]), safe(approval.status),
                          safe(approval.prepared_by), safe(approval.prepared_at[:16]),
                          safe(approval.orders), safe(clip(", ".join(names), 40)),
                          safe(money_text(totals)), safe((approval.expires_at or "—")[:16]),
                          key=approval.batch_id)
        mine = self.workspace.operator
        waiting = sum(1 for a in self.batches if a.status == "pending" and a.prepared_by != mine)
        self.query_one("#approvals-title", Static).update(safe(
            f"Approvals: {len(self.batches)} prepared batch(es); {waiting} wait for your "
            f"decision ({mine})"))
        self._show_current()

    def _current(self) -> Approval | None:
        table = self.query_one("#approvals", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((a for a in self.batches if a.batch_id == key), None)

    def _show_current(self) -> None:
        approval = self._current()
        detail = self.query_one("#approval-text", Static)
        if approval is None:
            detail.update("No batch waits for a second operator.")
            return
        _, preview = self.workspace.prepared_batch(approval.batch_id)
        shown: SafeText = batch_text(approval, preview)
        detail.update(shown)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_current()

    def _decide(self, approve: bool) -> None:
        approval = self._current()
        if approval is None:
            return
        if approval.status != "pending":
            self.say(f"Batch {approval.batch_id[:8]} is already {approval.status}.", error=True)
            return
        if approval.prepared_by == self.workspace.operator:
            self.say("You prepared this batch: another operator must approve or reject it.",
                     error=True)
            return
        _, preview = self.workspace.prepared_batch(approval.batch_id)

        def decided(reason: str | None) -> None:
            if reason is None:
                self.say("Nothing decided.")
                return
            try:
                done = self.workspace.decide_batch(approval.batch_id, approve, reason or None)
            except ReconError as error:  # refused (e.g. decided meanwhile): shown, not fatal
                self.say(describe(error), error=True)
            else:
                self.say(f"Batch {done.batch_id[:8]} {done.status} by {done.decided_by}"
                         + (f" until {done.expires_at}" if done.expires_at else "") + ".")
            self.reload()

        self.app.push_screen(ApprovalDecision(approval, preview, approve), decided)

    def action_approve(self) -> None:
        self._decide(True)

    def action_reject(self) -> None:
        self._decide(False)

    def action_run(self) -> None:
        """Run an approved batch on the progress screen (the engine checks the approval)."""
        from console.screens.progress import ProgressScreen
        approval = self._current()
        if approval is None:
            return
        if approval.status != "approved":
            self.say(f"Batch {approval.batch_id[:8]} is {approval.status}: only an approved "
                     "batch runs.", error=True)
            return
        _, preview = self.workspace.prepared_batch(approval.batch_id)
        self.app.push_screen(ProgressScreen(preview, batch_id=approval.batch_id))

    def action_reload(self) -> None:
        self.reload()

    def action_back(self) -> None:
        self.app.pop_screen()
