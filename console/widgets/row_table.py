"""What every table of the console shares: Home/End go to the first and last row, and keys
typed in a burst follow the focus.

Stock DataTable sends Home/End sideways (first and last column); in a table of rows the
operator means the first and last row, as in the queue (ctrl+home/ctrl+end still work).

A burst (a paste into the terminal, tmux send-keys of a word, a fast typist) reaches the app
faster than the table handles it: every key is forwarded to the table while it still has the
focus, so the keys after `/` queue up at the table, and by the time each is handled the filter
has the focus and the key runs the screen's binding for it (`a` selected all, `c` completed).
So a table runs a key's binding as it takes the key (not after the key has bubbled up to the
app), and a key it receives once the focus has gone elsewhere goes on to the focused widget, in
order, as if it had been typed slowly."""

from __future__ import annotations

from typing import TypeVar, cast

from textual import events
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import DataTable

__all__ = ["FollowFocus", "RowTable"]

CellType = TypeVar("CellType")


class FollowFocus:
    """A mixin, first among a widget's bases (a Widget base of its own would hide the
    table's component classes)."""

    async def _on_key(self, event: events.Key) -> None:
        widget = cast(Widget, self)
        focused = widget.screen.focused
        if focused is not None and focused is not widget:
            event.prevent_default()  # not this widget's: Widget._on_key must not run it
            event.stop()
            focused.post_message(events.Key(event.key, event.character))
            return
        if await widget.handle_key(event):
            return
        # Run the key's binding now rather than after the bubble: `/` then moves the focus
        # before this widget takes the next key of the burst (which then follows it).
        active = widget.app.active_bindings.get(event.key)
        if active is not None and active.enabled:
            event.prevent_default()
            event.stop()
            await widget.app.run_action(active.binding.action, active.node)


class RowTable(FollowFocus, DataTable[CellType]):
    BINDINGS = [
        Binding("home", "scroll_top", "First row", show=False, id="table.first"),
        Binding("end", "scroll_bottom", "Last row", show=False, id="table.last"),
    ]
