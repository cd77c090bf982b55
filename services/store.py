"""Where the rest of the tree imports the store from (services/storage holds it).

`migrations` are the SQLite store's (services/storage/sqlite.py); PostgreSQL's are in
services/storage/postgres.py."""

from services.storage import (
    DATABASE_ERRORS,
    ORDER_COLUMNS,
    Approval,
    Lease,
    OperatorSession,
    QueuedOrder,
    Store,
    StoredConsent,
    now_utc,
    open_store,
    utc_text,
)
from services.storage.sqlite import SQLiteStore, migrations

__all__ = ["DATABASE_ERRORS", "ORDER_COLUMNS", "Approval", "Lease", "OperatorSession",
           "QueuedOrder", "SQLiteStore",
           "Store", "StoredConsent", "migrations", "now_utc", "open_store", "utc_text"]
