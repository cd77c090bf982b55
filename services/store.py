"""Where the rest of the tree imports the store from (services/storage holds it)."""

from services.storage import (
    DATABASE_ERRORS,
    ORDER_COLUMNS,
    Lease,
    QueuedOrder,
    Store,
    StoredConsent,
    now_utc,
    open_store,
    utc_text,
)

__all__ = ["DATABASE_ERRORS", "ORDER_COLUMNS", "Lease", "QueuedOrder", "Store", "StoredConsent",
           "now_utc", "open_store", "utc_text"]
