"""Approve exactly what you saw: count and totals per currency per merchant; friction grows with
the batch (a large one needs the count or the merchant's name typed, never just a key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from console.safe_text import SafeText, safe
from console.widgets.backdrop import FrozenBackdrop
from console.wording import money_text, plural

if TYPE_CHECKING:  # types only (see console/app.py)
    from collections.abc import Iterable

    from rich.console import RenderableType

    from services.workspace import Preview, Workspace

# Above either threshold the operator types the count (or the merchant's name).
TYPED_COUNT_THRESHOLD = 10
TYPED_AMOUNT_THRESHOLD = 100_000  # minor units per currency (1,000.00 USD)


def confirmation_of(workspace: Workspace, order_ids: Iterable[str]
                    ) -> tuple[Preview, str | None, SafeText | None]:
    """Runs in a worker thread: the preview of these orders, why it needs a second operator
    (or None), and the confirmation's text; touches no widget. For a new batch and for a
    retry of the failed alike."""
    with workspace.own_connection() as own:
        preview = own.preview(order_ids=list(order_ids))
        if not preview.count:
            return preview, None, None
        why = own.needs_second_operator(preview)
    return preview, why, confirmation_text(preview, why)


def needs_typing(preview: Preview) -> bool:
    if preview.count > TYPED_COUNT_THRESHOLD:
        return True
    return any(amount > TYPED_AMOUNT_THRESHOLD for totals in preview.totals.values()
               for amount in totals.values())


def confirmation_text(preview: Preview, second_operator: str | None = None) -> SafeText:
    """The dialog's text: the count, each merchant's orders and totals, what is held back.
    Pure (touches no widget): for 100,000 orders the app builds it in a worker thread, so
    only mounting the finished dialog falls on the UI thread."""
    # Merchant names are third-party text: the dialog is built from inert SafeText only,
    # so nothing in it can be a link or an action (`[@click=screen.dismiss(True)]`).
    if second_operator:
        text = SafeText(f"Prepare {plural(preview.count, 'order')} for a second operator?"
                        "\n\n")
    else:
        text = SafeText(f"Complete {plural(preview.count, 'order')} in Square?\n\n")
    for merchant_id, count, totals in preview.per_merchant():
        text.append("  ")
        text.append(safe(preview.names.get(merchant_id, merchant_id)))
        text.append(f": {plural(count, 'order')}, {money_text(totals)}\n")
    if preview.held_back:
        text.append(f"\n  Held back: {len(preview.held_back):,} "
                    f"({', '.join(sorted({r for _, r in preview.held_back}))})\n")
    text.append(f"\nApproved set {preview.sha256[:16]}…: each order is re-checked at send "
                "time; anything changed since is skipped, not completed.")
    if second_operator:
        text.append(f"\n\nThis batch needs a second operator ({second_operator}): "
                    "it is stored for approval and nothing is sent now. Another operator "
                    "approves it on the Approvals screen (P).")
    return text


class ConfirmScreen(ModalScreen[bool]):
    """Returns True only on the confirming key (small batch) or the typed count (large)."""

    BINDINGS = [
        Binding("y", "confirm", "Complete these orders", id="confirm.yes"),
        Binding("n", "cancel", "Cancel", id="confirm.no"),
        Binding("escape", "cancel", "Cancel", id="confirm.cancel"),
    ]

    def __init__(self, preview: Preview, second_operator: str | None = None,
                 text: SafeText | None = None) -> None:
        """`second_operator`: why this batch needs another operator's approval (four-eyes),
        so confirming only prepares it; said before the count is typed, not after. `text`:
        `confirmation_text(preview, second_operator)`, already built (in a worker)."""
        super().__init__()
        self.preview = preview
        self.second_operator = second_operator
        self.typed = needs_typing(preview)
        self._backdrop = FrozenBackdrop()
        self.text = text if text is not None else confirmation_text(preview, second_operator)

    def render(self) -> RenderableType:
        # The queue below, tinted once: Textual tints it again on every render of the modal
        # (several while it mounts, ~30 ms of UI-thread CPU each over a 160x50 queue).
        return self._backdrop.wrap(super().render())

    def compose(self) -> ComposeResult:
        preview = self.preview
        verb = "prepare it" if self.second_operator else "complete"
        text = self.text
        with Vertical(id="confirm-box"):
            yield Static(text, id="confirm-text")
            if self.typed:
                merchants = list(preview.totals)
                hint = f"Type {preview.count}"
                if len(merchants) == 1:
                    hint += f" or the merchant's name ({preview.names.get(merchants[0])})"
                yield Static(safe(f"{hint} and press Enter to {verb}; Escape cancels."),
                             id="confirm-hint")
                # Not the count itself as the placeholder: it would look already typed.
                typed = Input(placeholder="type it here", id="confirm-input")
                typed.cursor_blink = False
                yield typed
                yield Static("", id="confirm-error")
            else:
                action = verb if self.second_operator else "complete them"
                yield Static(safe(f"Press y to {action}, n or Escape to cancel."),
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
            # Stripped before the test: a name of only spaces would make Enter confirm.
            name = self.preview.names.get(next(iter(self.preview.totals)), "").strip()
            if name:
                accepted.add(name.lower())
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
