"""Issue 14, leases and presence on SQLite: who is online, who works on which merchant, and
another process's changes (orders completed, a consent revoked, a lease taken) reaching an
open console within 2 s without a refresh."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from console.app import ReconApp
from console.output import EXIT_REFUSED
from console.screens.approvals import ApprovalsScreen
from console.screens.merchants import MerchantsScreen
from console.screens.queue import QueueScreen
from services.changes import PolledChangeFeed
from services.completion.leases import LeaseKeeper
from services.emulator import FaultPlan, SeedConfig
from services.presence import Presence, online
from services.settings import ReconSettings
from services.store import Store, now_utc
from services.workspace import Workspace
from tests.conftest import LoopbackServer, make_emulator
from tests.console_harness import DISMISS, app_for, demo, merchants_loaded, wait_until
from tests.crash_harness import ROOT, cli_workdir, start_cli
from tests.heartbeat_support import hold_beats

LIVE_S = 2.0  # the bound: another console shows a change within 2 s


async def within(pilot: Pilot[object], seconds: float, condition: Callable[[], bool],
                 what: str, since: float | None = None) -> float:
    """Await `condition` on the wall clock (never a fixed sleep); the seconds it took from
    `since` (default: now). Fails when it is not met within `seconds`."""
    began = time.monotonic() if since is None else since
    while not condition():
        if time.monotonic() - began > seconds:
            raise AssertionError(f"{what}: not shown within {seconds} s")
        await pilot.pause(0.02)
    print(f"{what}: shown after {time.monotonic() - began:.2f} s")
    return time.monotonic() - began


async def committed(pilot: Pilot[object], db: Path, sql: str, params: list[object],
                    process: subprocess.Popen[str], timeout: float = 90.0) -> float:
    """Wait until a connection of the test's own reads a true `sql` from the database (what
    the other process committed); the monotonic time then. The console keeps running."""
    deadline = time.monotonic() + timeout
    while not read_value(db, sql, params):
        if process.poll() is not None and process.returncode != 0:
            raise AssertionError(process.communicate()[1])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"never committed: {sql}")
        await pilot.pause(0.01)
    return time.monotonic()


async def finished(pilot: Pilot[object], process: subprocess.Popen[str], code: int = 0
                   ) -> None:
    while process.poll() is None:
        await pilot.pause(0.02)
    _, err = process.communicate()
    assert process.returncode == code, err


def note_of(app: ReconApp, merchant_id: str, column: int = -1) -> str:
    screen = app.screen
    if not isinstance(screen, MerchantsScreen):
        return ""
    try:
        return str(screen.query_one("#merchants", DataTable).get_row(merchant_id)[column])
    except Exception:
        return ""


def presence_line(app: ReconApp) -> str:
    try:
        return str(app.screen.query_one("#presence", Static).render())
    except Exception:
        return ""


def read_value(db: Path, sql: str, params: list[object]) -> object:
    """Read with a connection of its own, as a third party would."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute(sql, params).fetchone()
        return row[0] if row else None
    finally:
        conn.close()


BOB_LEASED = "SELECT operator = 'bob' FROM leases WHERE merchant_id = ?"
# No eligible order left and no lease: the batch's outcomes are in, and it has ended.
DONE = ("SELECT NOT EXISTS (SELECT 1 FROM orders WHERE merchant_id = ?1 AND eligible = 1) "
        "AND NOT EXISTS (SELECT 1 FROM leases WHERE merchant_id = ?1)")
NO_CANDIDATE = "SELECT NOT EXISTS (SELECT 1 FROM orders WHERE merchant_id = ? AND eligible = 1)"
PREPARED = "SELECT EXISTS (SELECT 1 FROM approvals WHERE prepared_by = 'eve')"
REVOKED = ("SELECT EXISTS (SELECT 1 FROM consent_revocations WHERE merchant_id = ?1) AND "
           "NOT EXISTS (SELECT 1 FROM orders WHERE merchant_id = ?1 AND eligible = 1)")


