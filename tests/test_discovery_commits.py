"""Merchants' order writes are committed several at a time (`services.discovery._Commits`,
issue 11), without ever holding the database while a merchant waits for Square, and with
nothing half-written when one of them fails."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from services.discovery import _Commits
from services.store import SQLiteStore


def rows_of(path: Path) -> set[str]:
    """What another connection (another process) sees: committed rows only."""
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT merchant_id FROM order_sync")}
    finally:
        conn.close()


def part(store: SQLiteStore, merchant_id: str, fail: bool = False):  # type: ignore[no-untyped-def]
    def write() -> None:
        store.save_order_sync(merchant_id, "2026-11-26T12:00:00.000000Z", None)
        if fail:
            raise sqlite3.IntegrityError(f"{merchant_id}: refused")
    return write


async def test_writes_wait_for_the_others_and_commit_in_one_transaction(tmp_path: Path
                                                                        ) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    commits = _Commits(store, window_s=60)
    commits.running = 3
    transactions = 0
    plain = store.cache_transaction

    def counted():  # type: ignore[no-untyped-def]
        nonlocal transactions
        transactions += 1
        return plain()
    store.cache_transaction = counted  # type: ignore[method-assign]
    first = asyncio.ensure_future(commits.commit(part(store, "M1")))
    second = asyncio.ensure_future(commits.commit(part(store, "M2")))
    await asyncio.sleep(0.05)
    # Two of three merchants wait: nothing is written yet, and the database is free.
    assert not first.done() and not second.done()
    assert rows_of(tmp_path / "c.db") == set()
    other = sqlite3.connect(tmp_path / "c.db", timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another writer is not kept waiting meanwhile
    other.execute("ROLLBACK")
    other.close()
    # The last one in progress: all commit now (not after the window).
    await asyncio.wait_for(asyncio.gather(commits.commit(part(store, "M3")), first, second),
                           timeout=5)
    assert rows_of(tmp_path / "c.db") == {"M1", "M2", "M3"}
    assert transactions == 1
    store.close()


async def test_a_lone_write_commits_after_the_window(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    commits = _Commits(store, window_s=0.05)
    commits.running = 4  # the other three are still reading from Square
    await asyncio.wait_for(commits.commit(part(store, "M1")), timeout=5)
    assert rows_of(tmp_path / "c.db") == {"M1"}
    store.close()


async def test_a_merchant_done_without_writing_lets_the_waiting_ones_commit(tmp_path: Path
                                                                            ) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    commits = _Commits(store, window_s=60)
    commits.running = 2
    waiting = asyncio.ensure_future(commits.commit(part(store, "M1")))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    commits.running -= 1  # the other merchant failed at Square: it writes nothing
    commits.flush_if_all_wait()
    await asyncio.wait_for(waiting, timeout=5)
    assert rows_of(tmp_path / "c.db") == {"M1"}
    store.close()


async def test_one_failed_write_fails_every_merchant_of_its_transaction(tmp_path: Path
                                                                       ) -> None:
    """No merchant's rows are half-written, and none is left believing it was written."""
    store = SQLiteStore(tmp_path / "c.db")
    commits = _Commits(store, window_s=60)
    commits.running = 3
    outcomes = await asyncio.wait_for(asyncio.gather(
        commits.commit(part(store, "M1")), commits.commit(part(store, "M2", fail=True)),
        commits.commit(part(store, "M3")), return_exceptions=True), timeout=5)
    assert all(isinstance(o, sqlite3.IntegrityError) for o in outcomes), outcomes
    assert rows_of(tmp_path / "c.db") == set()
    # The connection is usable again, and the next writes commit.
    commits.running = 1
    await asyncio.wait_for(commits.commit(part(store, "M4")), timeout=5)
    assert rows_of(tmp_path / "c.db") == {"M4"}
    store.close()


async def test_writes_of_cancelled_merchants_are_still_made_on_the_way_out(tmp_path: Path
                                                                          ) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    commits = _Commits(store, window_s=60)
    commits.running = 2
    waiting = asyncio.ensure_future(commits.commit(part(store, "M1")))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    commits.flush()  # what `discover` does in its `finally`
    assert rows_of(tmp_path / "c.db") == {"M1"}
    store.close()


def test_the_larger_page_cache_lasts_as_long_as_the_discovery(tmp_path: Path) -> None:
    """32 MB while a discovery writes (its commits keep the order_id index in memory), the
    connection's own size again afterwards, even when the discovery fails."""
    store = SQLiteStore(tmp_path / "c.db")
    before = store.conn.execute("PRAGMA cache_size").fetchone()[0]
    with store.large_writes():
        assert store.conn.execute("PRAGMA cache_size").fetchone()[0] == -32768
    assert store.conn.execute("PRAGMA cache_size").fetchone()[0] == before
    with pytest.raises(RuntimeError), store.large_writes():
        raise RuntimeError("a merchant's write failed")
    assert store.conn.execute("PRAGMA cache_size").fetchone()[0] == before
    store.close()


async def test_the_next_merchant_reads_while_one_waits_for_its_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merchant done with Square gives its place back before its write is committed, in
    a full read as in a refresh by change: with two at once, the third starts while the
    first waits for the second. Made certain here: the second's order read is held until
    the third has asked Square something (the place kept until the commit: no third
    merchant, the second never ends, the wait times out)."""
    from datetime import UTC, datetime, timedelta

    from services import discovery
    from services.demo import workspace_on_emulator
    from services.emulator import SeedConfig
    from tests.conftest import make_emulator

    # No commit by the clock: only a merchant's place given back lets the third one start.
    monkeypatch.setattr(discovery, "COMMIT_WINDOW", timedelta(seconds=60))
    emulator = make_emulator(SeedConfig(merchants=3, orders_per_location=3))
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, tmp_path / "r.db",
                                      "tester")
    first, second, third = sorted(emulator.merchants, key=lambda m: m.merchant.id)
    third_asked = asyncio.Event()
    handle = emulator.app._handle

    async def spy(operation: Any, request: Any) -> Any:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if bearer == third.token.token:
            third_asked.set()
        elif bearer == second.token.token and request.url.path == "/v2/orders/search":
            await third_asked.wait()
        return await handle(operation, request)

    emulator.app._handle = spy  # type: ignore[method-assign]
    try:
        for _read in ("in full", "by change"):
            third_asked.clear()
            reports = await asyncio.wait_for(discovery.discover(
                workspace.gateway, workspace.store, workspace.credentials(), {},
                datetime.now(UTC), concurrency=2), timeout=10)
            assert [r.merchant_id for r in reports if r.refreshed] == sorted(
                m.merchant.id for m in (first, second, third))
    finally:
        await workspace.aclose()
