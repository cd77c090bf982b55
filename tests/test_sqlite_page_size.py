"""A new SQLite database is made with 16 KB pages (a large discovery writes a quarter as many
log frames, issue 11); one made before with SQLite's 4 KB pages keeps them, and its data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from services.storage.sqlite import SQLiteStore


def _page_size(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


def test_a_new_database_has_16_kb_pages(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "new.db")
    store.upsert_merchant({"merchant_id": "M1", "business_name": "Harbor"})
    store.close()
    assert _page_size(tmp_path / "new.db") == 16384
    reopened = SQLiteStore(tmp_path / "new.db")
    assert [m["merchant_id"] for m in reopened.merchants()] == ["M1"]
    reopened.close()


def test_a_database_made_with_4_kb_pages_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    store = SQLiteStore(path)
    store.upsert_merchant({"merchant_id": "M1", "business_name": "Harbor"})
    store.close()
    assert _page_size(path) == 4096
    reopened = SQLiteStore(path)
    assert [m["merchant_id"] for m in reopened.merchants()] == ["M1"]
    reopened.close()
