"""Third-party text (merchant, location and line item names, notes, recipients, sources,
reference ids, consent fields, audit details) never becomes markup, a terminal escape or a
spreadsheet formula: on every screen, in every CLI command and in both export formats.

The corpus is tests/data/hostile_strings.txt."""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
import unicodedata
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from console.app import ReconApp
from console.safe_text import SafeText, clip, safe, safe_join
from console.screens.audit import AuditScreen
from console.screens.confirm import ConfirmScreen
from console.screens.help import HelpScreen
from console.screens.progress import ProgressScreen
from console.screens.queue import QueueScreen
from console.screens.reminders import RemindersScreen
from console.widgets.order_detail import OrderDetail
from console.widgets.order_table import OrderTable
from services.audit import AuditTrail
from services.demo import DemoEnvironment, consent_for
from services.emulator.state import NONCE_OK
from services.reminders.message import plain_text
from services.store import Store
from services.text_safety import FORMULA_PREFIXES, csv_cell, json_line, printable
from tests.console_harness import (
    DISMISS,
    FROZEN,
    app_for,
    demo,
    hostile_names,
    hostile_strings,
    merchants_loaded,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = hostile_strings()
SIZE = (160, 45)
# What must never reach a terminal: C0/C1 controls, DEL, bidi embeddings/overrides/isolates.
FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


# ---------------------------------------------------------------------- the pure functions
def test_the_corpus_has_every_kind_of_attack() -> None:
    text = "".join(HOSTILE)
    for needle in ("[/]", "[@click=", "\x1b[2J", "\x1b]8;;", "\x1b]52;", "\x1b[8m", "\x9b",
                   "\u202e", "\u2066", "\u200d", "=HYPERLINK(", "@SUM(", "+1-2"):
        assert needle in text, needle
    assert max(len(s) for s in HOSTILE) >= 10_000


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_printable_shows_controls_and_bidi_as_placeholders(hostile: str) -> None:
    shown = printable(hostile)
    assert not FORBIDDEN.search(shown)
    assert not any(unicodedata.category(c) == "Cc" for c in shown)
    assert printable(shown) == shown  # idempotent: safe twice is the same text
    # Nothing else changes: without the placeholders, it is the text without the controls.
    placeholders = re.compile(r"<U\+[0-9A-F]{4}>|[\u2400-\u2421]")
    assert placeholders.sub("", shown) == FORBIDDEN.sub("", hostile)


def test_printable_placeholders() -> None:
    assert printable("a\x1b[2Jb") == "a␛[2Jb"
    assert printable("\x07\x7f\n\t") == "␇␡␊␉"
    assert printable("C1\x9b") == "C1<U+009B>"
    assert printable("x\u202ey") == "x<U+202E>y"
    assert printable("\u2066a\u2069") == "<U+2066>a<U+2069>"
    assert printable("Fam\u200dily") == "Fam\u200dily"  # joiners are writing, not control
    assert printable("plain [b]text[/b]") == "plain [b]text[/b]"


def test_csv_cell_follows_owasp() -> None:
    for formula in ("=1+1", "+1-2", "-2+3", "@SUM(A1)", "\t=1", "\r=1"):
        assert csv_cell(formula).startswith("'"), formula
    assert csv_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert csv_cell("\t=1") == "'␉=1"
    assert csv_cell("Blue Fern Bakery") == "Blue Fern Bakery"
    # Money and other numbers stay numeric, negative ones too.
    assert csv_cell(-1500) == -1500 and csv_cell(250) == 250 and csv_cell(None) is None


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_json_line_round_trips_exactly_and_is_inert(hostile: str) -> None:
    document = {"detail": hostile, "amount": -5, "nested": [hostile]}
    line = json_line(document)
    assert json.loads(line) == document
    assert "\n" not in line and not FORBIDDEN.search(line)


def test_safe_text_is_never_markup() -> None:
    text = safe_join(("[@click=app.quit]x[/]", "bold"), " \x1b[2J")
    assert text.plain == "[@click=app.quit]x[/] ␛[2J"
    assert not any("@click" in str(span.style) for span in text.spans)
    assert safe("a\nb").plain == "a␊b"  # one value, one line
    assert SafeText("ours\n").plain == "ours\n"  # the code's own line breaks stay
    appended = SafeText()
    appended.append("\x1b]52;c;eA==\x07")
    assert appended.plain == "␛]52;c;eA==␇"
    assert clip("N" * 50, 10) == "N" * 9 + "…"


# ---------------------------------------------------------------------- tripwires
def _console_sources() -> list[Path]:
    return sorted((ROOT / "console").rglob("*.py"))


def test_no_markup_built_with_interpolated_values() -> None:
    """The project's tripwire (shared/hooks/before-stop): an f-string with markup tags and
    interpolated values."""
    pattern = re.compile(r"""f["'][^"']*\[(/|b|i|u|bold|dim|italic|reverse|link|@click|red|"""
                         r"""green|yellow|blue|magenta|cyan|\$)[^]]*\][^"']*\{""")
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for path in _console_sources()
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line) and "escape(" not in line]
    assert not hits, hits


