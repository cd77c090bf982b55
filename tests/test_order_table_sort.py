"""The queue table's sort order (console/widgets/order_table.py): by the column, ties by the
row's key (so a first page read in the same order is exactly the top of the full table),
either way round; made with two stable sorts, it must be the order (value, key) gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from console.widgets.order_table import TableRow, sorted_positions


def by_tuples(rows: list[TableRow], column: int | None, reverse: bool) -> list[int]:
    order = list(range(len(rows)))
    if column is not None:
        order.sort(key=lambda i: (rows[i].payload[column], rows[i].key), reverse=reverse)
    return order


@given(payloads=st.dictionaries(st.text(max_size=3), st.tuples(st.integers(0, 4),
                                                                 st.sampled_from("abc")),
                                max_size=40),
       column=st.sampled_from([None, 0, 1]), reverse=st.booleans())
def test_sort_is_by_value_then_key_either_way(payloads: dict[str, tuple[int, str]],
                                              column: int | None, reverse: bool) -> None:
    rows = [TableRow(key, "", "candidate", payload) for key, payload in payloads.items()]
    assert list(sorted_positions(rows, lambda payload, c: payload[c], column, reverse)) == \
        by_tuples(rows, column, reverse)