@pytest.mark.loopback
async def test_another_process_completing_revoking_and_leasing_shows_within_2s(
        tmp_path: Path) -> None:
    # Each UpdateOrder takes 1 s: bob's batch holds its merchant's lease for seconds.
    emulator = make_emulator(SeedConfig(seed=11, merchants=3, orders_per_location=12),
                             FaultPlan(latency_ms=1000, operations=["UpdateOrder"]))
    with LoopbackServer(emulator) as server:
        env = cli_workdir(emulator, tmp_path, server.base_url)
        db = tmp_path / "recon.db"
        settings = ReconSettings(db=db, square_base_url=server.base_url,
                                 credentials=tmp_path / "credentials.toml", operator="ann")
        workspace = Workspace.open(settings)
        workspace.credentials(required=False)
        first, second, third = (m.merchant.id for m in emulator.merchants)
        app = ReconApp(workspace)
        async with app.run_test(size=(160, 45)) as pilot:
            await wait_until(pilot, merchants_loaded(app), timeout=60)
            screen = app.screen
            assert isinstance(screen, MerchantsScreen)
            candidates = {r.merchant_id: r.candidates for r in screen.rows}
            assert all(candidates.values()), candidates
            assert "ann (you)" in presence_line(app)

            # bob takes a lease (his batch for the first merchant): ann sees who, and that
            # bob is online, within 2 s of the lease row being committed.
            bob = start_cli(env, "complete", "--merchant", first, "--yes", "--json",
                            operator="bob")
            taken = await committed(pilot, db, BOB_LEASED, [first], bob)
            await within(pilot, LIVE_S, lambda: note_of(app, first).startswith(
                "LEASED by bob"), "bob's lease", since=taken)
            assert "bob (complete)" in presence_line(app)

            # bob's batch ends: his completed orders leave ann's merchants screen.
            done = await committed(pilot, db, DONE, [first], bob)
            await within(pilot, LIVE_S, lambda: note_of(app, first, 3) == "—"
                         and not note_of(app, first).startswith("LEASED"),
                         "bob's completed orders", since=done)
            await finished(pilot, bob)
            assert workspace.store.queued_orders(first, eligible_only=True) == []

            # ann looks at the second merchant's queue while cat completes it.
            emulator.app.set_faults(FaultPlan())
            app.push_screen(QueueScreen(second))
            await wait_until(pilot, lambda: isinstance(app.screen, QueueScreen))
            queue = app.screen
            assert isinstance(queue, QueueScreen)
            assert queue._kind_counts["candidate"] == candidates[second]
            cat = start_cli(env, "complete", "--merchant", second, "--yes", "--json",
                            operator="cat")
            done = await committed(pilot, db, NO_CANDIDATE, [second], cat)
            # Gone from the queue (not merely held back while cat's lease is on).
            await within(pilot, LIVE_S, lambda: not any(
                o.eligible for o in queue.orders.values()), "cat's completed orders in the "
                "queue", since=done)
            assert queue._kind_counts["candidate"] == 0
            await finished(pilot, cat)

            # ann opens the Approvals screen; eve prepares a batch above the four-eyes
            # threshold (nothing is sent): it is listed for ann's decision.
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, MerchantsScreen))
            await pilot.press("P")
            await wait_until(pilot, lambda: isinstance(app.screen, ApprovalsScreen))
            approvals = app.screen.query_one("#approvals", DataTable)
            assert approvals.row_count == 0
            eve = start_cli(dict(env, RECON_FOUR_EYES_ORDERS="0"), "complete", "--merchant",
                            third, "--yes", operator="eve")
            done = await committed(pilot, db, PREPARED, [], eve)
            await within(pilot, LIVE_S, lambda: approvals.row_count == 1,
                         "eve's prepared batch", since=done)
            await finished(pilot, eve, EXIT_REFUSED)

            # Back on the merchants screen (it reloads as it comes back), dan revokes the
            # third merchant's consent from the command line.
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, MerchantsScreen))
            assert note_of(app, second, 3) == "—"
            assert note_of(app, third, 1) == "active"
            dan = start_cli(env, "consent", "revoke", "--all-for-merchant", third, "--by",
                            "Owner", "--reason", "in-house again", operator="dan")
            done = await committed(pilot, db, REVOKED, [third], dan)
            await within(pilot, LIVE_S, lambda: note_of(app, third, 1) == "revoked"
                         and note_of(app, third, 3) == "—", "dan's revocation", since=done)
            await finished(pilot, dan)
        await workspace.aclose()


