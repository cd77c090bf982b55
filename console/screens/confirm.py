"""Approve exactly what you saw: count and totals per currency per merchant; friction grows with
the batch (a large one needs the count or the merchant's name typed, never just a key)."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from console.safe_text import SafeText, safe
from services.workspace import Preview, format_money

# Above either threshold the operator types the count (or the merchant's name).
TYPED_COUNT_THRESHOLD = 10
TYPED_AMOUNT_THRESHOLD = 100_000  # minor units per currency (1,000.00 USD)


def needs_typing(preview: Preview) -> bool:
    if preview.count > TYPED_COUNT_THRESHOLD:
        return True
    return any(amount > TYPED_AMOUNT_THRESHOLD for totals in preview.totals.values()
               for amount in totals.values())


class ConfirmScreen(ModalScreen[bool]):
    """Returns True only on the confirming key (small batch) or the typed count (large)."""

    BINDINGS = [
        Binding("y", "confirm", "Complete these orders", id="confirm.yes"),
        Binding("n", "cancel", "Cancel", id="confirm.no"),
        Binding("escape", "cancel", "Cancel", id="confirm.cancel"),
    ]

    def __init__(self, preview: Preview) -> None:
        super().__init__()
        self.preview = preview
        self.typed = needs_typing(preview)

    def compose(self) -> ComposeResult:
        # Merchant names are third-party text: the dialog is built from inert SafeText only,
        # so nothing in it can be a link or an action (`[@click=screen.dismiss(True)]`).
        preview = self.preview
        text = SafeText(f"Complete {preview.count} orders in Square?\n\n")
        for merchant_id, totals in sorted(preview.totals.items()):
            count = sum(1 for i in preview.items if i.merchant_id == merchant_id)
            money = ", ".join(format_money(a, c) for c, a in sorted(totals.items()))
            text.append("  ")
            text.append(safe(preview.names.get(merchant_id, merchant_id)))
            text.append(f": {count} orders, {money}\n")
        if preview.held_back:
            text.append(f"\n  Held back: {len(preview.held_back)} "
                        f"({', '.join(sorted({r for _, r in preview.held_back}))})\n")
        text.append(f"\nApproved set {preview.sha256[:16]}…: each order is re-checked at send "
                    "time; anything changed since is skipped, not completed.")
        with Vertical(id="confirm-box"):
            yield Static(text, id="confirm-text")
            if self.typed:
                merchants = list(preview.totals)
                hint = f"Type {preview.count}"
                if len(merchants) == 1:
                    hint += f" or the merchant's name ({preview.names.get(merchants[0])})"
                yield Static(safe(f"{hint} and press Enter to complete; Escape cancels."),
                             id="confirm-hint")
                typed = Input(placeholder=str(preview.count), id="confirm-input")
                typed.cursor_blink = False
                yield typed
                yield Static("", id="confirm-error")
            else:
                yield Static("Press y to complete them, n or Escape to cancel.",
                             id="confirm-hint")

    def on_mount(self) -> None:
        if self.typed:
            self.set_focus(self.query_one(Input))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Large batches: only the typed count confirms.
        return not (action == "confirm" and self.typed)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        typed = event.value.strip()
        accepted = {str(self.preview.count)}
        if len(self.preview.totals) == 1:
            name = self.preview.names.get(next(iter(self.preview.totals)), "")
            if name:
                accepted.add(name.strip().lower())
        if typed.lower() in accepted:
            self.dismiss(True)
        else:
            self.query_one("#confirm-error", Static).update(safe(
                f"That is not {self.preview.count}: nothing was sent. Type it again or press "
                "Escape."))
            event.input.value = ""

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


def start_completion(app: App[object], order_ids: list[str]) -> None:
    """Preview the chosen orders, confirm, then run the batch on the progress screen."""
    from console.screens.progress import ProgressScreen
    workspace = app.workspace  # type: ignore[attr-defined]
    if app.read_only:  # type: ignore[attr-defined]
        return
    preview = workspace.preview(order_ids=order_ids)
    if preview.count == 0:
        reasons = sorted({r for _, r in preview.held_back})
        extra = f" (held back: {', '.join(reasons)})" if reasons else ""
        app.notify("None of the selected orders can be completed now" + extra + ".",
                   severity="warning")
        return

    def confirmed(approved: bool | None) -> None:
        if approved:
            app.push_screen(ProgressScreen(preview))
        else:
            app.notify("Not confirmed: nothing was sent.")

    app.push_screen(ConfirmScreen(preview), confirmed)
