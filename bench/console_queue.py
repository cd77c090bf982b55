"""The console with a 100,000-order queue (issue 11), under Pilot at 160x50, beside the same
measurement on `main` (a git worktree of it in a temporary folder) from the same run, and
optionally Textual's stock DataTable loading the same rows (`--stock`: tens of seconds).

    .venv/bin/python -m bench.console_queue [--orders 100000] [--runs 3] [--cycles 40]

Each side runs in a fresh process of its own on its own copy of one database (filled once),
so memory and caches start alike. Figures:

- first screenful: from pushing the queue screen until its table holds rows (the data is
  in the database already); all loaded: until it holds every order;
- filter: what the UI thread does for it, as the filter's handler does it; select all
  matching: from the action until the selection line shows the count, then its totals;
- sort (o, until the rows are in the new order; the selection kept);
- preview (c, until the confirmation is up) and the merchant overview (a reload of the
  merchants screen, until its rows are in);
- stall: the longest the event loop could not run, from a task that sleeps 5 ms in a loop
  on the app's own loop and records how late it wakes (the machine's own load shows in it);
- RSS (VmRSS) after the first and the last of `--cycles` opens and closes of one
  merchant's queue (a twentieth of the orders; the whole queue with --cycle-all);
- `recon-console demo` to its first screen in tmux, as a person sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._support import compile_bytecode, scratch_dir

ROOT = Path(__file__).resolve().parents[1]
SIZE = (160, 50)
NEEDLE = "ship"
MERCHANTS = 20


# ---------------------------------------------------------------------- data
def fill(db: Path, orders: int) -> None:
    """`orders` open orders over 20 merchants, 70 % eligible under an active consent."""
    import orjson

    from services.demo import consent_for
    from services.settings import ReconSettings
    from services.workspace import Workspace

    settings = ReconSettings(db=db, credentials=db.parent / "none.toml",
                             square_base_url="https://unused.invalid", operator="bench")
    workspace = Workspace.open(settings, credentials={})
    rng = random.Random(1)
    now = datetime.now(UTC)
    merchants = [f"M{i:03d}" for i in range(MERCHANTS)]
    documents = []
    for merchant_id in merchants:
        workspace.store.upsert_merchant({
            "merchant_id": merchant_id, "business_name": f"Merchant {merchant_id}",
            "timezone": "America/New_York", "token_health": "valid",
            "locations_json": orjson.dumps([{"id": f"L{merchant_id}", "name": "Main"}]).decode()})
        seeded = _Seeded(merchant_id)
        documents.append(consent_for(seeded, now,  # type: ignore[arg-type]
                                     consent_id=str(uuid.uuid5(uuid.NAMESPACE_URL, merchant_id))))
    consent_file = db.parent / "consents.json"
    consent_file.write_text(json.dumps(documents))
    workspace.import_consent_files([consent_file])
    consent_of = {d["merchant_id"]: d["consent_id"] for d in documents}
    rows: dict[str, list[dict[str, object]]] = {m: [] for m in merchants}
    for index in range(orders):
        merchant_id = merchants[index % len(merchants)]
        eligible = rng.random() < 0.7
        rows[merchant_id].append({
            "order_id": f"ORD{index:08d}XYZ", "merchant_id": merchant_id,
            "location_id": f"L{merchant_id}", "version": 2, "state": "OPEN",
            "source": "Square Online", "reference_id": str(100000000 + index),
            "total_amount": rng.randint(500, 50000), "currency": "USD", "due_amount": 0,
            "created_at": (now - timedelta(minutes=rng.randint(180, 40000))).isoformat()
            .replace("+00:00", "Z"), "updated_at": None, "eligible": int(eligible),
            "reason": None if eligible else rng.choice(["NOT_FULLY_PAID", "MANUAL_ONLY",
                                                        "REFUNDED"]),
            "detail": "", "consent_id": consent_of[merchant_id] if eligible else None,
            "fulfillments": rng.choice(["SHIPMENT:PROPOSED", "PICKUP:RESERVED",
                                        "DIGITAL:PREPARED"]),
            "order_json": "{}", "seen_at": now.isoformat()})
    for merchant_id, merchant_rows in rows.items():
        workspace.store.replace_orders(merchant_id, merchant_rows)
    workspace.store.close()


class _Seeded:
    """What `consent_for` reads of a seeded merchant."""

    def __init__(self, merchant_id: str) -> None:
        self.merchant = type("M", (), {"id": merchant_id,
                                       "business_name": f"Merchant {merchant_id}"})()


# ---------------------------------------------------------------------- one side, in-process
def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class LagMonitor:
    """The longest the event loop was kept from running: a task sleeps 5 ms in a loop and
    records how late it wakes (wall clock: what a person feels, on this machine's load), and
    how much CPU the UI thread spent meanwhile (what our code does there, whatever the load:
    a wait for other processes or for the GIL costs this thread no CPU)."""

    TICK = 0.005

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_cpu = 0.0
        self.longest_gc = 0.0  # the longest cyclic-GC pass in any thread (it holds the GIL)
        self.longest_gc_cpu = 0.0  # and the longest one's CPU (on a loaded machine, the cost)
        self._gc_start = self._gc_cpu_start = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start, self._gc_cpu_start = time.perf_counter(), time.thread_time()
        else:
            self.longest_gc = max(self.longest_gc, time.perf_counter() - self._gc_start)
            self.longest_gc_cpu = max(self.longest_gc_cpu,
                                      time.thread_time() - self._gc_cpu_start)

    def reset(self) -> None:
        self.longest = self.longest_cpu = self.longest_gc = self.longest_gc_cpu = 0.0

    async def run(self) -> None:
        while True:
            start, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.TICK)
            self.longest = max(self.longest, time.perf_counter() - start - self.TICK)
            self.longest_cpu = max(self.longest_cpu, time.thread_time() - cpu)


async def until(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("bench: condition not met in time")
        await asyncio.sleep(0.002)


async def probe(db: Path, orders: int, runs: int, cycles: int, cycle_all: bool
                ) -> dict[str, Any]:
    from textual.widgets import Static

    from console.app import ReconApp
    from console.screens.confirm import ConfirmScreen
    from console.screens.merchants import MerchantsScreen
    from console.screens.queue import QueueScreen
    from console.widgets.order_table import OrderTable
    from services.settings import ReconSettings
    from services.workspace import Workspace

    settings = ReconSettings(db=db, credentials=db.parent / "none.toml",
                             square_base_url="https://unused.invalid", operator="bench")
    workspace = Workspace.open(settings, credentials={})
    # As the CLI makes it (an older tree's console may not have the option).
    import inspect
    as_cli = {"freeze_heap_after_start": True} \
        if "freeze_heap_after_start" in inspect.signature(ReconApp).parameters else {}
    app = ReconApp(workspace, refresh_on_start=False, **as_cli)
    lag = LagMonitor()
    out: dict[str, Any] = {"firsts": [], "fulls": [], "load_stalls": [], "load_cpu": []}

    def loaded(screen: Any, count: int) -> Callable[[], bool]:
        table = screen.query_one(OrderTable)
        return lambda: len(table.rows) == count and getattr(screen, "loaded", True)

    def selection_text(screen: Any) -> str:
        return str(screen.query_one("#selection", Static).render())

    async with app.run_test(size=SIZE) as pilot:
        monitor = asyncio.create_task(lag.run())
        await until(lambda: isinstance(app.screen, MerchantsScreen) and bool(app.screen.rows))
        merchants = app.screen
        for attempt in range(runs):
            if attempt:
                app.pop_screen()
                await pilot.pause()
            lag.reset()
            start = time.perf_counter()
            await app.push_screen(QueueScreen(None))
            screen = app.screen
            table = screen.query_one(OrderTable)
            await until(lambda: len(table.view) > 0)  # noqa: B023
            out["firsts"].append(time.perf_counter() - start)
            await until(loaded(screen, orders))
            out["fulls"].append(time.perf_counter() - start)
            await pilot.pause()
            out["load_stalls"].append(lag.longest)
            out["load_cpu"].append(lag.longest_cpu)
            out.setdefault("load_gc", []).append(lag.longest_gc)
            out.setdefault("load_gc_cpu", []).append(lag.longest_gc_cpu)
        screen = app.screen
        table = screen.query_one(OrderTable)
        out["rows"] = len(table.rows)
        # Filter, as on_input_changed does it, in the All tab.
        screen.action_kind("4")
        await pilot.pause()
        lag.reset()
        start = time.perf_counter()
        table.apply_filter(NEEDLE)
        screen._update_selection()
        out["filter"] = time.perf_counter() - start
        await pilot.pause()
        out["filter_stall"] = lag.longest
        out["filter_cpu"] = lag.longest_cpu
        out["filter_gc"] = lag.longest_gc
        out["filter_gc_cpu"] = lag.longest_gc_cpu
        out["matching"] = len(table.view)
        table.apply_filter("")
        screen.action_kind("1")  # candidates: what a batch would send
        await pilot.pause()
        # Select all matching, as the key does it (the selection line follows on the
        # table's message): until the count is on the selection line, then its totals.
        lag.reset()
        start = time.perf_counter()
        screen.action_select_all()
        count = len(table.selected)
        await until(lambda: f"{count:,} selected: " in selection_text(screen))
        out["select_all"] = time.perf_counter() - start
        await until(lambda: "adding up" not in selection_text(screen))
        out["select_all_totals"] = time.perf_counter() - start
        await pilot.pause()
        out["select_all_stall"] = lag.longest
        out["select_all_cpu"] = lag.longest_cpu
        out["select_all_gc"] = lag.longest_gc
        out["select_all_gc_cpu"] = lag.longest_gc_cpu
        out["selected"] = count
        # Sort (o: by age -> by total) until the rows are in the new order; the selection
        # must be the same after it. On main the sort runs in the key's handler.
        lag.reset()
        start = time.perf_counter()
        screen.action_sort()
        await until(lambda: not getattr(table, "sort_pending", False))
        out["sort"] = time.perf_counter() - start
        await pilot.pause()
        out["sort_stall"] = lag.longest
        out["sort_cpu"] = lag.longest_cpu
        out["sort_gc"] = lag.longest_gc
        out["sort_gc_cpu"] = lag.longest_gc_cpu
        if len(table.selected) != count:
            raise SystemExit("bench: the sort lost the selection")
        # Preview: `c` until the confirmation is up.
        lag.reset()
        start = time.perf_counter()
        screen.action_complete()
        await until(lambda: isinstance(app.screen, ConfirmScreen))
        out["preview"] = time.perf_counter() - start
        await pilot.pause()
        out["preview_stall"] = lag.longest
        out["preview_cpu"] = lag.longest_cpu
        out["preview_gc"] = lag.longest_gc
        out["preview_gc_cpu"] = lag.longest_gc_cpu
        app.screen.dismiss(False)
        await pilot.pause()
        app.pop_screen()
        await pilot.pause()
        # The merchant overview: a reload of the merchants screen until its rows are in.
        lag.reset()
        start = time.perf_counter()
        merchants.rows = []
        merchants.reload()
        await until(lambda: bool(merchants.rows))
        out["overview"] = time.perf_counter() - start
        await pilot.pause()
        out["overview_stall"] = lag.longest
        out["overview_cpu"] = lag.longest_cpu
        out["overview_gc"] = lag.longest_gc
        out["overview_gc_cpu"] = lag.longest_gc_cpu
        # Memory over repeated opens and closes.
        merchant_id = None if cycle_all else "M000"
        per_cycle = orders if cycle_all else len(workspace.queue("M000", ordered=False))
        rss = []
        for _ in range(cycles):
            await app.push_screen(QueueScreen(merchant_id))
            await until(loaded(app.screen, per_cycle))
            app.pop_screen()
            await pilot.pause()
            rss.append(current_rss_mb())
        out["rss"] = rss
        out["cycle_orders"] = per_cycle
        monitor.cancel()
    out["gc_frozen"] = gc.get_freeze_count()
    return out


# ---------------------------------------------------------------------- stock DataTable
async def stock_first_screen(db: Path) -> dict[str, float]:
    """Textual's DataTable given the same rows (cells made as the queue makes them)."""
    from textual.app import App, ComposeResult
    from textual.widgets import DataTable

    from console.screens.queue import line_cells, make_row
    from services.settings import ReconSettings
    from services.workspace import Workspace

    settings = ReconSettings(db=db, credentials=db.parent / "none.toml",
                             square_base_url="https://unused.invalid", operator="bench")
    workspace = Workspace.open(settings, credentials={})

    class StockTableApp(App[None]):
        def compose(self) -> ComposeResult:
            yield DataTable()

    app = StockTableApp()
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(DataTable)
        table.add_columns("Ref", "Order", "Merchant", "Location", "Age", "Total", "Ful", "Reason")
        start = time.perf_counter()
        orders = workspace.queue()
        now = datetime.now(UTC)
        cells = [line_cells(make_row(o, o.merchant_id, "Main").payload, now, True)
                 for o in orders]
        table.add_rows(cells)
        await pilot.pause()
        load = time.perf_counter() - start
        start = time.perf_counter()
        table.clear()
        table.add_rows([c for c in cells if NEEDLE in " ".join(c).lower()])
        await pilot.pause()
        refilter = time.perf_counter() - start
    return {"load": load, "filter": refilter}


# ---------------------------------------------------------------------- demo in tmux
def demo_first_screen(tree: Path) -> tuple[float, float | None] | None:
    """Seconds from starting `recon-console demo` (of `tree`) in tmux to its merchants screen
    on display, and to its merchants listed (the refresh from the emulator done)."""
    if shutil.which("tmux") is None:
        return None
    # A tmux server of our own (-L): others' sessions on this machine are left alone, and
    # one session's end does not race the next one's start.
    tmux = ["tmux", "-L", f"bench{os.getpid()}-{time.monotonic_ns()}"]
    session = "demo"
    start = time.perf_counter()
    started = subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y",
                              "50", f"cd {tree} && PYTHONPATH={tree} {sys.executable} -m "
                              "console.cli demo"], capture_output=True, text=True)
    if started.returncode:
        print(f"bench: tmux did not start: {started.stderr.strip()}", file=sys.stderr)
        return None
    first = None
    try:
        while time.perf_counter() - start < 30:
            screen = subprocess.run([*tmux, "capture-pane", "-t", session, "-p"],
                                    capture_output=True, text=True).stdout
            if first is None and "Merchant" in screen and "Next sync" in screen:
                first = time.perf_counter() - start
            if first is not None and "Refreshed" in screen:
                return first, time.perf_counter() - start
            time.sleep(0.02)
        return (first, None) if first is not None else None
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True)