async def test_presence_two_operators_online_and_a_killed_one_goes_offline(
        tmp_path: Path) -> None:
    environment = demo(tmp_path)
    db = tmp_path / "recon.db"
    leased = environment.merchants[0].merchant.id
    app = app_for(environment)
    app.presence_expiry_s = 1.5  # everyone heart-beats every 0.2 s
    app.presence_heartbeat_s = 0.2
    children = {name: subprocess.Popen(
        [sys.executable, "-m", "tests.presence_child", str(db), name,
         *([leased] if name == "bob" else [])], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for name in ("bob", "cat")}
    try:
        for child in children.values():
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        async with app.run_test(size=(160, 45)) as pilot:
            await wait_until(pilot, merchants_loaded(app))
            await within(pilot, LIVE_S, lambda: all(
                f"{name} (console)" in presence_line(app) for name in ("bob", "cat")),
                "bob and cat online")
            assert "demo-operator (you)" in presence_line(app)
            assert note_of(app, leased).startswith("LEASED by bob")

            children["bob"].send_signal(signal.SIGKILL)
            assert children["bob"].wait() == -signal.SIGKILL
            killed = time.monotonic()
            # No release, no goodbye: his lease (his process is gone) and his session (no
            # heartbeat within the expiry) stop showing, without a refresh.
            await within(pilot, 1.5 + LIVE_S, lambda: "bob" not in presence_line(app)
                         and not note_of(app, leased).startswith("LEASED"),
                         "bob offline", since=killed)
            assert "cat (console)" in presence_line(app)  # still heart-beating: online
    finally:
        for child in children.values():
            child.kill()
            child.wait()
    # The console's own session ended with it; cat's lingers until it expires.
    store = Store(db)
    try:
        left = {s.operator for s in store.sessions("")}
        assert "demo-operator" not in left and "cat" in left
    finally:
        store.close()


def test_a_session_is_online_until_its_heartbeat_is_older_than_the_expiry(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "recon.db")
    moment = now_utc()
    presence = Presence(store, "eve", "console", clock=lambda: moment)
    presence.start()  # no event loop: no heartbeat task
    assert [s.operator for s in online(store, now=moment + timedelta(seconds=19.9),
                                       expiry_s=20)] == ["eve"]
    assert online(store, now=moment + timedelta(seconds=20.1), expiry_s=20) == []
    moment += timedelta(seconds=20.1)
    presence.beat()
    assert [s.operator for s in online(store, now=moment, expiry_s=20)] == ["eve"]
    presence.stop()
    assert online(store, now=moment) == []
    store.close()


async def test_heartbeats_are_written_off_the_event_loop_on_a_connection_of_their_own(
        tmp_path: Path) -> None:
    """A heartbeat's commit waits for the disk and for another process's write lock; in the
    console the event loop is the UI thread, so no beat may be written there."""
    import threading

    store = Store(tmp_path / "recon.db")
    beats: list[tuple[bool, bool]] = []  # (off the heartbeat threads, through the loop's store)

    def spying(target: Store) -> Store:
        touch = target.touch_session

        def touched(session_id: str, last_seen: str) -> bool:
            beats.append((
                not threading.current_thread().name.startswith("heartbeat"), target is store))
            return touch(session_id, last_seen)
        target.touch_session = touched  # type: ignore[method-assign]
        return target

    spying(store)
    writer = store.writer
    store.writer = lambda: spying(writer())  # type: ignore[assignment,method-assign,return-value]
    presence = Presence(store, "eve", "console", heartbeat_s=0.01)
    presence.start()
    try:
        deadline = time.monotonic() + 5
        while len(beats) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        presence.stop()
        await asyncio.sleep(0.05)  # the beat task ends (its connection closed after its beat)
    assert len(beats) >= 3 and beats[:3] == [(False, False)] * 3, beats
    assert [s.operator for s in online(store)] == []  # stop ended the session
    store.close()


async def test_a_beat_still_out_when_the_session_ends_does_not_bring_it_back(
        tmp_path: Path) -> None:
    """The console quits while a heartbeat is being written on its thread: the session must
    end, not be found gone by that beat and registered again (online for the expiry)."""
    import threading

    store = Store(tmp_path / "recon.db")
    beat_started = threading.Event()
    writer = store.writer

    def slow_writer() -> Store:
        own = writer()
        assert own is not None
        touch = own.touch_session

        def touched(session_id: str, last_seen: str) -> bool:
            beat_started.set()
            time.sleep(0.2)  # still out when stop() comes
            return touch(session_id, last_seen)
        own.touch_session = touched  # type: ignore[method-assign]
        return own

    store.writer = slow_writer  # type: ignore[method-assign]
    presence = Presence(store, "eve", "console", heartbeat_s=0.01)
    presence.start()
    deadline = time.monotonic() + 5
    while not beat_started.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert beat_started.is_set()
    presence.stop()
    await asyncio.sleep(0.4)  # the beat's thread is done either way
    assert online(store) == [] and store.sessions("") == []
    presence.beat()  # one more that was already on its way: too late, it writes nothing
    assert store.sessions("") == []
    store.close()


async def test_the_change_counter_moves_for_what_consoles_show_and_not_for_heartbeats(
        tmp_path: Path) -> None:
    environment = demo(tmp_path)
    workspace = environment.workspace
    feed = PolledChangeFeed(workspace.store, interval_s=0.01)
    before = feed.version()
    # Nothing changed: `wait` returns the same version after its timeout.
    assert await feed.wait(before, 0.05) == before
    presence = workspace.go_online("console")
    presence.beat()
    assert feed.version() == before  # heartbeats are not changes
    keeper = LeaseKeeper(workspace.store, "eve")
    assert keeper.take(environment.merchants[0].merchant.id) is None
    taken = feed.version()
    assert taken > before  # a lease taken is a change
    keeper.beat()
    assert feed.version() == taken  # its heartbeat is not
    keeper.release(environment.merchants[0].merchant.id)
    before = feed.version()
    assert before > taken
    other = Store(tmp_path / "recon.db")  # another process's connection
    try:
        consent = workspace.consents()[0].record.consent_id
        revoking = asyncio.get_running_loop().run_in_executor(
            None, lambda: Workspace(workspace.settings, other, workspace.gateway,
                                    clock=workspace.clock).revoke_consent(
                consent, "Owner", "test"))
        assert await feed.wait(before, 10) > before
        await revoking
    finally:
        other.close()
    await workspace.aclose()


async def test_operator_names_are_shown_literally(tmp_path: Path) -> None:
    """Another operator's name is their own text: markup, escapes and bidi overrides in it
    are shown as text on the merchants screen, never interpreted."""
    environment = demo(tmp_path)
    store = environment.workspace.store
    names = [DISMISS, "[b]bold[/b] \x1b[2J\u202eeve"]  # as other processes registered them
    for index, name in enumerate(names):
        Presence(store, name, "console", heartbeat_s=60).start()
        assert len(online(store)) == index + 1
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        line = presence_line(app)
        assert "[@click=screen.dismiss(… (console)" in line  # clipped to 24
        assert "[b]bold[/b] ␛[2J<U+202E… (console)" in line
        assert "\x1b" not in line and "\u202e" not in line
        assert isinstance(app.screen, MerchantsScreen)


async def test_a_beat_task_cancelled_twice_closes_its_connection_only_after_the_beat(
        tmp_path: Path) -> None:
    """The heartbeat task cancelled while a beat is out, and again while it waits for that
    beat (the loop shutting down cancels what is left): its own connection is closed once
    the beat is done, not under it."""
    store = Store(tmp_path / "recon.db")
    out, answer, events = hold_beats(store, "touch_session")
    presence = Presence(store, "eve", "console", heartbeat_s=0.01)
    presence.start()
    task = presence._task
    assert task is not None
    deadline = time.monotonic() + 5
    while not out.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.sleep(0)  # it is waiting for the beat now
    task.cancel()
    while not task.done():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    answer.set()
    while "closed" not in events:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert events == ["beat done", "closed"]
    assert [s.session_id for s in store.sessions("")] == [presence.session.session_id]
    store.close()
