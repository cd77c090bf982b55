"""All SQL lives behind the store interface (services/storage): no screen, engine, command,
tool or benchmark talks to a database connection or writes SQL of its own. A new query goes
into a store method of both implementations, where the contract suite checks it on both."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("services", "console", "tools", "bench")
STORAGE = ROOT / "services" / "storage"
# A connection's methods, a driver's connect, or SQL's own verbs in a string.
SQL = re.compile(
    r"\.execute(many|script)?\(|\.conn\b|\bsqlite3\.connect\(|\bpsycopg\.connect\(|"
    # The drivers themselves (psycopg.conninfo, a URL parser, is not one).
    r"^\s*(import|from)\s+(sqlite3|sqlite_utils|psycopg_pool|psycopg(?!\.conninfo))\b|"
    r"\b(SELECT\s+[\w*(]|INSERT\s+(OR\s+\w+\s+)?INTO\b|DELETE\s+FROM\b|"
    r"UPDATE\s+\w+\s+SET\b|CREATE\s+(TABLE|INDEX|TRIGGER)\b|DROP\s+(TABLE|TRIGGER)\b)")


def sql_outside_storage(root: Path = ROOT) -> list[str]:
    found = []
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            if STORAGE in path.parents or "emulator" in path.parts:
                continue  # the emulator is Square, with no database (an import contract)
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if SQL.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_sql_outside_the_storage_package() -> None:
    found = sql_outside_storage()
    assert not found, "SQL outside services/storage (add a store method):\n" + "\n".join(found)


def test_the_check_sees_sql(tmp_path: Path) -> None:
    """The scan itself finds each form it looks for (so the test above can fail)."""
    (tmp_path / "services").mkdir()
    lines = ['store.conn.execute("x")', 'rows = cur.executemany(q, r)',
             'q = "SELECT merchant_id FROM orders"', 'q = "DELETE FROM audit"',
             'q = "UPDATE intents SET outcome = 1"', 'q = "INSERT OR REPLACE INTO t"',
             'c = psycopg.connect(url)', 'c = sqlite3.connect(path)', 'import sqlite3',
             'from psycopg_pool import ConnectionPool']
    (tmp_path / "services" / "x.py").write_text("\n".join(lines) + "\n# selected orders\n")
    for top in SCANNED[1:]:
        (tmp_path / top).mkdir()
    assert len(sql_outside_storage(tmp_path)) == len(lines)
