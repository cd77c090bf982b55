"""A keyed, virtual table for queues of any size (Line API, Toolong's approach).

Only the visible lines are rendered, so 50,000 orders load, filter and select in milliseconds
where Textual's stock DataTable takes seconds (../shared/style.md). Rows are keyed by order id;
the selection is a set of keys, so it survives refreshes, filtering and sorting.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, MutableSet, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from console.heap import release_gradually
from console.widgets.row_table import FollowFocus
from services.text_safety import printable

if TYPE_CHECKING:
    from console.screens.base import ConsoleScreen

__all__ = ["Column", "KeySet", "OrderTable", "SortedData", "TableData", "TableRow"]


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    align_right: bool = False


class TableRow(msgspec.Struct, frozen=True, gc=False):
    """One row: cells are formatted from `payload` only when the row is on screen. Not
    tracked by the garbage collector (a 100,000-row table then costs a full collection
    nothing; it runs holding the GIL, so it stalled the UI): `payload` must not refer back
    to its row, or that cycle would never be freed."""

    key: str
    haystack: str                   # lower-case text the filter searches
    kind: str                       # candidate | blocked | manual
    payload: Any


class KeySet(MutableSet[str]):
    """The selection: a set of keys, kept as the keys of a dict (values None). A dict of
    strings and None is not tracked by the garbage collector, where a set always is: every
    full collection walked a 70,000-key selection (cache misses, holding the GIL)."""

    __slots__ = ("members",)

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.members: dict[str, None] = dict.fromkeys(keys)

    def __contains__(self, key: object) -> bool:
        return key in self.members

    def __iter__(self) -> Iterator[str]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"KeySet({list(self.members)!r})"

    def add(self, key: str) -> None:
        self.members[key] = None

    def discard(self, key: str) -> None:
        self.members.pop(key, None)

    def clear(self) -> None:
        self.members = {}

    def update(self, keys: Iterable[str]) -> None:
        added = dict.fromkeys(keys)
        self.members.update(added)

    def keep_only(self, keys: Collection[str]) -> None:
        """Drop the keys not in `keys`."""
        self.members = {key: None for key in self.members if key in keys}

    def toggle(self, keys: Iterable[str]) -> None:
        """Symmetric difference: keys in the selection leave it, the others join."""
        members = self.members
        for key in dict.fromkeys(keys):
            if key in members:
                del members[key]
            else:
                members[key] = None


Formatter = Callable[[Any], tuple[str, ...]]
SortKey = Callable[[Any, int], Any]


# Per kind (None: every row), its rows' positions in sort order and their haystacks (and
# keys), side by side: a filter is then one pass of `needle in haystack` over plain tuples.
Bases = dict[str | None, tuple[tuple[int, ...], tuple[str, ...]]]

# The table's large sequences (rows, keys, positions, haystacks, the view) are tuples, never
# lists: a tuple of objects the collector does not track (str, int, the gc=False rows) is
# untracked by CPython the first time a collection sees it, where a list stays tracked and
# every full collection walks its 100,000 items (one cache miss each: ~0.1 s holding the GIL
# with a few of them alive, measured 2026-12-02). tests/test_console_queue_loading.py checks it.


class TableData(NamedTuple):
    """Rows made ready for the table off the UI thread (`OrderTable.prepare`): the table
    then only swaps them in, so a 100,000-row load costs the UI thread one filter pass."""

    rows: tuple[TableRow, ...]
    keys: tuple[str, ...]           # rows' keys, by position
    position_of: dict[str, int]     # key -> position in rows (untracked: str -> int)
    order: tuple[int, ...]          # positions in the sort order below
    sort: tuple[int | None, bool]   # (column, reverse) that order is for
    bases: Bases


class SortedData(NamedTuple):
    """`rows` in another sort order, worked out off the UI thread (`OrderTable.prepare_sort`)."""

    rows: tuple[TableRow, ...]      # the very rows it is for: stale once the data is swapped
    order: tuple[int, ...]
    sort: tuple[int | None, bool]
    bases: Bases


def kind_bases(rows: Sequence[TableRow], order: tuple[int, ...]) -> Bases:
    haystacks = _side_by_side([rows[i].haystack for i in order])
    bases: Bases = {None: (order, haystacks)}
    for kind in {row.kind for row in rows}:
        mine = [rows[i].kind == kind for i in order]
        bases[kind] = (tuple(compress(order, mine)), tuple(compress(haystacks, mine)))
    return bases


def _side_by_side(texts: list[str]) -> tuple[str, ...]:
    """Copies of `texts` made one after another, so they lie in memory in the order a filter
    reads them: the rows' own haystacks, made in the database's order and read in the sort's,
    cost the filter a cache miss each (~60 ms over 100,000 rows, against ~15 ms in order)."""
    if not texts:
        return ()
    copies = "\x00".join(texts).split("\x00")
    if len(copies) != len(texts):  # a text holds the separator: copied one by one
        copies = [text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
                  for text in texts]
    return tuple(copies)


def sorted_positions(rows: Sequence[TableRow], sort_key: SortKey, column: int | None,
                     reverse: bool) -> tuple[int, ...]:
    """Row positions in sort order; ties go by key, so a first page read from the database
    in the same order is exactly the top of the full table (nothing moves when it lands)."""
    order = list(range(len(rows)))
    if column is not None:
        # Two stable sorts (by key, then by the column) rather than one by (value, key)
        # tuples: 100,000 tuples kept alive through the sort woke the cyclic collector over
        # the whole queue, a stall of ~0.3 s that the UI thread waits out (the GIL).
        keys = [row.key for row in rows]
        order.sort(key=keys.__getitem__, reverse=reverse)
        values = [sort_key(row.payload, column) for row in rows]
        order.sort(key=values.__getitem__, reverse=reverse)
    return tuple(order)


# Up to this many rows a sort is done at once on the UI thread (a few ms); above, the screen
# sorts in a worker (`prepare_sort`, `apply_sort`): 100,000 rows cost ~0.3 s of CPU.
SYNC_SORT_ROWS = 5_000


def _fit(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        return text[: max(0, width - 1)] + "…"
    return text.rjust(width) if right else text.ljust(width)


class OrderTable(FollowFocus, ScrollView, can_focus=True):
    """Rows, a filtered and sorted view of them, a cursor and a selection set."""

    COMPONENT_CLASSES = {"ordertable--header", "ordertable--cursor", "ordertable--selected",
                         "ordertable--blocked", "ordertable--manual"}
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False, id="queue.up"),
        Binding("down", "cursor(1)", "Down", show=False, id="queue.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="queue.pageup"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="queue.pagedown"),
        Binding("home", "jump(0)", "First", show=False, id="queue.home"),
        Binding("end", "jump(-1)", "Last", show=False, id="queue.end"),
        Binding("space", "toggle_row", "Select", id="queue.toggle"),
        Binding("shift+down", "extend(1)", "Extend selection", show=False, id="queue.extend"),
        Binding("shift+up", "extend(-1)", "Extend selection up", show=False,
                id="queue.extend_up"),
        Binding("v", "range", "Range", show=False, id="queue.range"),
        # Read-only: the queue's `c Complete` is off, and `c` lands here to say why.
        Binding("c", "explain_read_only", "Why no complete", show=False,
                id="queue.read_only_complete"),
    ]

    cursor = reactive(0, always_update=True, repaint=True)

    class Highlighted(Message):
        def __init__(self, key: str | None) -> None:
            super().__init__()
            self.key = key

    class SelectionChanged(Message):
        def __init__(self, count: int) -> None:
            super().__init__()
            self.count = count

        def can_replace(self, message: Message) -> bool:  # bursts coalesce
            return isinstance(message, OrderTable.SelectionChanged)

    def __init__(self, columns: Sequence[Column], formatter: Formatter, sort_key: SortKey, *,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.columns = list(columns)
        self.formatter = formatter
        self.sort_key = sort_key
        self.rows: tuple[TableRow, ...] = ()
        self._order: tuple[int, ...] | None = None
        self._bases: Bases | None = None
        self._ordered_for: tuple[int | None, bool] = (None, False)  # what _order is sorted by
        self._keys: tuple[str, ...] = ()
        self._cells: dict[str, tuple[str, ...]] = {}
        self.index: dict[str, int] = {}
        self.view: tuple[int, ...] = ()
        self.selected = KeySet()
        self.filter_text = ""
        self.kind_filter: str | None = None
        self.selected_only = False
        self.sort_column: int | None = None
        self.sort_reverse = False
        self.range_anchor: int | None = None
        self._width = 1 + sum(c.width for c in self.columns) + len(self.columns) - 1
        self._header = " " + " ".join(_fit(c.title, c.width, c.align_right)
                                      for c in self.columns)

    # ------------------------------------------------------------------ data
    def set_rows(self, rows: Iterable[TableRow]) -> None:
        """Replace the data, keeping the selection (of keys still present) and the cursor's
        row when it is still there."""
        self.set_data(self.prepare(rows))

    def prepare(self, rows: Iterable[TableRow]) -> TableData:
        """Index and sort rows for `set_data`; touches no widget state, so a worker thread
        can call it."""
        rows = tuple(rows)
        sort = (self.sort_column, self.sort_reverse)
        keys = tuple([row.key for row in rows])
        order = sorted_positions(rows, self.sort_key, *sort)
        return TableData(rows, keys, {key: i for i, key in enumerate(keys)}, order, sort,
                         kind_bases(rows, order))

    def set_data(self, data: TableData) -> None:
        """Swap in prepared rows, keeping the selection (of keys still present) and the
        cursor's row when it is still there."""
        current = self.current_key
        self._release()  # the old rows, freed off the UI thread
        self.rows = data.rows
        self._keys = data.keys
        self._cells = {}
        # Sorted for another column (the sort changed while it was prepared): a small table
        # sorts again now; a large one shows this order until a worker has sorted it
        # (`sort_pending`), as the UI thread must not sort 100,000 rows.
        fresh = data.sort == (self.sort_column, self.sort_reverse)
        keep = fresh or len(data.rows) > SYNC_SORT_ROWS
        self._order = data.order if keep else None
        self._bases = data.bases if keep else None
        self._ordered_for = data.sort
        self.index = data.position_of
        self.selected.keep_only(self.index.keys())
        self._rebuild_view(keep=current)

    def _sorted_order(self) -> tuple[int, ...]:
        """All rows in the current sort order, computed once per data and sort; filters then
        keep that order in one pass instead of sorting again."""
        if self._order is None:
            self._order = sorted_positions(self.rows, self.sort_key, self.sort_column,
                                           self.sort_reverse)
            self._ordered_for = (self.sort_column, self.sort_reverse)
        return self._order

    def _rebuild_view(self, keep: str | None = None) -> None:
        needle = self.filter_text.lower()
        if self._bases is None:
            self._bases = kind_bases(self.rows, self._sorted_order())
        positions, haystacks = self._bases.get(self.kind_filter, ((), ()))
        view = (tuple([i for i, haystack in zip(positions, haystacks, strict=True)
                       if needle in haystack]) if needle else positions)
        if self.selected_only:
            keys, selected = self._keys, self.selected.members
            view = tuple([i for i in view if keys[i] in selected])
        self.view = view
        self.virtual_size = Size(self._width, len(view) + 1)
        position = 0
        if keep is not None and keep in self.index:
            target = self.index[keep]
            try:
                position = view.index(target)
            except ValueError:
                position = 0
        self.cursor = min(position, max(0, len(view) - 1))
        self._scroll_to_cursor()
        self.refresh()
        self.post_message(self.Highlighted(self.current_key))

    def apply_filter(self, text: str) -> None:
        self.filter_text = text
        self._rebuild_view(keep=self.current_key)

    def apply_kind(self, kind: str | None) -> None:
        self.kind_filter = kind
        self._rebuild_view(keep=self.current_key)

    def sort_by(self, column: int, reverse: bool | None = None) -> None:
        if reverse is None:
            reverse = (not self.sort_reverse) if self.sort_column == column else False
        self.sort_column, self.sort_reverse = column, reverse
        self._order = self._bases = None
        self._rebuild_view(keep=self.current_key)

    def request_sort(self, column: int, reverse: bool) -> bool:
        """Sort by this column: at once for a small table; for a large one, only note it and
        return True: the caller sorts in a worker (`prepare_sort`, then `apply_sort`), and
        the rows keep their order meanwhile."""
        if len(self.rows) <= SYNC_SORT_ROWS:
            self.sort_by(column, reverse)
            return False
        self.sort_column, self.sort_reverse = column, reverse
        return self.sort_pending

    @property
    def sort_pending(self) -> bool:
        """The rows are shown in another order than the sort asked for (a worker's to do)."""
        return bool(self.rows) and self._ordered_for != (self.sort_column, self.sort_reverse)

    def prepare_sort(self, column: int | None, reverse: bool) -> SortedData:
        """The current rows in this sort order; touches no widget state (the rows list is
        replaced, never changed in place), so a worker thread can call it."""
        rows = self.rows
        order = sorted_positions(rows, self.sort_key, column, reverse)
        return SortedData(rows, order, (column, reverse), kind_bases(rows, order))

    def apply_sort(self, data: SortedData) -> bool:
        """Show a sort `prepare_sort` made, keeping the cursor's row and the selection; False
        (nothing changes) when the rows were swapped meanwhile."""
        if data.rows is not self.rows or data.sort != (self.sort_column, self.sort_reverse):
            return False
        release_gradually(self._haystacks())  # the previous order's copies
        self._order, self._bases, self._ordered_for = data.order, data.bases, data.sort
        self._rebuild_view(keep=self.current_key)
        return True

    def toggle_selected_only(self) -> bool:
        self.selected_only = not self.selected_only
        self._rebuild_view(keep=self.current_key)
        return self.selected_only

    # ------------------------------------------------------------------ selection
    @property
    def current_key(self) -> str | None:
        if 0 <= self.cursor < len(self.view):
            return self.rows[self.view[self.cursor]].key
        return None

    def _changed(self) -> None:
        self.refresh()
        self.post_message(self.SelectionChanged(len(self.selected)))

    def select_all_matching(self) -> None:
        keys = self._keys
        self.selected.update([keys[i] for i in self.view])
        self._changed()

    def invert_selection(self) -> None:
        self.selected.toggle([self._keys[i] for i in self.view])
        self._changed()

    def clear_selection(self) -> None:
        self.selected.clear()
        if self.selected_only:
            self._rebuild_view()
        self._changed()

    def select_keys(self, keys: Iterable[str]) -> None:
        """Select these rows (e.g. what a cancelled batch did not send)."""
        self.selected.update(k for k in keys if k in self.index)
        self._changed()

    def action_toggle_row(self) -> None:
        key = self.current_key
        if key is None:
            return
        if key in self.selected:
            self.selected.discard(key)
        else:
            self.selected.add(key)
        self._changed()
        self.action_cursor(1)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "explain_read_only":
            screen = self._console_screen()
            return screen is not None and screen.recon.read_only
        return True

    def _console_screen(self) -> ConsoleScreen | None:
        from console.screens.base import ConsoleScreen
        return self.screen if isinstance(self.screen, ConsoleScreen) else None

    def action_explain_read_only(self) -> None:
        screen = self._console_screen()
        if screen is not None:
            screen.show_status("Read-only: this console was opened with --read-only and "
                               "completes nothing. Quit (q) and open it without --read-only "
                               "to complete orders.", error=True)

    def action_extend(self, delta: int) -> None:
        key = self.current_key
        if key is not None:
            self.selected.add(key)
        self.action_cursor(delta)
        key = self.current_key
        if key is not None:
            self.selected.add(key)
        self._changed()

    def action_range(self) -> None:
        """First press marks an anchor; the second selects everything between."""
        if self.range_anchor is None:
            self.range_anchor = self.cursor
            self.notify("Range started: move, then press v again.", timeout=2)
            return
        low, high = sorted((self.range_anchor, self.cursor))
        self.selected.update(self.rows[i].key for i in self.view[low:high + 1])
        self.range_anchor = None
        self._changed()

    # ------------------------------------------------------------------ cursor
    def action_cursor(self, delta: int) -> None:
        if not self.view:
            return
        self.cursor = max(0, min(len(self.view) - 1, self.cursor + delta))
        self._scroll_to_cursor()
        self.post_message(self.Highlighted(self.current_key))

    def action_page(self, direction: int) -> None:
        self.action_cursor(direction * max(1, self.size.height - 2))

    def action_jump(self, where: int) -> None:
        if self.view:
            self.action_cursor((len(self.view) - 1 if where < 0 else 0) - self.cursor)

    def _scroll_to_cursor(self) -> None:
        visible = max(1, self.size.height - 1)
        top = round(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False)

    def on_click(self, event: events.Click) -> None:
        row = round(self.scroll_y) + event.y - 1
        if event.y >= 1 and 0 <= row < len(self.view):
            self.cursor = row
            self.post_message(self.Highlighted(self.current_key))

    # ------------------------------------------------------------------ rendering
    def render_line(self, y: int) -> Strip:
        width = max(self.size.width, self._width)
        scroll_x = round(self.scroll_x)
        if y == 0:
            header = self.get_component_rich_style("ordertable--header")
            return Strip([Segment(self._header.ljust(width), header)]).crop(
                scroll_x, scroll_x + self.size.width)
        position = round(self.scroll_y) + y - 1
        if position >= len(self.view):
            return Strip.blank(self.size.width, self.rich_style)
        row = self.rows[self.view[position]]
        mark = "●" if row.key in self.selected else " "
        cells = self._cells.get(row.key)
        if cells is None:
            # Cells carry Square's text and go to the terminal as segments: made printable.
            cells = self._cells[row.key] = tuple(printable(cell)
                                                 for cell in self.formatter(row.payload))
        text = mark + " ".join(_fit(cell, c.width, c.align_right)
                               for cell, c in zip(cells, self.columns, strict=False))
        style: Style = self.rich_style
        if row.kind == "blocked":
            style = style + self.get_component_rich_style("ordertable--blocked")
        elif row.kind == "manual":
            style = style + self.get_component_rich_style("ordertable--manual")
        if row.key in self.selected:
            style = style + self.get_component_rich_style("ordertable--selected")
        if position == self.cursor:
            style = style + self.get_component_rich_style("ordertable--cursor")
        return Strip([Segment(text.ljust(width), style)]).crop(scroll_x,
                                                               scroll_x + self.size.width)

    def on_resize(self) -> None:
        self._scroll_to_cursor()

    def on_unmount(self) -> None:
        # A popped queue's rows: freed off the UI thread rather than by the collector that
        # frees the screen (in one piece, holding the GIL).
        self._release()
        self.rows, self._keys, self.view, self.index = (), (), (), {}
        self._order = self._bases = None
        self._cells = {}

    def _release(self) -> None:
        """Free the rows (and the ints of their positions) off the UI thread, in slices,
        once this table has let go of them."""
        release_gradually(self.rows, self.index, self._order or (), self._haystacks())

    def _haystacks(self) -> tuple[str, ...]:
        """The filter's copies of the rows' haystacks (every kind's are among them)."""
        return self._bases[None][1] if self._bases and None in self._bases else ()


