"""`RowTable`: Textual's DataTable with the keys every table of the console shares.

Stock DataTable sends Home/End sideways (first and last column); in a table of rows the
operator means the first and last row, as in the queue (ctrl+home/ctrl+end still work)."""

from __future__ import annotations

from typing import TypeVar

from textual.binding import Binding
from textual.widgets import DataTable

__all__ = ["RowTable"]

CellType = TypeVar("CellType")


class RowTable(DataTable[CellType]):
    BINDINGS = [
        Binding("home", "scroll_top", "First row", show=False, id="table.first"),
        Binding("end", "scroll_bottom", "Last row", show=False, id="table.last"),
    ]