# Calls whose positional arguments Textual or Rich render (a str there is parsed as markup).
_SINKS = {"Static", "Label", "update", "update_cell", "add_row", "add_rows", "add_column",
          "add_columns", "Table", "print", "panic"}
# Group() holds renderables that are checked where they are built. printable() (and clip(),
# which uses it) give a str: right for the built-in print(), but markup anywhere else.
_SAFE_BUILDERS = {"safe", "safe_join", "SafeText", "Group"}
_PRINT_BUILDERS = {"printable", "clip"}


def _unsafe_argument(node: ast.expr, sink: str) -> bool:
    """An argument that may carry outside text in a form that is not SafeText: an f-string
    with values, a concatenation or %-format, an attribute or item (a field of something), or
    a call other than the SafeText builders (str(), join(), format_money()...)."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.IfExp):
        return _unsafe_argument(node.body, sink) or _unsafe_argument(node.orelse, sink)
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_unsafe_argument(element, sink) for element in node.elts)
    if isinstance(node, (ast.BinOp, ast.Attribute, ast.Subscript)):
        return True
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else (
            node.func.attr if isinstance(node.func, ast.Attribute) else "")
        return not (name in _SAFE_BUILDERS or (sink == "print" and name in _PRINT_BUILDERS))
    return False


def test_console_shows_text_only_through_safe_text() -> None:
    """Every widget, table and print in console/ gets literals, variables or SafeText; and
    nothing but console/safe_text.py builds Rich Text or markup itself."""
    problems = []
    for path in _console_sources():
        if path.name == "safe_text.py":
            continue
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in (
                    "rich.text", "rich.markup", "textual.content", "textual.markup"):
                problems.append(f"{where}:{node.lineno}: imports {node.module}")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            if name not in _SINKS:
                continue
            # update_cell(row_key, column_key, value): the keys are never shown.
            for argument in node.args[2:] if name == "update_cell" else node.args:
                if isinstance(argument, ast.Starred):
                    argument = argument.value
                if _unsafe_argument(argument, name):
                    problems.append(f"{where}:{node.lineno}: {name}({ast.unparse(argument)})")
    assert not problems, problems


# ---------------------------------------------------------------------- console
def hostile_environment(directory: Path) -> tuple[DemoEnvironment, list[str]]:
    """The demo, with every merchant and location named from the corpus, and orders created
    through the emulator's CreateOrder endpoint with the corpus in every text field (cut to
    Square's limits), and audit details from it."""
    environment = demo(directory)
    names = hostile_names(environment)
    square = environment.emulator.square
    merchant = environment.merchants[0]
    location = merchant.locations[0].id
    client = TestClient(environment.emulator.asgi(), base_url="http://emulator.test")
    headers = {"Authorization": f"Bearer {merchant.token.token}"}
    serving_clock = square.clock
    square.clock = lambda: FROZEN - timedelta(days=1)  # old enough to be a candidate
    try:
        for index, text in enumerate(HOSTILE):
            for source in ("Square Online", text or "x"):
                pickup = {"recipient": {"display_name": text[:255]}, "note": text[:500]}
                order = {"location_id": location, "reference_id": text[:40],
                         "source": {"name": source},
                         "line_items": [{"name": text[:512], "quantity": "1",
                                         "base_price_money": {"amount": 100 + index,
                                                              "currency": "USD"}}],
                         "fulfillments": [{"type": "PICKUP", "state": "PROPOSED",
                                           "pickup_details": pickup}]}
                created = client.post("/v2/orders", headers=headers, json={
                    "idempotency_key": str(uuid.uuid4()), "order": order})
                assert created.status_code == 200, created.text
                body = created.json()["order"]
                paid = client.post("/v2/payments", headers=headers, json={
                    "idempotency_key": str(uuid.uuid4()), "source_id": NONCE_OK,
                    "order_id": body["id"], "autocomplete": True,
                    "amount_money": body["total_money"]})
                assert paid.status_code == 200, paid.text
    finally:
        square.clock = serving_clock
    audit = environment.workspace.audit
    for text in HOSTILE:
        audit.append(action="outcome", operator="ops", merchant_id=merchant.merchant.id,
                     order_id=text[:30],
                     outcome="failed", detail=text, square_code=text[:20])
    return environment, names


