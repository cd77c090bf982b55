"""`?`: every binding active where help was asked, with its id for rebinding."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from console.safe_text import safe


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close", id="help.close")]

    def __init__(self, bindings: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        table = Table("Key", "Does", "Binding id", box=None, padding=(0, 2))
        seen = set()
        for key, description, binding_id in self.bindings:
            if (key, description) in seen:
                continue
            seen.add((key, description))
            # Keys and ids may come from the operator's keymap file: shown literally.
            table.add_row(safe(key), safe(description), safe(binding_id))
        with VerticalScroll(id="help-box"):
            yield Static("Keys here (ctrl+p opens the command palette; Escape closes)",
                         classes="title")
            yield Static(table)
