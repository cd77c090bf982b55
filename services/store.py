"""Where the rest of the tree imports the store from (services/storage holds it).

`migrations` are the SQLite store's (services/storage/sqlite.py); PostgreSQL's are in
services/storage/postgres.py."""

from services.storage import (
    ORDER_COLUMNS,
    Approval,
    Lease,
    OperatorSession,
    QueuedOrder,
    Store,
    StoredConsent,
    database_errors,
    now_utc,
    open_store,
    utc_text,
)
from services.storage.sqlite import SQLiteStore, migrations

__all__ = [
    "ORDER_COLUMNS",
    "Approval",
    "Lease",
    "OperatorSession",
    "QueuedOrder",
    "SQLiteStore",
    "Store",
    "StoredConsent",
    "database_errors",
    "migrations",
    "now_utc",
    "open_store",
    "utc_text",
]