def screen_text(app: ReconApp) -> str:
    """Everything on the terminal now (the screen's layers, toasts included)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def assert_inert(app: ReconApp) -> str:
    assert app.is_running and app.return_code is None
    text = screen_text(app)
    found = FORBIDDEN.search(text.replace("\n", ""))  # lines are joined with \n here
    assert not found, repr(found)
    return text


def cells(table: DataTable[Any]) -> list[list[str]]:
    rows = []
    for index in range(table.row_count):
        row = table.get_row_at(index)
        assert all(isinstance(cell, SafeText) for cell in row)
        rows.append([cell.plain for cell in row])
    return rows


def group_text(detail: OrderDetail) -> str:
    parts = detail.content.renderables  # type: ignore[union-attr]
    plain = []
    for part in parts:
        if isinstance(part, SafeText):
            plain.append(part.plain)
        else:  # a Rich Table: its cells
            for column in part.columns:
                for cell in column.cells:
                    assert isinstance(cell, SafeText)
                    plain.append(cell.plain)
    return "\n".join(plain)


async def test_every_screen_shows_hostile_text_literally(tmp_path: Path) -> None:
    environment, names = hostile_environment(tmp_path)
    app = app_for(environment)
    m0 = environment.merchants[0].merchant.id
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        # Merchants: each name literally, in its own cell.
        text = assert_inert(app)
        shown = {row[0] for row in cells(app.screen.query_one("#merchants", DataTable))}
        # (Two demo merchants' tokens are expired or revoked: their ids stand for names.)
        expected = {clip(name, 40) for name in names}
        assert len(shown & expected) == len(expected) - 2
        for name in shown & expected:
            assert name[:12] in text
        await pilot.press("n")  # the reminder list (the reminders screen does not exist yet)
        assert_inert(app)
        await pilot.press("n")

        # One merchant's queue, every tab; the detail of every hostile order.
        await app.push_screen(QueueScreen(m0))
        await pilot.pause()
        for tab in ("2", "1", "4"):
            await pilot.press(tab)
            assert_inert(app)
        assert DISMISS in str(app.screen.query_one("#tabs", Static).content)
        table = app.screen.query_one(OrderTable)
        table.apply_filter("")
        hostile_orders = [key for key in (table.rows[i].key for i in table.view)
                          if any(printable(s[:40]) == (app.screen.orders[key].reference_id or "")
                                 or s[:40] == app.screen.orders[key].reference_id
                                 for s in HOSTILE)]
        assert len(hostile_orders) >= 2 * len(HOSTILE) - 2
        seen_items = set()
        for key in hostile_orders:
            table.cursor = table.view.index(table.index[key])
            table.post_message(OrderTable.Highlighted(key))
            await pilot.pause()
            text = assert_inert(app)
            detail = group_text(app.screen.query_one(OrderDetail))
            document = environment.workspace.store.order_json(key) or {}
            for item in document.get("line_items", []):
                assert printable(item["name"]) in detail
                seen_items.add(item["name"])
            assert safe(names[0]).plain in detail
        assert len(seen_items) == len(HOSTILE)
        # The queue's own rows: reference ids and location names, shown as placeholders.
        for y in range(1, 20):
            assert not FORBIDDEN.search(table.render_line(y).text)

        # All merchants' queue (merchant and location columns).
        app.pop_screen()
        await pilot.pause()
        await pilot.press("Q")
        await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
        await pilot.press("4")
        assert_inert(app)
        app.pop_screen()

        # Confirmation, then progress and results, with the hostile merchant name.
        await app.push_screen(QueueScreen(m0))
        await pilot.pause()
        await pilot.press("1", "a", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        confirm_text = app.screen.query_one("#confirm-text", Static).content
        assert isinstance(confirm_text, SafeText)
        assert f"  {DISMISS}: " in confirm_text.plain
        assert_inert(app)
        screen = app.screen
        assert isinstance(screen, ConfirmScreen)
        await pilot.press(*str(screen.preview.count), "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ProgressScreen)
                         and app.screen.finished)
        results = cells(app.screen.query_one("#results", DataTable))
        assert results and {row[0] for row in results} == {clip(DISMISS, 21)[:20]}
        assert_inert(app)
        await pilot.press("escape")

        # Audit: hostile details, order ids and codes.
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        entries = cells(app.screen.query_one("#entries", DataTable))
        details = {row[8] for row in entries}
        for hostile in HOSTILE:
            assert printable(hostile[:48]) in details
        assert_inert(app)
        await pilot.press("escape")

        # Reminders: every merchant with waiting orders and no usable consent, by name.
        await pilot.press("M")
        await wait_until(pilot, lambda: isinstance(app.screen, RemindersScreen))
        await wait_until(pilot, lambda: app.screen.query_one("#reminders", DataTable).row_count
                         > 0)
        reminder_rows = cells(app.screen.query_one("#reminders", DataTable))
        assert {row[1] for row in reminder_rows} & {plain_text(n[:24], 400) for n in names}
        assert_inert(app)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, RemindersScreen))

        # Help, and a toast carrying hostile text.
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert_inert(app)
        await pilot.press("escape")
        for hostile in HOSTILE[:7]:
            app.notify(hostile)
        await wait_until(pilot, lambda: "Quit me" in screen_text(app))
        text = assert_inert(app)
        assert "[@click=app.quit]Quit me[/]" in text
        # Clicking the hostile names does nothing: the app is still here.
        while len(app.screen_stack) > 2:
            app.pop_screen()
        await wait_until(pilot, lambda: app.screen.query("#merchants").first() is not None)
        await pilot.click("#merchants", offset=(3, 1))
        await pilot.click("#merchants", offset=(3, 2))
        assert_inert(app)
    assert app.return_code in (None, 0)


async def test_clicking_every_cell_of_the_confirmation_approves_nothing(tmp_path: Path
                                                                         ) -> None:
    """The attack: a merchant named `[@click=screen.dismiss(True)]x[/]` turned its name in the
    dialog into a button that approved the whole batch without the typed count."""
    environment = demo(tmp_path)
    merchant = environment.merchants[0].merchant.id
    square = environment.emulator.square
    square.merchants[merchant].business_name = DISMISS  # only this one: the attack alone
    app = app_for(environment)
    before = {record.id: record.state for record in square.orders_by_merchant[merchant]}
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await app.push_screen(QueueScreen(merchant))
        await pilot.pause()
        await pilot.press("a", "c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        dialog = app.screen
        assert isinstance(dialog, ConfirmScreen) and dialog.typed and dialog.preview.count > 10
        assert DISMISS in str(dialog.query_one("#confirm-text", Static).content)
        # Nothing in the dialog can take focus but the input.
        focusable = [w for w in dialog.query("*") if w.focusable]
        assert [w.id for w in focusable] == ["confirm-input"]
        region = dialog.query_one("#confirm-box").region
        clicks = 0
        for y in range(region.y, region.bottom):
            for x in range(region.x, region.right):
                await click_cell(pilot, x, y)
                clicks += 1
                assert app.screen is dialog, f"the click at {x},{y} left the dialog"
        assert clicks >= region.width * region.height > 100
        await pilot.pause()
        assert app.screen is dialog
        assert not list(environment.workspace.audit.entries(action="intent"))
    after = {record.id: record.state for record in square.orders_by_merchant[merchant]}
    assert after == before  # nothing was completed
    assert not any(isinstance(s, ProgressScreen) for s in app.screen_stack)


async def click_cell(pilot: Pilot[Any], x: int, y: int) -> None:
    """What `pilot.click(offset=(x, y))` sends (mouse down, up, click at one cell), without
    its three waits for an idle CPU per click: a dialog has a thousand cells."""
    from textual.events import Click, MouseDown, MouseUp
    from textual.geometry import Offset
    from textual.pilot import _get_mouse_message_arguments

    app = pilot.app
    screen = app.screen
    arguments = _get_mouse_message_arguments(screen, (x, y), button=1)
    app.mouse_position = Offset(x, y)
    for event in (MouseDown(**arguments), MouseUp(**arguments), Click(**arguments, chain=1)):
        screen._forward_event(event)
    await pilot._wait_for_screen()


async def test_export_paths_that_cannot_be_written_are_a_message(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    (tmp_path / "reminders.csv").mkdir()  # cannot be opened as a file
    stamp = FROZEN.strftime("%Y%m%dT%H%M%S")
    (tmp_path / f"audit-{stamp}.csv").mkdir()
    app = app_for(environment)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("e")
        await wait_until(pilot, lambda: "Reminder list not written" in app.status)
        assert "reminders.csv" in str(app.screen.query_one("#status", Static).content)
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        await pilot.press("E")
        await wait_until(pilot, lambda: "Audit export not written" in app.status)
        assert app.is_running and app.return_code is None


async def test_reminder_export_cells_are_not_formulas(tmp_path: Path) -> None:
    environment = demo(tmp_path)
    formulas = [s for s in HOSTILE if s.startswith(FORMULA_PREFIXES)]
    square = environment.emulator.square
    for index, seeded in enumerate(environment.merchants):
        square.merchants[seeded.merchant.id].business_name = formulas[index % len(formulas)]
    app = app_for(environment)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("e")
        await wait_until(pilot, lambda: (tmp_path / "reminders.csv").exists())
    rows = list(csv.reader((tmp_path / "reminders.csv").open(newline="")))
    assert rows[0] == ["merchant_id", "business_name", "consent_status", "orders_waiting"]
    assert len(rows) > 2
    for row in rows[1:]:
        assert row[1] in {csv_cell(name) for name in formulas}
        assert row[1].startswith("'")
        assert row[3].isdigit()  # a count stays a number


async def test_a_crash_exits_non_zero_with_one_line_and_a_private_scrubbed_log(
        tmp_path: Path, private_state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environment = demo(tmp_path)
    token = environment.merchants[0].token.token
    app = app_for(environment)

    def explode() -> None:
        secret_in_a_local = token  # noqa: F841 - Textual's own traceback would print it
        raise RuntimeError(f"boom while using {token}")

    with pytest.raises(RuntimeError):  # Pilot re-raises what stopped the app
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, merchants_loaded(app))
            monkeypatch.setattr(app.screen, "action_toggle_reminders", explode)
            await pilot.press("n")
            await pilot.pause()
    from console.app import exit_code
    assert exit_code(app) == 1
    logs = list((private_state_dir / "recon-console").glob("crash-*.log"))
    assert len(logs) == 1
    log = logs[0]
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    content = log.read_text()
    assert "RuntimeError" in content and "explode" in content and token not in content
    assert "[REDACTED]" in content and "secret_in_a_local" not in content  # no locals
    message = app.crash_message or ""
    assert "\n" not in message and str(log) in message and token not in message
    assert message.startswith("recon-console stopped on an unexpected RuntimeError")


# ---------------------------------------------------------------------- command line
def run_cli(arguments: list[str], environment: dict[str, str], terminal: bool
            ) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **environment, "COLUMNS": "250"}  # wide enough to read cells whole
    if terminal:
        env.update(FORCE_COLOR="1", TTY_COMPATIBLE="1")
    else:
        env.pop("FORCE_COLOR", None)
        env["NO_COLOR"] = "1"
    env["PYTHONPATH"] = str(ROOT)  # this tree's code, whichever checkout it is
    return subprocess.run([sys.executable, "-m", "console.cli", *arguments],
                          env=env, capture_output=True, timeout=120, check=False)


_SGR = re.compile(rb"\x1b\[[0-9;]*m")


def assert_cli_inert(output: bytes) -> str:
    """No escape of the corpus's: Rich's own colour codes (SGR, not 8 = conceal) aside, no
    ESC, C0 (but newline), C1 or bidi control reaches the terminal."""
    for code in _SGR.findall(output):
        assert code not in (b"\x1b[8m",) and b";8m" not in code and b"[8;" not in code
    text = _SGR.sub(b"", output).decode()
    checked, rows = text, text.splitlines()
    if rows and "\t" in rows[0] and all(r.count("\t") == rows[0].count("\t") for r in rows):
        # `--format tsv` (the default off a terminal): tabs separate its cells; a tab inside
        # a value would change its row's count and not be dropped here.
        checked = text.replace("\t", "")
    lines = checked.replace("\r\n", "").replace("\n", "")  # line ends (CSV's are CRLF)
    assert not FORBIDDEN.search(lines), repr(FORBIDDEN.search(lines))
    return text


@pytest.mark.loopback
@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_cli_output_is_inert_and_literal(tmp_path: Path, terminal: bool) -> None:
    from services.demo import write_demo_files
    from services.emulator import SeedConfig
    from tests.conftest import LoopbackServer, make_emulator

    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=3))
    square = emulator.square
    merchant = emulator.merchants[0]
    square.merchants[merchant.merchant.id].business_name = DISMISS
    client = TestClient(emulator.app.asgi(), base_url="http://emulator.test")
    headers = {"Authorization": f"Bearer {merchant.token.token}"}
    location = merchant.locations[0]
    location.name = HOSTILE[6]
    serving_clock = square.clock
    now = serving_clock()
    square.clock = lambda: now - timedelta(days=1)
    try:
        for index, text in enumerate(HOSTILE):
            order = {"location_id": location.id, "reference_id": text[:40],
                     "source": {"name": "Square Online"},
                     "line_items": [{"name": text[:512], "quantity": "1",
                                     "base_price_money": {"amount": 100 + index,
                                                          "currency": location.currency}}]}
            created = client.post("/v2/orders", headers=headers, json={
                "idempotency_key": str(uuid.uuid4()), "order": order})
            assert created.status_code == 200, created.text
            body = created.json()["order"]
            assert client.post("/v2/payments", headers=headers, json={
                "idempotency_key": str(uuid.uuid4()), "source_id": NONCE_OK,
                "order_id": body["id"], "autocomplete": True,
                "amount_money": body["total_money"]}).status_code == 200
    finally:
        square.clock = serving_clock
    write_demo_files(tmp_path, emulator.merchants)
    hostile_consent = consent_for(emulator.merchants[1], now, consent_id=str(uuid.uuid4()))
    hostile_consent["grantor"]["name"] = HOSTILE[4][:200]
    hostile_consent["evidence"]["reference"] = HOSTILE[10][:500]
    (tmp_path / "hostile-consent.json").write_text(json.dumps(hostile_consent))
    with LoopbackServer(emulator) as server:
        environment = {"RECON_DB": str(tmp_path / "recon.db"),
                       "RECON_CREDENTIALS": str(tmp_path / "credentials.toml"),
                       "RECON_SQUARE_BASE_URL": server.base_url,
                       "RECON_OPERATOR": "ops", "XDG_STATE_HOME": str(tmp_path / "state")}

        styled = []

        def cli(*arguments: str, code: int = 0) -> tuple[str, str]:
            result = run_cli(list(arguments), environment, terminal)
            assert result.returncode == code, result.stderr.decode()
            styled.append(b"\x1b[" in result.stdout)
            return assert_cli_inert(result.stdout), assert_cli_inert(result.stderr)

        cli("consent", "import", str(tmp_path / "consents.json"),
            str(tmp_path / "hostile-consent.json"))
        store = Store(tmp_path / "recon.db")
        try:
            trail = AuditTrail(store)
            for index, text in enumerate(HOSTILE):
                trail.append(action="outcome", operator="ops", merchant_id=merchant.merchant.id,
                             order_id=text[:30], outcome="failed", detail=text,
                             amount=-500 if index % 2 else 1500, currency="USD")
        finally:
            store.close()
        out, _ = cli("consent", "list")
        assert printable(HOSTILE[4]) in out.replace("\n", "")  # the grantor, literally
        listed = json.loads(cli("consent", "list", "--json")[0])
        assert HOSTILE[4] in {c["grantor"] for c in listed["consents"]}
        out, err = cli("queue", "--include-ineligible")
        assert styled[-1] == terminal  # on a terminal Rich styles the table itself
        assert "[@click=" in out and "␛[2J" in out.replace("\n", "")
        out, err = cli("complete", "--merchant", merchant.merchant.id, "--dry-run")
        assert f"{DISMISS} ({merchant.merchant.id})" in err
        out, err = cli("complete", "--merchant", merchant.merchant.id, "--yes")
        assert "completed" in err
        cli("recover")
        cli("audit", "verify")
        for fmt in ("csv", "jsonl"):
            out, _ = cli("audit", "export", "--format", fmt)
            assert out
        # The exports in files: JSON Lines exact, CSV cells never formulas.
        cli("audit", "export", "--format", "jsonl", "--output", str(tmp_path / "a.jsonl"))
        cli("audit", "export", "--format", "csv", "--output", str(tmp_path / "a.csv"))
    records = [json.loads(line) for line in
               (tmp_path / "a.jsonl").read_text().splitlines()]
    raw = (tmp_path / "a.jsonl").read_bytes()
    assert not FORBIDDEN.search(raw.decode().replace("\n", ""))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "a.csv").read_text())))
    assert len(rows) == len(records)
    for record, row in zip(records, rows, strict=True):
        for field, value in record.items():
            if isinstance(value, str):
                assert row[field] == csv_cell(value)
                assert not row[field].startswith(("=", "+", "-", "@", "\t", "\r"))
            elif value is not None:
                assert row[field] == str(value)  # numbers stay numbers (amounts unprefixed)
    assert {r["detail"] for r in records} >= set(HOSTILE)  # exactly as written
    assert {-500, 1500} <= {r["amount"] for r in records}
