"""Storage: one interface (`Store`, services/storage/base.py), two databases.

`open_store(db)` opens SQLite for a path (or ":memory:") and PostgreSQL for a `postgresql://`
URL. All of the console's SQL lives in this package.
"""

from __future__ import annotations

from pathlib import Path

from services.database_url import is_database_url
from services.storage.base import (
    ORDER_COLUMNS,
    Approval,
    Lease,
    OperatorSession,
    QueuedOrder,
    Store,
    StoredConsent,
    database_errors,
    now_utc,
    utc_text,
)

__all__ = [
    "ORDER_COLUMNS",
    "Approval",
    "Lease",
    "OperatorSession",
    "QueuedOrder",
    "Store",
    "StoredConsent",
    "database_errors",
    "implementation_for",
    "now_utc",
    "open_store",
    "utc_text",
]


def implementation_for(db: Path | str) -> type[Store]:
    if is_database_url(db):
        from services.storage.postgres import PostgresStore
        return PostgresStore
    from services.storage.sqlite import SQLiteStore
    return SQLiteStore


def open_store(db: Path | str, *, pg_pool_max: int | None = None) -> Store:
    """The store for `db`: a path (SQLite) or a `postgresql://` URL (PostgreSQL, whose pool
    opens at most `pg_pool_max` connections; by default the setting's default)."""
    if pg_pool_max is not None and is_database_url(db):
        from services.storage.postgres import PostgresStore
        return PostgresStore(db, max_connections=pg_pool_max)
    return implementation_for(db)(db)
