"""The PostgreSQL pool of one console: its cap is a setting (RECON_PG_POOL_MAX, default 4, as
docs/scaling.md counts), and a console at full load never needs two pooled connections on one
thread (LISTEN has its own, outside the pool), so no cap can deadlock it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from console.cli import main
from services.demo import consent_for, workspace_on_emulator
from services.settings import PG_POOL_MAX, ReconSettings
from services.storage.postgres import PostgresStore
from services.workspace import Workspace
from tests.conftest import Emulator
from tests.test_completion import ENGINE, FAST_RETRY

SCALING = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"


def test_the_default_cap_is_the_one_docs_scaling_recommends() -> None:
    assert ReconSettings().pg_pool_max == PG_POOL_MAX == 4
    assert f"pool `max_size` {PG_POOL_MAX}" in SCALING.read_text()


def test_a_cap_below_one_is_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECON_PG_POOL_MAX", "0")
    assert main(["queue", "--format", "json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pg_pool_max" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("cap", [None, 3])
async def test_the_console_pool_opens_at_most_the_setting(
        cap: int | None, pg_url: str, emulator: Emulator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if cap is not None:
        monkeypatch.setenv("RECON_PG_POOL_MAX", str(cap))
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, pg_url, home=tmp_path)
    try:
        assert isinstance(workspace.store, PostgresStore)
        assert workspace.store.pool.max_size == (cap or PG_POOL_MAX)
    finally:
        await workspace.aclose()


@contextmanager
def peak_checked_out(store: PostgresStore) -> Iterator[dict[str, int]]:
    """How many of the pool's connections were out at once, at most."""
    seen = {"out": 0, "peak": 0}
    lock = threading.Lock()
    getconn, putconn = store.pool.getconn, store.pool.putconn

    def counted_get(timeout: float | None = None) -> Any:
        conn = getconn(timeout)
        with lock:
            seen["out"] += 1
            seen["peak"] = max(seen["peak"], seen["out"])
        return conn

    def counted_put(conn: Any) -> None:
        with lock:
            seen["out"] -= 1
        putconn(conn)

    store.pool.getconn = counted_get  # type: ignore[method-assign]
    store.pool.putconn = counted_put  # type: ignore[method-assign]
    yield seen


async def console_at_full_load(workspace: Workspace) -> tuple[int, int, bool]:
    """What one console does at once: presence heart-beats, the change feed waits on LISTEN,
    the engine runs a batch (its journal writer thread commits), and worker threads verify
    the audit and read the queue. Returns (completed, previewed, the feed woke)."""
    workspace.go_online("console", heartbeat_s=0.02)
    feed = workspace.changes()
    waiting = asyncio.ensure_future(feed.wait(feed.version(), timeout=30))
    preview = workspace.preview()
    assert preview.count > 0
    done = threading.Event()
    reads = [0]

    def read_while_the_batch_runs() -> None:
        while not done.is_set():
            reads[0] += 1
            with workspace.own_connection() as own:
                own.queue()
                own.overview()
                assert own.verify(own_connection=True).ok
            time.sleep(0.01)

    readers = [asyncio.to_thread(read_while_the_batch_runs) for _ in range(2)]
    reading = asyncio.gather(*readers)
    try:
        _, results = await workspace.complete(preview)
    finally:
        done.set()
    await reading
    woke = await asyncio.wait_for(waiting, 10) > 0
    completed = sum(1 for r in results if r.outcome.value == "completed")
    assert reads[0] >= 2  # the readers did read while the batch ran
    return completed, preview.count, woke


async def test_a_console_at_full_load_runs_on_a_pool_of_one(
        pg_url: str, emulator: Emulator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread ever holds one pooled connection while it waits for another, and LISTEN is
    not one of them: even a single pooled connection carries a whole console, so the default
    of 4 only ever makes threads wait their turn for a statement, never for each other."""
    monkeypatch.setenv("RECON_PG_POOL_MAX", "1")
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, pg_url, "tester",
                                      timeout_s=5.0, retry=FAST_RETRY, home=tmp_path)
    try:
        assert isinstance(workspace.store, PostgresStore)
        # A starved request fails in seconds here (the product waits 30 s, then says so).
        workspace.store.pool.timeout = 8
        workspace.engine_options = dict(ENGINE)
        path = tmp_path / "consents.json"
        path.write_text(json.dumps([consent_for(m, datetime.now(UTC))
                                    for m in emulator.merchants]))
        workspace.import_consent_files([path])
        await workspace.refresh()
        with peak_checked_out(workspace.store) as seen:
            completed, previewed, woke = await console_at_full_load(workspace)
        assert completed == previewed and woke
        assert seen["peak"] == 1
        assert workspace.store.pool.get_stats().get("requests_errors", 0) == 0
    finally:
        await workspace.aclose()
