"""Merchant leases on their own (`services.completion.leases`), on a real SQLite file: one
holder at a time per merchant; a holder that is gone (expired, or a dead process of this host)
is taken over; a live one is reported, never overridden; the heartbeat keeps a lease and a
lease taken over after it expired is not ours any more; a release lets the next holder in.
What the engine does with a lease it meets is in tests/test_completion.py (hole 6)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.completion.leases import LeaseKeeper, holder_gone
from services.processes import HOST
from services.storage import open_store
from services.store import Lease, Store, utc_text
from services.timestamps import parse_time
from tests.heartbeat_support import hold_beats
from tests.pg_support import pg_cluster, pg_url

__all__ = ["pg_cluster", "pg_url"]  # PostgreSQL fixtures (tests/pg_support.py)

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def lease(expires: datetime, *, host: str = HOST, pid: int | None = None,
          token: str = "theirs") -> Lease:
    return Lease("M1", "bob", host, os.getpid() if pid is None else pid,
                 utc_text(expires - timedelta(minutes=1)), utc_text(expires - timedelta(
                     minutes=1)), utc_text(expires), token)


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def row(store: Store, merchant_id: str = "M1") -> Lease | None:
    return next((x for x in store.leases() if x.merchant_id == merchant_id), None)


async def until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_holder_is_gone_once_its_lease_expires_or_its_process_of_this_host_is_gone() -> None:
    later = NOW + timedelta(seconds=1)
    assert not holder_gone(lease(later), NOW)  # this very process, not expired: in force
    assert holder_gone(lease(NOW), NOW)  # expires this very moment: gone
    assert holder_gone(lease(NOW - timedelta(microseconds=1)), NOW)
    assert holder_gone(lease(later, pid=dead_pid()), NOW)  # its process exited
    # A pid on another host says nothing about a process here: only the expiry counts.
    assert not holder_gone(lease(later, host="another-host", pid=dead_pid()), NOW)
    # Without a moment given, the moment is now.
    assert not holder_gone(lease(datetime.now(UTC) + timedelta(minutes=1)))
    assert holder_gone(lease(datetime.now(UTC) - timedelta(seconds=1)))


def test_a_lease_is_taken_in_the_database_and_a_live_holder_is_returned_not_overridden(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    mine = LeaseKeeper(store, "alice", ttl_s=30.0)
    before = datetime.now(UTC)
    assert mine.take("M1") is None and mine.holds("M1")
    written = row(store)
    assert written is not None
    assert (written.operator, written.host, written.pid, written.token) == (
        "alice", HOST, os.getpid(), mine.token)
    started = parse_time(written.started_at)
    assert before <= started <= datetime.now(UTC)
    assert parse_time(written.heartbeat_at) == started
    assert parse_time(written.expires_at) - started == timedelta(seconds=30)
    # Another keeper (another run, another operator): told who holds it, holds nothing.
    other = LeaseKeeper(store, "bob")
    assert other.token != mine.token
    assert other.take("M1") == written and not other.holds("M1")
    assert row(store) == written
    assert not other.holds("M2") and not mine.holds("M2")  # never taken
    # Taking one's own lease again renews it.
    assert mine.take("M1") is None and mine.holds("M1")
    # Released, the next holder gets it at once.
    mine.release("M1")
    assert not mine.holds("M1") and row(store) is None
    assert other.take("M1") is None and other.holds("M1")
    assert row(store).token == other.token  # type: ignore[union-attr]


def test_an_expired_or_dead_holders_lease_is_taken_over(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    now = datetime.now(UTC)
    keeper = LeaseKeeper(store, "alice")
    store.take_lease(lease(now - timedelta(seconds=1), host="another-host"), lambda x: True)
    assert keeper.take("M1") is None and row(store).token == keeper.token  # type: ignore[union-attr]
    keeper.release("M1")
    store.take_lease(lease(now + timedelta(minutes=5), pid=dead_pid()), lambda x: True)
    assert keeper.take("M1") is None and row(store).token == keeper.token  # type: ignore[union-attr]
    keeper.release("M1")
    live = lease(now + timedelta(minutes=5), pid=os.getpid())
    store.take_lease(live, lambda x: True)
    assert keeper.take("M1") == live and not keeper.holds("M1")


async def test_an_unbeaten_lease_stops_being_held_when_its_time_is_up(tmp_path: Path) -> None:
    keeper = LeaseKeeper(Store(tmp_path / "l.db"), "alice", ttl_s=0.2)
    before = time.monotonic()  # the deadline counts from inside take(): after this
    assert keeper.take("M1") is None
    if time.monotonic() - before < 0.15:  # unless a loaded machine spent the TTL in take()
        assert keeper.holds("M1")
    await until(lambda: not keeper.holds("M1"))
    # Not before its time, measured from before take(): a loaded machine's delay between
    # take's clock and ours cannot fail it.
    assert time.monotonic() - before >= 0.2


async def test_the_heartbeat_extends_the_lease_in_the_database_and_in_holds(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    keeper = LeaseKeeper(store, "alice", ttl_s=0.3)
    assert keeper.take("M1") is None
    taken = row(store)
    await until(lambda: not keeper.holds("M1"))
    keeper.beat()  # past its time, but nobody took it: still ours
    assert keeper.holds("M1")
    beaten = row(store)
    assert beaten is not None and beaten.token == keeper.token
    assert beaten.started_at == taken.started_at  # type: ignore[union-attr]
    assert beaten.heartbeat_at > taken.heartbeat_at  # type: ignore[union-attr]
    assert (parse_time(beaten.expires_at) - parse_time(beaten.heartbeat_at)
            == timedelta(seconds=0.3))


async def test_a_lease_taken_over_after_it_expired_is_not_ours_any_more(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    keeper = LeaseKeeper(store, "alice", ttl_s=30.0)
    assert keeper.take("M1") is None and keeper.take("M2") is None
    # Bob found M1 expired (say this process hung past its TTL) and took it.
    bobs = lease(datetime.now(UTC) + timedelta(minutes=5), token="bobs")
    store.take_lease(bobs, lambda x: True)
    keeper.beat()
    assert not keeper.holds("M1") and keeper.holds("M2")
    keeper.release("M1")  # the end of this run's work on M1: Bob's lease is left alone
    assert bobs in store.leases()
    async with keeper:
        pass  # leaving releases what we hold, and only that
    assert store.leases() == [bobs]


async def test_a_refused_heartbeat_or_release_is_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "l.db")
    keeper = LeaseKeeper(store, "alice", ttl_s=30.0)
    assert keeper.take("M1") is None
    taken = row(store)

    def locked(*args: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "heartbeat_leases", locked)
    keeper.beat()  # tried again at the next beat; until then the lease runs its time
    assert keeper.holds("M1")
    monkeypatch.setattr(store, "release_leases", locked)
    keeper.release("M1")  # unreleased, it simply expires
    assert not keeper.holds("M1")
    assert row(store) == taken


async def test_while_work_runs_the_leases_are_beaten_and_released_at_the_end(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    keeper = LeaseKeeper(store, "alice", ttl_s=0.3, heartbeat_s=0.02)
    async with keeper as entered:
        assert entered is keeper
        assert keeper.take("M1") is None and keeper.take("M2") is None
        first = row(store)
        # Beaten past its first TTL: still held, in the database too.
        await until(lambda: row(store).heartbeat_at != first.heartbeat_at)  # type: ignore[union-attr]
        started = time.monotonic()
        await until(lambda: time.monotonic() - started > 0.4)
        assert keeper.holds("M1") and keeper.holds("M2")
        assert parse_time(row(store).expires_at) > datetime.now(UTC)  # type: ignore[union-attr]
    assert store.leases() == []
    assert not keeper.holds("M1") and not keeper.holds("M2")
    assert keeper._task is not None and keeper._task.done()


async def test_merchants_ending_together_release_their_leases_in_one_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "l.db")
    keeper = LeaseKeeper(store, "alice", ttl_s=30.0)
    other = LeaseKeeper(store, "bob", ttl_s=30.0)
    assert keeper.take_all(["M1", "M2", "M3"]) == {"M1": None, "M2": None, "M3": None}
    assert other.take("M4") is None
    commits: list[list[str]] = []
    release_leases = store.release_leases

    def counted(merchant_ids: list[str], token: str) -> None:
        commits.append(list(merchant_ids))
        release_leases(merchant_ids, token)

    monkeypatch.setattr(store, "release_leases", counted)
    leases_after: dict[str, list[str]] = {}

    async def end(merchant_id: str) -> None:
        await keeper.release_soon(merchant_id)
        leases_after[merchant_id] = [lease.merchant_id for lease in store.leases()]

    await asyncio.gather(end("M1"), end("M2"), end("M4"))  # M4 is bob's: not touched
    assert commits == [["M1", "M2"]]
    assert leases_after == {m: ["M3", "M4"] for m in ("M1", "M2", "M4")}  # released on return
    assert not keeper.holds("M1") and not keeper.holds("M2") and keeper.holds("M3")
    await keeper.release_soon("M3")  # alone in its turn
    assert commits == [["M1", "M2"], ["M3"]]
    assert [lease.merchant_id for lease in store.leases()] == ["M4"]


async def test_heartbeats_are_written_off_the_event_loop_and_their_answer_applied(
        tmp_path: Path) -> None:
    """The beat's commit runs on a thread with a connection of its own (in the console the
    loop is the UI thread); what it answers still decides `holds`: a lease Bob took over
    after it expired stops being ours, the other is extended."""
    import threading

    store = Store(tmp_path / "l.db")
    beats: list[tuple[bool, bool]] = []  # (off the heartbeat threads, through the loop's store)
    writer = store.writer

    def spying_writer() -> Store:
        own = writer()
        assert own is not None
        beat = own.heartbeat_leases

        def beaten(*args: str) -> set[str]:
            beats.append((
                not threading.current_thread().name.startswith("heartbeat"), own is store))
            return beat(*args)
        own.heartbeat_leases = beaten  # type: ignore[method-assign]
        return own

    store.writer = spying_writer  # type: ignore[method-assign]
    keeper = LeaseKeeper(store, "alice", ttl_s=0.5, heartbeat_s=0.02)
    async with keeper:
        assert keeper.take("M1") is None and keeper.take("M2") is None
        bobs = lease(datetime.now(UTC) + timedelta(minutes=5), token="bobs")
        store.take_lease(bobs, lambda x: True)
        await until(lambda: not keeper.holds("M1") and len(beats) >= 2)
        started = time.monotonic()
        await until(lambda: time.monotonic() - started > 0.6)  # past the first TTL
        assert keeper.holds("M2") and not keeper.holds("M1")
    assert beats and set(beats) == {(False, False)}, beats
    assert store.leases() == [bobs]


def test_a_beat_answered_after_a_lease_was_taken_again_leaves_that_take_alone(
        tmp_path: Path) -> None:
    """A beat's answer arrives after the loop went on: a lease released and taken again
    meanwhile is missing from the answer, and must stay held as its take said."""
    store = Store(tmp_path / "l.db")
    keeper = LeaseKeeper(store, "alice", ttl_s=30.0)
    began = time.monotonic()
    assert keeper.take("M1") is None and keeper.take("M2") is None
    keeper._kept({"M2"}, began - 1.0)  # begun before the takes, answered after them
    assert keeper.holds("M1") and keeper.holds("M2")
    keeper._kept(set(), time.monotonic())  # begun after: M1 and M2 are not ours any more
    assert not keeper.holds("M1") and not keeper.holds("M2")


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_beat_written_after_a_take_never_leaves_us_holding_past_the_rows_expiry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
        database: str) -> None:
    """A beat begun before a take (recovery takes merchants one by one while beats run) but
    whose UPDATE lands after it writes the beat's earlier expiry over the take's. `holds`
    must then go by the row, not the take: else, once the row has expired, Bob takes the
    merchant over while we still think it ours and both send. Clocks are faked (both the
    monotonic and the wall clock advance together) so the gap is exact, not a sleep."""
    import threading
    from types import SimpleNamespace

    from services.completion import leases as leases_module

    clock = {"t": 0.0}
    monkeypatch.setattr(leases_module, "time", SimpleNamespace(monotonic=lambda: clock["t"]))
    monkeypatch.setattr(leases_module, "now_utc",
                        lambda: NOW + timedelta(seconds=clock["t"]))
    store = (Store(tmp_path / "l.db") if database == "sqlite"
             else open_store(request.getfixturevalue("pg_url")))
    out, answer = threading.Event(), threading.Event()
    writer = store.writer

    def held_writer() -> Store:
        own = writer()  # on PostgreSQL the store itself (its pool is shared by threads)
        assert own is not None
        beat = own.heartbeat_leases

        def late(*args: str) -> set[str]:
            out.set()
            assert answer.wait(5)  # the loop takes M2 meanwhile
            return beat(*args)
        own.heartbeat_leases = late  # type: ignore[method-assign]
        return own

    store.writer = held_writer  # type: ignore[method-assign]
    keeper = LeaseKeeper(store, "alice", ttl_s=30.0, heartbeat_s=0.01)
    applied: list[set[str]] = []
    kept = keeper._kept

    def spying_kept(answered: set[str], began: float) -> None:
        applied.append(answered)
        kept(answered, began)
    keeper._kept = spying_kept  # type: ignore[method-assign]
    async with keeper:
        assert keeper.take("M1") is None  # something to beat: a beat begins at t=0
        await until(out.is_set)
        keeper.heartbeat_s = 3600.0  # no second beat: this one's answer is the last word
        clock["t"] = 10.0
        assert keeper.take("M2") is None  # its row: expires at t=40
        answer.set()
        await until(lambda: bool(applied))
        assert applied == [{"M1", "M2"}]
        rows = {x.merchant_id: parse_time(x.expires_at) for x in store.leases()}
        assert rows["M2"] == NOW + timedelta(seconds=30)  # the late beat's, not the take's
        clock["t"] = 35.0  # past the row's expiry
        bob = LeaseKeeper(store, "bob", ttl_s=30.0)
        taken_by_bob = bob.take("M2") is None
        assert not (taken_by_bob and keeper.holds("M2")), "both hold M2"
        assert not keeper.holds("M2")
    store.close()


async def test_a_batch_cancelled_twice_closes_the_beats_connection_only_after_its_beat(
        tmp_path: Path) -> None:
    """The batch is cancelled while a beat is out on its thread, and cancelled again while
    `__aexit__` waits for that beat (the console quitting): the beat's own connection must
    not be closed under it (the beat then fails half-way, an error nobody reads)."""
    store = Store(tmp_path / "l.db")
    out, answer, events = hold_beats(store, "heartbeat_leases")
    keeper = LeaseKeeper(store, "alice", ttl_s=30.0, heartbeat_s=0.01)

    async def batch() -> None:
        async with keeper:
            assert keeper.take("M1") is None
            await asyncio.Event().wait()

    running = asyncio.create_task(batch())
    await until(out.is_set)
    running.cancel()  # the batch cancelled: `__aexit__` waits for the beat out
    await until(lambda: keeper._task is not None and keeper._task.cancelling() > 0)
    await asyncio.sleep(0)
    running.cancel()  # and cancelled again meanwhile
    await until(lambda: keeper._task is not None and keeper._task.done())
    answer.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    await until(lambda: "closed" in events)
    assert events == ["beat done", "closed"]
    assert store.leases() == []  # released all the same


def test_a_take_never_counts_its_lease_as_ours_longer_than_its_row_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local deadline starts no later than the expiry written: a clock that ticks a
    second at every reading makes the order of the two readings visible."""
    from types import SimpleNamespace

    from services.completion import leases as leases_module

    ticks = [0.0]

    def tick() -> float:
        ticks[0] += 1.0
        return ticks[0] - 1.0
    monkeypatch.setattr(leases_module, "time", SimpleNamespace(monotonic=tick))
    monkeypatch.setattr(leases_module, "now_utc", lambda: NOW + timedelta(seconds=tick()))
    store = Store(tmp_path / "l.db")
    keeper = LeaseKeeper(store, "alice", ttl_s=30.0)
    assert keeper.take("M1") is None
    expires = parse_time(store.leases()[0].expires_at)
    ticks[0] = (expires - NOW).total_seconds()  # the row's expiry, on both clocks
    assert not keeper.holds("M1")
