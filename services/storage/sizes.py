"""How much room each table takes, with its indexes (and TOAST on PostgreSQL), and its rows:
the measurements behind docs/scaling.md (bench/storage_sizes.py)."""

from __future__ import annotations

from collections.abc import Sequence

from services.storage.postgres import PostgresStore
from services.storage.sqlite import SQLiteStore

__all__ = ["postgres_table_sizes", "sqlite_table_sizes"]


def sqlite_table_sizes(store: SQLiteStore, tables: Sequence[str]) -> dict[str, tuple[int, int]]:
    """table -> (bytes in its pages and its indexes' pages (dbstat), rows)."""
    conn = store.conn
    owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master "
                              "WHERE type IN ('table', 'index')").fetchall())
    sizes: dict[str, int] = {}
    for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
        table = owner.get(name, name)
        sizes[table] = sizes.get(table, 0) + int(size)
    return {table: (sizes.get(table, 0),
                    int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]))
            for table in tables}


def postgres_table_sizes(store: PostgresStore, tables: Sequence[str]
                         ) -> dict[str, tuple[int, int]]:
    """table -> (pg_total_relation_size after VACUUM ANALYZE, rows)."""
    with store.pool.connection() as conn:
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
        result = {}
        for table in tables:
            size = conn.execute("SELECT pg_total_relation_size(%s)", [table]).fetchone()
            rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            result[table] = (int(size[0]) if size else 0, int(rows[0]) if rows else 0)
        return result