# ---------------------------------------------------------------------- driver
def run_side(tree: Path, db: Path, args: argparse.Namespace, stock: bool = False
             ) -> dict[str, Any]:
    """This file's probe in a fresh process, importing the console from `tree`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", str(db),
               "--orders", str(args.orders), "--runs", str(args.runs),
               "--cycles", str(args.cycles)]
    if args.cycle_all:
        command.append("--cycle-all")
    if stock:
        command.append("--stock-probe")
    done = subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench: the probe failed in {tree}:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main_worktree() -> Path:
    directory = scratch_dir("bench-console-main-")
    tree = directory / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), "main"],
                   check=True, capture_output=True)
    return tree


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(sides: list[tuple[str, dict[str, Any]]], stock: dict[str, float] | None,
           demo: list[tuple[str, list[tuple[float, float | None]]]],
           args: argparse.Namespace) -> None:
    """One line per figure: its target, each side's value, and main / this branch."""
    mine = sides[0][1]
    base = dict(sides).get("main")

    def pick(side: dict[str, Any], key: str) -> float:
        value = side.get(key, float("nan"))
        return median(value) if isinstance(value, list) else float(value)

    def row(name: str, target: str, key: str) -> None:
        cells = [ms(pick(side, key)) for _, side in sides]
        ratio = f"{pick(base, key) / pick(mine, key):,.1f}x" if base and pick(mine, key) \
            else "—"
        print(f"{name:<42} {target:>9} " + " ".join(f"{c:>11}" for c in cells) +
              f" {ratio:>9}")

    print(f"{mine['rows']:,} orders over {MERCHANTS} merchants, {SIZE[0]}x{SIZE[1]}, Pilot; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared)")
    print(f"{'figure':<42} {'target':>9} " + " ".join(f"{n:>11}" for n, _ in sides) +
          f" {'main/this':>9}")
    runs = f"median of {args.runs}"
    row(f"first screenful ({runs})", "<= 300 ms", "firsts")
    row(f"  all {mine['rows']:,} loaded ({runs})", "worker", "fulls")
    row("  longest stall while loading", "<= 50 ms", "load_stalls")
    row("    UI-thread CPU in that stall", "<= 50 ms", "load_cpu")
    row("    longest garbage collection", "", "load_gc")
    row("      CPU of the longest one", "", "load_gc_cpu")
    row(f"filter '{NEEDLE}' to {mine['matching']:,} rows", "<= 100 ms", "filter")
    row("  longest stall", "<= 50 ms", "filter_stall")
    row("    UI-thread CPU in that stall", "<= 50 ms", "filter_cpu")
    row("    longest garbage collection", "", "filter_gc")
    row("      CPU of the longest one", "", "filter_gc_cpu")
    row(f"select all {mine['selected']:,} matching", "<= 150 ms", "select_all")
    row("  until their totals are on screen", "", "select_all_totals")
    row("  longest stall", "<= 50 ms", "select_all_stall")
    row("    UI-thread CPU in that stall", "<= 50 ms", "select_all_cpu")
    row("    longest garbage collection", "", "select_all_gc")
    row("      CPU of the longest one", "", "select_all_gc_cpu")
    row(f"sort {mine['rows']:,} by total, {mine['selected']:,} selected", "worker", "sort")
    row("  longest stall", "<= 50 ms", "sort_stall")
    row("    UI-thread CPU in that stall", "<= 50 ms", "sort_cpu")
    row("    longest garbage collection", "", "sort_gc")
    row("      CPU of the longest one", "", "sort_gc_cpu")
    row(f"preview of {mine['selected']:,}: c to confirmation", "worker", "preview")
    row("  longest stall", "<= 50 ms", "preview_stall")
    row("    UI-thread CPU in that stall", "<= 50 ms", "preview_cpu")
    row("    longest garbage collection", "", "preview_gc")
    row("      CPU of the longest one", "", "preview_gc_cpu")
    row("merchant overview: reload until rows", "worker", "overview")
    row("  longest stall", "<= 50 ms", "overview_stall")
    row("    UI-thread CPU in that stall", "<= 50 ms", "overview_cpu")
    row("    longest garbage collection", "", "overview_gc")
    row("      CPU of the longest one", "", "overview_gc_cpu")
    for label, side in sides:
        rss = side["rss"]
        growth = (rss[-1] - rss[0]) / rss[0] * 100
        print(f"RSS, {label}, over {len(rss)} opens/closes of a {side['cycle_orders']:,}-order "
              f"queue: first {rss[0]:.0f} MB, last {rss[-1]:.0f} MB ({growth:+.1f} %; target "
              f"within 10 %); objects frozen by gc.freeze: {side['gc_frozen']:,}")
    for label, times in demo:
        if not times:
            print(f"`recon-console demo`, {label}: not measured (needs tmux)")
            continue
        firsts = [t[0] for t in times]
        listed = [t[1] for t in times if t[1] is not None]
        print(f"`recon-console demo` in tmux, {label}: first screen median "
              f"{median(firsts):.2f} s of [{', '.join(f'{t:.2f}' for t in firsts)}] "
              f"(target <= 1 s); merchants listed median "
              f"{median(listed) if listed else float('nan'):.2f} s")
    if stock:
        print(f"Textual's stock DataTable, same rows: load {ms(stock['load'])} "
              f"({stock['load'] / median(mine['firsts']):,.0f}x our first screenful), "
              f"re-filter {ms(stock['filter'])} "
              f"({stock['filter'] / mine['filter']:,.0f}x our filter)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--cycle-all", action="store_true",
                        help="open and close the whole queue, not one merchant's")
    parser.add_argument("--no-main", action="store_true", help="skip the baseline on main")
    parser.add_argument("--stock", action="store_true",
                        help="also load the rows into Textual's stock DataTable (slow)")
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stock-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:  # one side, in this process (run by run_side)
        sys.path.insert(0, os.getcwd())
        if args.stock_probe:
            result: dict[str, Any] = asyncio.run(stock_first_screen(args.probe))
        else:
            result = asyncio.run(probe(args.probe, args.orders, args.runs, args.cycles,
                                       args.cycle_all))
        print(json.dumps(result))
        return
    directory = scratch_dir("bench-console-")
    try:
        measure(directory, args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def measure(directory: Path, args: argparse.Namespace) -> None:
    compile_bytecode()
    fill(directory / "seed.db", args.orders)
    dbs = {}
    for side in ("mine", "main", "stock"):
        (directory / side).mkdir()
        shutil.copy(directory / "seed.db", directory / side / "recon.db")
        dbs[side] = directory / side / "recon.db"
    sides = [("this branch", run_side(ROOT, dbs["mine"], args))]
    tree = None if args.no_main else main_worktree()
    demo: list[tuple[str, list[tuple[float, float | None]]]] = []
    try:
        if tree is not None:
            sides.append(("main", run_side(tree, dbs["main"], args)))
        if not args.no_demo:
            for label, where in (("this branch", ROOT), ("main", tree)):
                if where is not None:
                    demo.append((label, [d for d in (demo_first_screen(where)
                                                     for _ in range(3)) if d is not None]))
    finally:
        if tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)
            shutil.rmtree(tree.parent, ignore_errors=True)
    stock = None
    if args.stock:
        shutil.copy(directory / "seed.db", dbs["stock"])
        stock = run_side(ROOT, dbs["stock"], args, stock=True)
    report(sides, stock, demo, args)


if __name__ == "__main__":
    main()
