"""Discovery's cache commits do not checkpoint the WAL (a checkpoint every 4 MB stalled the
event loop for seconds, issue 11); the next durable transaction does, and the setting is back
even when a cache transaction fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.store import Store


def test_cache_commits_leave_the_checkpoint_to_the_next_durable_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "recon.db")
    database, log = tmp_path / "recon.db", tmp_path / "recon.db-wal"
    size_before = database.stat().st_size
    autocheckpoint = store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert autocheckpoint * store.conn.execute("PRAGMA page_size").fetchone()[0] == 4_096_000
    with store.cache_transaction() as conn:  # ~6 MB: past the 4 MB autocheckpoint
        conn.executemany("INSERT INTO backlog_history VALUES (?, 'M', 0, 0, 0, 0, 0, 'x', 0)",
                         [(f"{n:06d}" + "x" * 3000,) for n in range(2000)])
    assert log.stat().st_size > 4_000_000
    assert database.stat().st_size == size_before  # nothing copied back yet
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == autocheckpoint
    with store.transaction() as conn:
        conn.execute("INSERT INTO backlog_history VALUES ('z', 'M', 0, 0, 0, 0, 0, 'x', 0)")
    assert database.stat().st_size > size_before + 4_000_000
    with pytest.raises(RuntimeError), store.cache_transaction():
        raise RuntimeError("a merchant's write failed")
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == autocheckpoint
    store.close()
