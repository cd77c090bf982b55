"""Queue: one merchant's (or every merchant's) open orders; filter, select, complete."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Header, Input, Static

from console.heap import release_gradually
from console.safe_text import safe
from console.screens.base import LOAD_GROUP, CompleteRequested, ConsoleScreen
from console.widgets.order_detail import OrderDetail
from console.widgets.order_table import Column, OrderTable, TableData, TableRow
from console.wording import format_money, hold_text, holds_summary, money_text, plural
from services.money import totals_by_currency
from services.store import QueuedOrder
from services.timestamps import parse_time
from services.workspace import Hold, Workspace

KINDS = {"1": ("candidate", "Candidates"), "2": ("blocked", "Blocked"),
         "3": ("manual", "Manual only"), "4": (None, "All")}
SORTS = ["age", "total", "merchant", "reason"]


def order_kind(order: QueuedOrder, held: bool = False) -> str:
    """A candidate is an order a batch would send now: an eligible order held back (token,
    lease, batch limit) is shown with the blocked ones, with why."""
    if order.eligible:
        return "blocked" if held else "candidate"
    return "manual" if order.reason == "MANUAL_ONLY" else "blocked"


def age_text(created_at: str, now: datetime) -> str:
    age = now - parse_time(created_at)
    if age.days:
        return f"{age.days}d{age.seconds // 3600:02d}h"
    return f"{age.seconds // 3600}h{age.seconds % 3600 // 60:02d}m"


class QueueLine(msgspec.Struct, frozen=True, gc=False):
    """What a queue row needs to be drawn: the order and its names (untracked by the garbage
    collector, as QueuedOrder is: it refers to nothing that could refer back)."""

    order: QueuedOrder
    merchant: str
    location: str
    hold: str | None = None   # why an eligible order is held back now

    @property
    def reason(self) -> str:
        return self.hold or self.order.reason or ""


def make_row(order: QueuedOrder, merchant: str, location: str,
             hold: Hold | None = None) -> TableRow:
    total = format_money(order.total_amount, order.currency)
    held = hold_text(hold) if hold is not None else None
    haystack = " ".join((order.order_id, order.reference_id or "", merchant, location,
                         held or order.reason or "candidate", order.fulfillments,
                         total)).lower()
    return TableRow(order.order_id, haystack, order_kind(order, hold is not None),
                    QueueLine(order, merchant, location, held))


def line_cells(line: QueueLine, now: datetime, with_merchant: bool) -> tuple[str, ...]:
    order = line.order
    fulfillments = order.fulfillments.replace("SHIPMENT", "SHIP").replace("PICKUP", "PICK")
    cells = (order.reference_id or "—", order.order_id[:12], line.merchant, line.location,
             age_text(order.created_at, now), format_money(order.total_amount, order.currency),
             fulfillments, line.reason or "✔ candidate")
    return cells if with_merchant else cells[:2] + cells[3:]


_SORT_GETTERS: list[Callable[[QueueLine], Any]] = [
    lambda line: line.order.reference_id or "", lambda line: line.order.order_id,
    lambda line: line.merchant, lambda line: line.location,
    lambda line: line.order.created_at, lambda line: line.order.total_amount,
    lambda line: line.order.fulfillments, lambda line: line.reason]


def line_sort_key(line: QueueLine, column: int, with_merchant: bool) -> Any:
    if not with_merchant and column >= 2:
        column += 1  # the merchant column is not shown
    return _SORT_GETTERS[column](line)


@dataclass(frozen=True)
class QueueData:
    """A queue read and made ready off the UI thread (`QueueScreen.load`)."""

    orders: dict[str, QueuedOrder]
    holds: dict[str, Hold]
    kinds: dict[str, str]               # order id -> candidate | blocked | manual
    table: TableData
    now: datetime
    held_text: str                      # "held back: …" for the selection line, or ""
    complete: bool                      # False: only the first screenful, the rest to come
    leased: set[str]                    # merchants another live run holds, at this read
    kind_counts: Counter[str]           # orders per kind (the tabs' counts)


# Orders read first, oldest first, so the screen shows before the rest has loaded: a few
# screenfuls, enough for the Candidates tab to fill the table when some are held back.
FIRST_PAGE = 300
# The collector stays on while a queue is read. Paused (gc.disable), the big collection that
# followed fell on the UI thread: up to 0.8 s of its CPU at 100,000 orders, against under 0.1 s
# left on (measured 2026-12-02). No gc.freeze() per load either: what it freezes (popped
# screens among it) is never freed. The rows are untracked instead (QueuedOrder, QueueLine,
# TableRow), and the console freezes only what lives from its start (console.app.freeze_heap).
# Above this many selected orders the selection's totals are added up in a worker thread.
SELECTION_IN_WORKER = 5_000


def selection_totals(selected: Iterable[str], orders: dict[str, QueuedOrder],
                     kinds: dict[str, str]) -> tuple[int, str]:
    """(candidates among the selected, their totals as text): what the confirmation will
    hold (held orders are left out)."""
    chosen = [orders[key] for key in selected
              if key in orders and kinds.get(key) == "candidate"]
    return len(chosen), money_text(totals_by_currency(chosen))


COLUMNS = [Column("Ref", 10), Column("Order", 12), Column("Merchant", 18),
           Column("Location", 14), Column("Age", 7, True), Column("Total", 13, True),
           Column("Fulfillments", 18), Column("Reason", 22)]
# Column index (in COLUMNS, with the merchant column) each sort name sorts by.
_SORT_INDEX = {"age": 4, "total": 5, "merchant": 2, "reason": 7}


class QueueScreen(ConsoleScreen):
    AUTO_FOCUS = "#orders"
    BINDINGS = [
        Binding("slash", "filter", "Filter", id="queue.filter"),
        Binding("escape", "back", "Back", id="queue.back"),
        # Off the footer: the tabs line above the table shows them; with them (and longer
        # labels) the footer was cut at 160 columns, losing `q Quit`.
        Binding("1", "kind('1')", "Candidates", show=False, id="queue.candidates"),
        Binding("2", "kind('2')", "Blocked", show=False, id="queue.blocked"),
        Binding("3", "kind('3')", "Manual", show=False, id="queue.manual"),
        Binding("4", "kind('4')", "All", show=False, id="queue.all"),
        Binding("a", "select_all", "All matching", id="queue.select_all"),
        Binding("i", "invert", "Invert", id="queue.invert"),
        Binding("x", "clear", "Clear", id="queue.clear"),
        Binding("s", "selected_only", "Selected only", id="queue.selected_only"),
        Binding("o", "sort", "Sort", id="queue.sort"),
        Binding("c", "complete", "Complete", id="queue.complete"),
        Binding("r", "app.refresh", "Refresh", id="queue.refresh"),
    ]

    def __init__(self, merchant_id: str | None) -> None:
        super().__init__()
        self.merchant_id = merchant_id
        self.kind_key = "1"
        self.sort_name = "age"
        self.orders: dict[str, QueuedOrder] = {}
        self.holds: dict[str, Hold] = {}
        self.kinds: dict[str, str] = {}
        self._kind_counts: Counter[str] = Counter()
        self._now = datetime.now(UTC)
        self._leased: set[str] = set()  # merchants another run held at the last reload
        self.loaded = False          # the whole queue is in (not only its first screenful)
        self._held_text = ""
        self._selection_money: tuple[int, str] | None = (0, "")

    def compose(self) -> ComposeResult:
        yield Header()
        if self.recon.read_only:
            yield Static("READ-ONLY: this console offers no write actions.", id="read-only")
        yield Static("", id="tabs", classes="title")
        filter_input = Input(placeholder="filter: order, ref, location, reason, amount…",
                             id="filter")
        filter_input.display = False
        filter_input.cursor_blink = False  # steady cursor: calmer, and stable snapshots
        yield filter_input
        with Horizontal(id="queue-body"):
            with_merchant = self.merchant_id is None
            columns = COLUMNS if with_merchant else [c for c in COLUMNS if c.title != "Merchant"]
            yield OrderTable(columns, lambda line: line_cells(line, self._now, with_merchant),
                             lambda line, column: line_sort_key(line, column, with_merchant),
                             id="orders")
            yield OrderDetail(id="detail")
        yield Static("", id="selection")
        yield Static(safe(self.recon.status), id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(OrderTable)
        table.kind_filter = KINDS[self.kind_key][0]
        table.sort_column = self._sort_index()
        self.reload()
        table.focus()

    def _sort_index(self) -> int:
        index = _SORT_INDEX[self.sort_name]
        return index if self.merchant_id is None else (index - 1 if index > 2 else index)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (action == "complete" and self.recon.read_only)

    def reload(self) -> None:
        if self.recon.workspace is not None:
            self.load()

    @work(exclusive=True, group=LOAD_GROUP)
    async def load(self) -> None:
        """Read the queue in a thread on a connection of its own: first the oldest orders
        (the first screenful, at once), then all of them. Exclusive: a newer load cancels
        this one, so an older answer never lands over a newer one."""
        workspace = self.recon.workspace
        assert workspace is not None
        if self._taken_down():  # started after the screen went: nothing to fill
            return
        table = self.query_one(OrderTable)
        if not self.loaded:  # the first load: the oldest orders at once
            self._show(await asyncio.to_thread(self._read, workspace, table, FIRST_PAGE))
        self._show(await asyncio.to_thread(self._read, workspace, table, None))

    def _read(self, workspace: Workspace, table: OrderTable, limit: int | None) -> QueueData:
        """Runs in a worker thread: reads the database and builds rows, touches no widget."""
        with workspace.own_connection() as own:
            now = own.clock()
            names = own.merchant_names()
            locations = own.location_names()
            orders = (own.queue(self.merchant_id, ordered=False) if limit is None
                      else own.store.oldest_orders(self.merchant_id, limit))
            # The oldest orders are a prefix of the queue by age, so their holds (batch
            # limits are taken oldest first) are those the full queue gives them.
            holds = own.holds(orders)
            leased = set(own.leased_merchants())
        # "Blue Fern Bakery — Main Street" -> "Main Street": the merchant has its own column.
        short = {k: v.split(" — ")[-1] for k, v in locations.items()}
        rows = [make_row(o, names.get(o.merchant_id, o.merchant_id),
                         short.get(o.location_id, o.location_id), holds.get(o.order_id))
                for o in orders]
        by_id = {o.order_id: o for o in orders}
        kinds = {row.key: row.kind for row in rows}
        held_text = ""
        if holds:
            consent_of = {k: by_id[k].consent_id for k in holds}
            per_consent = Counter(o.consent_id or "" for k, o in by_id.items()
                                  if kinds.get(k) == "candidate")
            held_text = f"   held back: {holds_summary(holds, consent_of, per_consent)}"
        return QueueData(by_id, holds, kinds, table.prepare(rows), now, held_text,
                         complete=limit is None, leased=leased,
                         kind_counts=Counter(kinds.values()))  # ~10 ms at 100,000: here

    def _taken_down(self) -> bool:
        """Whether this screen's widgets are gone: a worker's answer that lands then (the
        console quitting prunes widgets before it cancels workers) has nothing to fill."""
        return not self.query(OrderTable)

    def _show(self, data: QueueData) -> None:
        if self._taken_down():
            release_gradually(data.orders)
            return
        release_gradually(self.orders)  # the orders replaced, freed off the UI thread
        self.orders, self.holds, self.kinds = data.orders, data.holds, data.kinds
        self._now = data.now
        self._held_text = data.held_text
        self._leased = data.leased
        self._kind_counts = data.kind_counts
        self.loaded = data.complete
        table = self.query_one(OrderTable)
        table.set_data(data.table)
        if table.sort_pending:  # the sort changed while these rows were read
            self._sort_in_worker()
        self._update_tabs()
        self._update_selection()

    def tick(self) -> None:
        """A lease whose holder died expires without a write the change feed would see: its
        orders stop being held back once it has."""
        workspace = self.recon.workspace
        if workspace is not None and set(workspace.leased_merchants()) != self._leased:
            self.reload()

    def _update_tabs(self) -> None:
        counts = self._kind_counts
        workspace = self.recon.workspace
        names = workspace.merchant_names() if workspace is not None else {}
        title = names.get(self.merchant_id or "", "All merchants")
        tabs = safe(f"{title}   ")
        for key, (kind, label) in KINDS.items():
            # Counted once the whole queue is in; the first screenful's counts would mislead.
            count = f"{counts[kind] if kind else len(self.orders):,}" if self.loaded else "…"
            tabs.append(f" {key} {label} {count} ", style="reverse" if key == self.kind_key
                        else "")
            tabs.append("  ")
        tabs.append(f"sort: {self.sort_name}", style="dim")
        if self.query_one(OrderTable).sort_pending:
            tabs.append(" (sorting…)", style="dim")
        if not self.loaded:
            tabs.append("   loading…", style="dim")
        elif KINDS[self.kind_key][0] == "candidate" and not counts["candidate"]:
            tabs.append(f"\nNo candidates: {self.why_no_candidates()}", style="yellow")
        self.query_one("#tabs", Static).update(tabs)

    def why_no_candidates(self) -> str:
        """Why the Candidates tab is empty: what stops this merchant (or all), in order of
        what the operator can do about it."""
        workspace = self.recon.workspace
        if workspace is None:
            return "not loaded yet."
        merchants = [m for m in workspace.store.merchants()
                     if self.merchant_id in (None, m["merchant_id"])]
        errors = [m["discovery_error"] for m in merchants if m.get("discovery_error")]
        if errors and not self.orders:
            return f"Square could not be read: {errors[0]}"
        if not self.orders:
            return "Square reports no open orders (r refreshes)."
        if self.holds:
            summary = holds_summary(self.holds, {}, {})
            return (f"{plural(len(self.holds), 'eligible order')} held back: {summary}. "
                    "Press 2 to see them.")
        reasons = Counter(o.reason for o in self.orders.values() if o.reason)
        reason, count = reasons.most_common(1)[0]
        detail = next((o.detail for o in self.orders.values()
                       if o.reason == reason and o.detail), "")
        return (f"none of {plural(len(self.orders), 'open order')} is eligible; "
                f"{count:,} are {reason}" + (f" ({detail.rstrip('.')})" if detail else "") +
                ". Press 2 for Blocked.")

    def _update_selection(self) -> None:
        table = self.query_one(OrderTable)
        selected = table.selected
        if len(selected) > SELECTION_IN_WORKER:
            self._selection_money = None  # shown as "…" until the worker has added them up
            self._add_up_selection(tuple(selected))
        else:
            # A larger selection's totals still being added up would land over these.
            self.workers.cancel_group(self, "selection")
            self._selection_money = selection_totals(selected, self.orders, self.kinds)
        self._show_selection()

    @work(exclusive=True, group="selection", description="selection totals")
    async def _add_up_selection(self, selected: tuple[str, ...]) -> None:
        """Totals of a large selection, in a thread (exclusive: only the latest lands)."""
        self._selection_money = await asyncio.to_thread(selection_totals, selected,
                                                        self.orders, self.kinds)
        if not self._taken_down():
            self._show_selection()

    def _show_selection(self) -> None:
        table = self.query_one(OrderTable)
        selected = len(table.selected)
        shown = len(table.view)
        only = "  (selected only)" if table.selected_only else ""
        if self._selection_money is None:
            text = f"{selected:,} selected: adding up…   {shown:,} shown{only}"
        else:
            chosen, money = self._selection_money
            left_out = selected - chosen
            note = f", {left_out:,} cannot be completed now (left out)" if left_out else ""
            text = (f"{selected:,} selected: {plural(chosen, 'candidate')}"
                    f"{' ' + money if money else ''}{note}   {shown:,} shown{only}")
        self.query_one("#selection", Static).update(safe(text + self._held_text))

    # ------------------------------------------------------------------ events
    def on_order_table_highlighted(self, event: OrderTable.Highlighted) -> None:
        workspace = self.recon.workspace
        detail = self.query_one(OrderDetail)
        order = self.orders.get(event.key or "")
        if order is None or workspace is None:
            detail.show(None, None)
            return
        detail.show(order, workspace.store.order_json(order.order_id),
                    workspace.merchant_names().get(order.merchant_id, ""))

    def on_order_table_selection_changed(self, event: OrderTable.SelectionChanged) -> None:
        self._update_selection()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.query_one(OrderTable).apply_filter(event.value)
            self._update_selection()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.set_focus(self.query_one(OrderTable))

    # ------------------------------------------------------------------ actions
    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        # Focus now, not on the next tick (Widget.focus defers): keys typed right after `/`
        # must land in the filter, not trigger the screen's one-letter bindings.
        self.set_focus(field)

    def action_back(self) -> None:
        field = self.query_one("#filter", Input)
        if field.display and (field.has_focus or field.value):
            field.value = ""
            field.display = False
            self.query_one(OrderTable).apply_filter("")
            self.set_focus(self.query_one(OrderTable))
            return
        self.app.pop_screen()

    def action_kind(self, key: str) -> None:
        self.kind_key = key
        self.query_one(OrderTable).apply_kind(KINDS[key][0])
        self._update_tabs()
        self._update_selection()

    def action_select_all(self) -> None:
        self.query_one(OrderTable).select_all_matching()

    def action_invert(self) -> None:
        self.query_one(OrderTable).invert_selection()

    def action_clear(self) -> None:
        self.query_one(OrderTable).clear_selection()

    def action_selected_only(self) -> None:
        self.query_one(OrderTable).toggle_selected_only()
        self._update_selection()

    def action_sort(self) -> None:
        self.sort_name = SORTS[(SORTS.index(self.sort_name) + 1) % len(SORTS)]
        if self.merchant_id is not None and self.sort_name == "merchant":
            self.sort_name = SORTS[(SORTS.index(self.sort_name) + 1) % len(SORTS)]
        if self.query_one(OrderTable).request_sort(self._sort_index(),
                                                   reverse=self.sort_name == "total"):
            self._sort_in_worker()
        self._update_tabs()

    @work(exclusive=True, group="sort")
    async def _sort_in_worker(self) -> None:
        """A large queue is sorted in a thread; the rows keep their old order (and the
        selection, a set of keys, is untouched) until the new one lands. Again if the rows
        were swapped by a reload meanwhile; exclusive: only the latest sort lands."""
        table = self.query_one(OrderTable)
        while table.sort_pending:
            table.apply_sort(await asyncio.to_thread(table.prepare_sort, table.sort_column,
                                                     table.sort_reverse))
        if not self._taken_down():
            self._update_tabs()

    def action_complete(self) -> None:
        table = self.query_one(OrderTable)
        # The selection holds only keys of rows the table has (`set_data` keeps those): a
        # plain copy, as a filter over 70,000 keys cost the UI thread ~0.1 s. The preview
        # drops anything no longer in the queue, in its worker.
        chosen = list(table.selected.members)
        if not chosen:
            self.notify("Select orders first: space selects, a selects all matching.",
                        severity="warning")
            return
        self.post_message(CompleteRequested(chosen))

    def on_unmount(self) -> None:
        release_gradually(self.orders)  # a popped queue's orders, freed off the UI thread
        self.orders, self.kinds = {}, {}

    def palette_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Select all matching", "Select every order the filter shows",
                            self.action_select_all)
        yield SystemCommand("Invert selection", "Within the orders shown", self.action_invert)
        yield SystemCommand("Clear selection", "Select nothing", self.action_clear)
        yield SystemCommand("Show selected only", "Toggle", self.action_selected_only)
        if not self.recon.read_only:
            yield SystemCommand("Complete selected", "Preview, confirm, complete",
                                self.action_complete)
