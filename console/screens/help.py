"""`?`: every binding active where help was asked, with its id for rebinding."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from console.safe_text import safe

# The same on every screen (tests/test_console_keys.py holds each screen to them).
KEYS_EVERYWHERE = """\
space     selects/unselects the highlighted order AND moves to the next row,
          so holding space selects a run of orders; shift+down/up extend the
          same way
home/end  go to the first / last row of any table (not sideways)
/         opens the filter; keys typed or pasted right after it land in it
esc       closes the innermost thing first (filter, detail pane, dialog),
          then goes back"""

# Lines of at most 78 characters: the help box wraps longer ones, leaving a word alone.
COLUMNS = """\
Eligible      candidates: orders that can be completed now
Oldest        age of the oldest candidate
Ages <1d…2w+  one bar per age band of the candidates: under 1 day, 1-3 days,
              3-7 days, 7-14 days, 2 weeks and more; the tallest bar is the
              band with the most orders, · is a band with none
Next sync     time until the merchant's own daily sync (its sync time, in its
              time zone), when Square may change its orders; complete before
              it, or refresh after
Note          what needs doing; the detail pane below (d) shows it in full
Detail pane   consents, token, locations, last refresh, last batches, and the
              backlog by age over 30 days: each column a day, oldest orders on
              top (red)"""


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
            yield Static("Keys everywhere", classes="title")
            yield Static(KEYS_EVERYWHERE)
            yield Static("What the merchants screen's columns mean", classes="title")
            yield Static(COLUMNS)
