"""Two writers on one SQLite file (two operators, a discovery shared over two processes): the
second waits for the first's transaction, polling, and gives up only after the busy timeout."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from services.storage import sqlite as sqlite_store
from services.storage.sqlite import SQLiteStore


def _hold_write_lock(path: Path, seconds: float, held: threading.Event) -> None:
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    held.set()
    time.sleep(seconds)
    other.execute("COMMIT")
    other.close()


def test_a_writer_waits_for_another_connections_transaction_and_then_writes(tmp_path: Path
                                                                            ) -> None:
    store = SQLiteStore(tmp_path / "recon.db")
    held = threading.Event()
    holder = threading.Thread(target=_hold_write_lock,
                              args=(tmp_path / "recon.db", 0.3, held))
    holder.start()
    held.wait()
    start = time.monotonic()
    with store.transaction() as conn:
        waited = time.monotonic() - start
        conn.execute("INSERT INTO order_sync VALUES ('M1', 'now', NULL)")
    holder.join()
    assert waited >= 0.25  # it did wait for the other writer ...
    # ... and took the lock soon after it was free (SQLite's own handler sleeps up to 100 ms)
    assert store.order_sync("M1") == ("now", None)
    store.close()


def test_a_writer_gives_up_after_the_busy_timeout(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_BUSY_TIMEOUT_S", 0.2)
    store = SQLiteStore(tmp_path / "recon.db")
    held = threading.Event()
    holder = threading.Thread(target=_hold_write_lock,
                              args=(tmp_path / "recon.db", 1.0, held))
    holder.start()
    held.wait()
    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"), store.transaction():
        pass
    assert 0.15 <= time.monotonic() - start < 0.9
    holder.join()
    # The connection's own busy timeout is back (reads may meet a busy database too).
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 200
    store.close()
