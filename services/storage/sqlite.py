"""The embedded store: one SQLite file (sqlite-utils), its migrations, and its SQL.

WAL mode; `synchronous=FULL` so a committed intent survives a killed process or a power cut.
Tokens never come here: no table has a column for them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import starmap
from pathlib import Path
from typing import Any

import orjson
from sqlite_utils import Database, Migrations

from services.consent import ConsentRecord, Revocation, record_sha256
from services.errors import ConfigurationError
from services.private_files import create_private
from services.settings import default_db_path
from services.square_models import order_document
from services.storage.base import (
    AUDIT_COLUMNS,
    AUDIT_VERIFY_COLUMNS,
    INTENT_COLUMNS,
    ORDER_COLUMNS,
    SQUARE_TIME_GLOB,
    Approval,
    AuditBuilder,
    Lease,
    OperatorSession,
    QueuedOrder,
    Store,
    counts_at_edges,
    edges_passed,
    utc_text,
)

__all__ = ["SQLiteStore"]

migrations = Migrations("recon-console")
# SQLite's default autocheckpoint, 1,000 pages of 4 KB, kept in bytes whatever the page size.
_AUTOCHECKPOINT_BYTES = 1000 * 4096
_PAGE_SIZE = 16384
# `candidates_by_age` with up to this many edges sums each (a refresh asks 4); with more (a
# merchant's first backlog, 42) it classes each row by a binary search over them.
_EDGES_SUMMED = 8
_BUSY_TIMEOUT_S = 30.0
_BUSY_POLL_S = 0.001


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting up to `_BUSY_TIMEOUT_S` for another process's write to end.
    Polled every millisecond rather than left to SQLite's busy handler, whose sleeps grow to
    100 ms: with two processes writing short transactions (two operators, a discovery shared
    over two processes) those sleeps, not the writes, set the pace."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if (getattr(error, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY
                        or time.monotonic() >= deadline):
                    raise
            time.sleep(_BUSY_POLL_S)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")


@migrations()
def m001_initial(db: Database) -> None:
    db.execute("""
        CREATE TABLE consents (
            consent_id TEXT NOT NULL, version INTEGER NOT NULL, merchant_id TEXT NOT NULL,
            record_json TEXT NOT NULL, record_sha256 TEXT NOT NULL,
            imported_at TEXT NOT NULL, imported_by TEXT NOT NULL, source TEXT,
            PRIMARY KEY (consent_id, version))""")
    db.execute("CREATE INDEX consents_merchant ON consents(merchant_id)")
    db.execute("""
        CREATE TABLE merchants (
            merchant_id TEXT PRIMARY KEY, business_name TEXT, country TEXT, currency TEXT,
            timezone TEXT, locations_json TEXT, fetched_at TEXT,
            token_health TEXT, token_expires_at TEXT, token_scopes TEXT,
            sync_time TEXT, discovery_error TEXT, discovered_at TEXT)""")
    db.execute("""
        CREATE TABLE orders (
            order_id TEXT PRIMARY KEY, merchant_id TEXT NOT NULL, location_id TEXT NOT NULL,
            version INTEGER, state TEXT NOT NULL, source TEXT, reference_id TEXT,
            total_amount INTEGER NOT NULL, currency TEXT NOT NULL, due_amount INTEGER NOT NULL,
            created_at TEXT NOT NULL, updated_at TEXT, eligible INTEGER NOT NULL,
            reason TEXT, detail TEXT, consent_id TEXT, fulfillments TEXT,
            order_json TEXT NOT NULL, seen_at TEXT NOT NULL)""")
    db.execute("CREATE INDEX orders_merchant ON orders(merchant_id, eligible)")
    db.execute("""
        CREATE TABLE batches (
            batch_id TEXT PRIMARY KEY, operator TEXT NOT NULL, created_at TEXT NOT NULL,
            approved_set_sha256 TEXT NOT NULL, approved_json TEXT NOT NULL,
            status TEXT NOT NULL, finished_at TEXT)""")
    db.execute("""
        CREATE TABLE intents (
            idempotency_key TEXT PRIMARY KEY, batch_id TEXT NOT NULL, merchant_id TEXT NOT NULL,
            order_id TEXT NOT NULL, location_id TEXT NOT NULL, version INTEGER NOT NULL,
            amount INTEGER, currency TEXT, consent_id TEXT, consent_sha256 TEXT,
            operator TEXT NOT NULL, created_at TEXT NOT NULL, body_json TEXT NOT NULL,
            outcome TEXT, reason TEXT, square_code TEXT, detail TEXT, settled_at TEXT)""")
    db.execute("CREATE INDEX intents_open ON intents(outcome) WHERE outcome IS NULL")
    db.execute("CREATE INDEX intents_batch ON intents(batch_id)")
    db.execute("""
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY, at TEXT NOT NULL, operator TEXT NOT NULL,
            action TEXT NOT NULL, merchant_id TEXT, order_id TEXT, version INTEGER,
            amount INTEGER, currency TEXT, consent_id TEXT, consent_sha256 TEXT,
            batch_id TEXT, approved_set_sha256 TEXT, idempotency_key TEXT, outcome TEXT,
            square_code TEXT, detail TEXT, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""")
    # Append-only: the database itself refuses changes to history.
    db.execute("""CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
                  BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END""")
    db.execute("""CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
                  BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END""")


@migrations()
def m002_consent_revocations(db: Database) -> None:
    # Revocation is final: kept apart from the record versions, which a later import could
    # replace, and append-only. A consent id is revoked from its earliest revoked_at on.
    db.execute("""
        CREATE TABLE consent_revocations (
            seq INTEGER PRIMARY KEY, consent_id TEXT NOT NULL, merchant_id TEXT NOT NULL,
            revoked_at TEXT NOT NULL, revoked_by TEXT NOT NULL, reason TEXT NOT NULL,
            recorded_at TEXT NOT NULL, operator TEXT NOT NULL, source TEXT)""")
    db.execute("CREATE INDEX consent_revocations_id ON consent_revocations(consent_id)")
    db.execute("""CREATE TRIGGER consent_revocations_no_update BEFORE UPDATE ON
                  consent_revocations BEGIN SELECT RAISE(ABORT, 'revocations are final'); END""")
    db.execute("""CREATE TRIGGER consent_revocations_no_delete BEFORE DELETE ON
                  consent_revocations BEGIN SELECT RAISE(ABORT, 'revocations are final'); END""")
    # Databases from before: every version that ever carried a revocation still counts.
    for row in db.execute("SELECT consent_id, merchant_id, record_json, imported_at, "
                          "imported_by, source FROM consents ORDER BY rowid").fetchall():
        revocation = orjson.loads(row[2]).get("revocation")
        if revocation:
            db.execute("INSERT INTO consent_revocations (consent_id, merchant_id, revoked_at, "
                       "revoked_by, reason, recorded_at, operator, source) VALUES "
                       "(?, ?, ?, ?, ?, ?, ?, ?)",
                       [row[0], row[1], utc_text(Revocation.model_validate(revocation)
                                                 .revoked_at),
                        revocation["revoked_by"], revocation["reason"], row[3], row[4],
                        row[5]])


@migrations()
def m003_intent_attempts_and_leases(db: Database) -> None:
    """Every attempt at an order is its own intent row (the old table was keyed by the
    idempotency key, so a retry's INSERT OR IGNORE left no row for `recover` to find), and a
    merchant is worked on by one holder at a time (`leases`)."""
    db.execute("""
        CREATE TABLE intents_v3 (
            intent_id TEXT PRIMARY KEY, attempt INTEGER NOT NULL,
            idempotency_key TEXT NOT NULL, batch_id TEXT NOT NULL, merchant_id TEXT NOT NULL,
            order_id TEXT NOT NULL, location_id TEXT NOT NULL, version INTEGER NOT NULL,
            amount INTEGER, currency TEXT, consent_id TEXT, consent_sha256 TEXT,
            operator TEXT NOT NULL, created_at TEXT NOT NULL, body_json TEXT NOT NULL,
            outcome TEXT, reason TEXT, square_code TEXT, detail TEXT, settled_at TEXT,
            UNIQUE (order_id, version, attempt))""")
    db.execute("""
        INSERT INTO intents_v3 SELECT 'v1:' || idempotency_key, 1, idempotency_key, batch_id,
            merchant_id, order_id, location_id, version, amount, currency, consent_id,
            consent_sha256, operator, created_at, body_json, outcome, reason, square_code,
            detail, settled_at FROM intents""")
    db.execute("DROP TABLE intents")
    db.execute("ALTER TABLE intents_v3 RENAME TO intents")
    db.execute("CREATE INDEX intents_open ON intents(merchant_id) WHERE outcome IS NULL")
    db.execute("CREATE INDEX intents_batch ON intents(batch_id)")
    db.execute("""
        CREATE TABLE leases (
            merchant_id TEXT PRIMARY KEY, operator TEXT NOT NULL, host TEXT NOT NULL,
            pid INTEGER NOT NULL, started_at TEXT NOT NULL, heartbeat_at TEXT NOT NULL,
            expires_at TEXT NOT NULL, token TEXT NOT NULL)""")


@migrations()
def m005_reminders(db: Database) -> None:
    # One row per reminder: written (status NULL) before the SMTP transaction, settled after.
    # (merchant_id, window_index) is unique: at most one Message-ID per merchant per window.
    db.execute("""
        CREATE TABLE reminder_outbox (
            message_id TEXT PRIMARY KEY, merchant_id TEXT NOT NULL,
            window_index INTEGER NOT NULL, kind TEXT NOT NULL, recipients_json TEXT NOT NULL,
            order_ids_json TEXT NOT NULL, orders INTEGER NOT NULL, age_step INTEGER NOT NULL,
            message_eml TEXT NOT NULL, operator TEXT NOT NULL, holder TEXT NOT NULL,
            created_at TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            status TEXT, reason TEXT, detail TEXT, next_attempt_at TEXT, settled_at TEXT,
            UNIQUE (merchant_id, window_index))""")
    db.execute("CREATE INDEX reminder_outbox_open ON reminder_outbox(status) "
               "WHERE status IS NULL OR status = 'deferred'")
    db.execute("""
        CREATE TABLE reminder_opt_outs (
            merchant_id TEXT PRIMARY KEY, opted_out INTEGER NOT NULL, by TEXT NOT NULL,
            reason TEXT NOT NULL, at TEXT NOT NULL)""")


@migrations()
def m006_refresh_marks(db: Database) -> None:
    # Refresh by change (issue 11): per merchant and location, the moment the last read that
    # covered it began (`mark`) and the last full read (`full_at`); per merchant, when its
    # orders were last confirmed with Square and the consent view they were classified under.
    db.execute("""
        CREATE TABLE order_marks (
            merchant_id TEXT NOT NULL, location_id TEXT NOT NULL, mark TEXT NOT NULL,
            full_at TEXT NOT NULL, PRIMARY KEY (merchant_id, location_id))""")
    db.execute("""
        CREATE TABLE order_sync (
            merchant_id TEXT PRIMARY KEY, fetched_at TEXT NOT NULL, consent_sig TEXT)""")


@migrations()
def m007_backlog_history(db: Database) -> None:
    # One row per merchant per UTC day: the candidates by age at that day's last refresh, so
    # the merchants screen can draw the last 30 days (the orders table only holds today).
    db.execute("""
        CREATE TABLE backlog_history (
            day TEXT NOT NULL, merchant_id TEXT NOT NULL, under_1d INTEGER NOT NULL,
            d1_3 INTEGER NOT NULL, d3_7 INTEGER NOT NULL, d7_14 INTEGER NOT NULL,
            d14_plus INTEGER NOT NULL, recorded_at TEXT NOT NULL,
            rebuilt INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, merchant_id))""")


@migrations()
def m008_approvals(db: Database) -> None:
    # Four-eyes (issue 14): a batch over the threshold is stored as prepared (the exact set
    # and its hash, the totals the preparer saw), decided once by another operator (approved
    # with an expiry, or rejected), and used by at most one run.
    db.execute("""
        CREATE TABLE approvals (
            batch_id TEXT PRIMARY KEY, approved_set_sha256 TEXT NOT NULL,
            items_json TEXT NOT NULL, totals_json TEXT NOT NULL, orders INTEGER NOT NULL,
            why TEXT NOT NULL, prepared_by TEXT NOT NULL, prepared_at TEXT NOT NULL,
            status TEXT NOT NULL, decided_by TEXT, decided_at TEXT, reason TEXT,
            expires_at TEXT, used_by TEXT, used_at TEXT)""")
    db.execute("CREATE INDEX approvals_status ON approvals(status)")


# What other consoles must show without a refresh (issue 14): these tables' writes bump one
# counter that every open console polls. Heartbeats (a lease's or a session's) do not bump it.
# A row trigger costs ~5-20 us per row, so the bulk paths bump once through a companion row:
# a refresh writes its orders in the transaction that updates the merchant's row, and a batch
# inserts its intents after its `batches` row. An order deleted or re-classified bumps itself
# (completions, revocations, a token found to be another merchant's): since the migration
# change_counter_per_statement, once per statement from `SQLiteStore._changing`, as do
# settled intents.
_CHANGE_TRIGGERS = {
    "orders": ("DELETE", "UPDATE"),
    "merchants": ("INSERT", "UPDATE"),
    "intents": ("UPDATE OF outcome",),
    "batches": ("INSERT", "UPDATE OF status"),
    "consents": ("INSERT",),
    "consent_revocations": ("INSERT",),
    "leases": ("INSERT", "DELETE", "UPDATE OF token"),
    "reminder_outbox": ("INSERT", "UPDATE OF status"),
    "approvals": ("INSERT", "UPDATE OF status"),
}


@migrations()
def m009_presence(db: Database) -> None:
    """Who is online (one row per open console or running batch, heart-beaten), and the
    change counter: one row, bumped by triggers in the writer's own transaction, so a poll
    of one indexed row tells a console whether anything it shows changed. Triggers rather
    than PRAGMA data_version: that moves on every commit of any connection, heartbeats
    included (every 5 s per lease and per session), which would reload every console all
    the time; and a counter row carries over to PostgreSQL (NOTIFY from the same triggers)."""
    db.execute("""
        CREATE TABLE operator_sessions (
            session_id TEXT PRIMARY KEY, operator TEXT NOT NULL, host TEXT NOT NULL,
            pid INTEGER NOT NULL, kind TEXT NOT NULL, started_at TEXT NOT NULL,
            last_seen TEXT NOT NULL)""")
    db.execute("CREATE INDEX operator_sessions_seen ON operator_sessions(last_seen)")
    db.execute("""
        CREATE TABLE change_counter (
            id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)""")
    db.execute("INSERT INTO change_counter VALUES (1, 0)")
    for table, events in _CHANGE_TRIGGERS.items():
        for event in events:
            name = f"{table}_changed_{event.split()[0].lower()}"
            db.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} BEGIN "
                       "UPDATE change_counter SET version = version + 1 WHERE id = 1; END")


@migrations()
def orders_created_at_index(db: Database) -> None:
    """Each merchant's orders by age, in index order: one merchant's first screenful and the
    reads ordered by merchant then age need no sort, and every merchant's oldest are found
    from this index alone (`oldest_orders`). Merchant first, not created_at first: discovery
    writes a merchant at a time, and an index by age alone spreads each write over the whole
    index: writing 100,000 orders took +63 to +150 % with it, against -3 to +24 % with this
    one, over four runs on a loaded machine (bench/orders_index.py)."""
    db.execute("CREATE INDEX orders_merchant_created_at ON orders(merchant_id, created_at, "
               "order_id)")


@migrations()
def intents_created_at_index(db: Database) -> None:
    """Four-eyes counts an operator's recent batches that ran without approval: the intents
    of the last hour, found by time, not by reading every intent ever sent."""
    db.execute("CREATE INDEX intents_created_at ON intents(created_at)")


@migrations()
def change_counter_per_statement(db: Database) -> None:
    """The writes a completion makes for every order (an intent settled, a completed order
    dropped) bump the change counter once per statement from the store's code
    (`SQLiteStore._changing`), not once per row from a trigger: one bump per group commit
    tells a console as much as a hundred. Only `SQLiteStore` writes these tables."""
    for name in ("orders_changed_delete", "orders_changed_update", "intents_changed_update"):
        db.execute(f"DROP TRIGGER IF EXISTS {name}")


@migrations()
def merchant_token_sha256(db: Database) -> None:
    """A SHA-256 of the access token Square last said is this merchant's, and of that
    Square's address (never the token; `SquareGateway.confirmation_sha256`):
    a later refresh with the same token asks for its scopes and orders at once, a round
    trip less per merchant (issue 11), since a token's owner never changes."""
    db.execute("ALTER TABLE merchants ADD COLUMN token_sha256 TEXT")


@migrations()
def orders_merchant_candidates(db: Database) -> None:
    """The backlog's counts by age (`candidates_by_age`) from the index alone: created_at
    beside (merchant_id, eligible), not a table row looked up per candidate. 100,000 orders:
    ~95 -> ~30 ms at every refresh."""
    db.execute("DROP INDEX orders_merchant")
    db.execute("CREATE INDEX orders_merchant ON orders(merchant_id, eligible, created_at)")


_INTENT_COLUMNS = ", ".join(INTENT_COLUMNS)
_QUEUED_COLUMNS = ("o.order_id, o.merchant_id, o.location_id, o.version, o.state, o.source, "
                   "o.reference_id, o.total_amount, o.currency, o.due_amount, o.created_at, "
                   "o.eligible, o.reason, o.detail, o.consent_id, o.fulfillments, "
                   # A refresh by change confirms unchanged orders without rewriting them.
                   "MAX(o.seen_at, COALESCE(s.fetched_at, o.seen_at))")
_QUEUED_FROM = "orders o LEFT JOIN order_sync s ON s.merchant_id = o.merchant_id"
# One `queue --json` order as JSON text, made by SQLite's json_object: keys in the order of the
# document interfaces.md describes; `json('true')` is a JSON boolean, not the string "true".
# {stale}: a placeholder per merchant not refreshed just now (usually none: a row then tests
# nothing); bound one by one, not as a JSON array: json_each cuts text at a NUL.
_QUEUED_JSON = (
    "json_object('merchant_id', o.merchant_id, 'order_id', o.order_id, "
    "'location_id', o.location_id, 'version', o.version, 'state', o.state, "
    "'source', o.source, "
    "'total_money', json_object('amount', o.total_amount, 'currency', o.currency), "
    "'net_amount_due_money', json_object('amount', o.due_amount, 'currency', o.currency), "
    "'created_at', o.created_at, "
    "'eligible', json(CASE WHEN o.eligible THEN 'true' ELSE 'false' END), 'reason', o.reason, "
    "'stale', json(CASE WHEN {stale} THEN 'true' ELSE 'false' END), "
    "'fetched_at', MAX(o.seen_at, COALESCE(s.fetched_at, o.seen_at)))")
_INSERT_ORDER = (f"INSERT OR REPLACE INTO orders ({', '.join(ORDER_COLUMNS)}) VALUES "
                 f"({', '.join('?' for _ in ORDER_COLUMNS)})")


def _refuse_foreign(conn: sqlite3.Connection, path: Path | str) -> None:
    """Our database, or a new (empty) one: never migrate another application's file."""
    try:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        ours = "_sqlite_migrations" in tables and conn.execute(
            "SELECT 1 FROM _sqlite_migrations WHERE migration_set = ? LIMIT 1",
            (migrations.name,)).fetchone() is not None
    except sqlite3.OperationalError as error:  # a full disk, a lock, an unreadable file
        conn.close()
        raise ConfigurationError(f"{path}: cannot open the database ({error}): check the "
                                 "disk and the file, then retry.") from None
    except sqlite3.DatabaseError as error:
        conn.close()
        raise ConfigurationError(f"{path}: not a SQLite database ({error}): give --db this "
                                 "console's database file, or a new path.") from None
    if tables and not ours:
        conn.close()
        raise ConfigurationError(f"{path}: a SQLite database of another application (tables "
                                 f"{', '.join(sorted(tables)[:3])}...), left untouched: give "
                                 "--db this console's database file, or a new path.")


class SQLiteStore(Store):
    """One SQLite file. Use one store per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: Path | str, *, migrate: bool = True) -> None:
        self.path = Path(path) if path != ":memory:" else path
        self.location = self.path
        if isinstance(self.path, Path) and migrate:
            # Only the default location's directory is made: elsewhere a missing directory is
            # a typo, and SQLite then refuses rather than start an empty database.
            if self.path.parent == default_db_path().parent:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.path.parent.is_dir():
                create_private(self.path)
        # Made in one thread (the demo builds it in a worker), then used by one at a time.
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=_BUSY_TIMEOUT_S,
                               check_same_thread=False)
        # No sqlite-utils plugin is handed our connection (its `prepare_connection` could
        # read every table or register SQL functions our queries would call), and none is
        # looked for: that read every installed package's metadata, ~20 ms a start.
        self.db = Database(conn, execute_plugins=False)
        if migrate:
            _refuse_foreign(conn, path)  # before anything is written into it
        # Pages of 16 KB, not 4: a discovery of 100,000 orders writes a quarter as many log
        # frames (each written and checksummed on its own), ~0.3 s less CPU, and reads were
        # no slower (issue 11). Takes effect only in a new, empty database; one made before
        # keeps its size.
        self.db.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        if isinstance(self.path, Path):
            self.db.execute("PRAGMA journal_mode=WAL")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self.autocheckpoint = max(1, _AUTOCHECKPOINT_BYTES // page_size)
        self.db.execute(f"PRAGMA wal_autocheckpoint={self.autocheckpoint}")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        if migrate:
            migrations.apply(self.db)

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time, durable on return."""
        _begin_immediate(self.conn)
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def cache_transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction for what can be read from Square again (discovered orders, merchant
        profiles): committed without waiting for the disk. In WAL mode that is still atomic,
        and the next `transaction()` commit (synchronous=FULL) makes it durable too, because
        the log is written in order. 200 merchants: 200 fsyncs less (issue 11).
        Nor does it checkpoint: copying the log into the database (and syncing both) every
        4 MB stalled the event loop for seconds of a 100,000-order discovery; the next
        `transaction()` commit, or closing, checkpoints once."""
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        try:
            with self.transaction() as conn:
                yield conn
        finally:
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute(f"PRAGMA wal_autocheckpoint={self.autocheckpoint}")

    @contextmanager
    def large_writes(self) -> Iterator[None]:
        """A page cache of up to 32 MB meanwhile (2 MB by default): a discovery's commits
        touch most of the order_id index (random ids), which then stays in memory rather
        than being read back from the log for every commit (issue 11)."""
        pages = self.conn.execute("PRAGMA cache_size").fetchone()[0]
        self.conn.execute("PRAGMA cache_size = -32768")
        try:
            yield
        finally:
            self.conn.execute(f"PRAGMA cache_size = {int(pages)}")

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ consents
    def save_consent(self, record: ConsentRecord, document: dict[str, Any], operator: str,
                     source: str) -> tuple[str, int]:
        """Store a record; returns ('unchanged' | 'new' | 'new_version', version)."""
        digest = record_sha256(document)
        row = self.conn.execute(
            "SELECT version, record_sha256 FROM consents WHERE consent_id = ? "
            "ORDER BY version DESC LIMIT 1", [record.consent_id]).fetchone()
        if row is not None and row[1] == digest:
            return "unchanged", int(row[0])
        version = 1 if row is None else int(row[0]) + 1
        self.conn.execute(
            "INSERT INTO consents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [record.consent_id, version, record.merchant_id,
             orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode(), digest,
             utc_text(), operator, source])
        return ("new" if row is None else "new_version"), version

    def _latest_consent_rows(self, merchant_id: str | None) -> list[tuple[Any, ...]]:
        sql = ("SELECT c.* FROM consents c JOIN (SELECT consent_id, MAX(version) v FROM consents "
               "GROUP BY consent_id) l ON c.consent_id = l.consent_id AND c.version = l.v")
        params: list[Any] = []
        if merchant_id is not None:
            sql += " WHERE c.merchant_id = ?"
            params.append(merchant_id)
        return self.conn.execute(sql + " ORDER BY c.merchant_id, c.consent_id", params
                                 ).fetchall()

    def latest_consent_sha256(self, consent_id: str) -> str | None:
        row = self.conn.execute("SELECT record_sha256 FROM consents WHERE consent_id = ? "
                                "ORDER BY version DESC LIMIT 1", [consent_id]).fetchone()
        return str(row[0]) if row else None

    def consent_merchant_id(self, consent_id: str) -> str | None:
        """The merchant a consent id was first stored for (an id never moves to another)."""
        row = self.conn.execute("SELECT merchant_id FROM consents WHERE consent_id = ? "
                                "ORDER BY version LIMIT 1", [consent_id]).fetchone()
        return str(row[0]) if row else None

    def revocations(self) -> dict[str, Revocation]:
        """Every revoked consent id and its earliest revocation (which is the one in force)."""
        result: dict[str, Revocation] = {}
        for consent_id, revoked_at, revoked_by, reason in self.conn.execute(
                "SELECT consent_id, revoked_at, revoked_by, reason FROM consent_revocations "
                "ORDER BY revoked_at DESC, seq DESC"):
            result[consent_id] = Revocation(revoked_at=revoked_at, revoked_by=revoked_by,
                                            reason=reason)
        return result

    def record_revocation(self, record: ConsentRecord, operator: str, source: str) -> None:
        """Keep `record.revocation` for good; call inside the transaction that stores it.
        Nothing to add when the id is already revoked at or before that moment."""
        revocation = record.revocation
        assert revocation is not None
        revoked_at = utc_text(revocation.revoked_at)
        earlier = self.conn.execute(
            "SELECT 1 FROM consent_revocations WHERE consent_id = ? AND revoked_at <= ?",
            [record.consent_id, revoked_at]).fetchone()
        if earlier is None:
            self.conn.execute(
                "INSERT INTO consent_revocations (consent_id, merchant_id, revoked_at, "
                "revoked_by, reason, recorded_at, operator, source) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?)",
                [record.consent_id, record.merchant_id, revoked_at, revocation.revoked_by,
                 revocation.reason, utc_text(), operator, source])

    def consents_revision(self) -> int:
        """Grows whenever a consent version or a revocation is added (both tables only grow)."""
        row = self.conn.execute(
            "SELECT (SELECT COALESCE(MAX(rowid), 0) FROM consents) + "
            "(SELECT COALESCE(MAX(seq), 0) FROM consent_revocations)").fetchone()
        return int(row[0])

    def consent_versions(self, consent_id: str) -> int:
        row = self.conn.execute("SELECT COUNT(*) FROM consents WHERE consent_id = ?",
                                [consent_id]).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ merchants
    def upsert_merchant(self, row: dict[str, Any]) -> None:
        """Insert, or update the columns given; one statement, so it can join a transaction."""
        columns = list(row)
        self.conn.execute(
            f"INSERT INTO merchants ({', '.join(columns)}) VALUES "
            f"({', '.join('?' for _ in columns)}) ON CONFLICT (merchant_id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in columns if c != "merchant_id"),
            [row[c] for c in columns])

    def merchants(self) -> list[dict[str, Any]]:
        return list(self.db["merchants"].rows_where(order_by="merchant_id"))

    def merchant(self, merchant_id: str) -> dict[str, Any] | None:
        # Plain SQL: sqlite-utils' rows_where first lists the schema's tables and views (a
        # refresh asks once per merchant).
        cursor = self.conn.execute("SELECT * FROM merchants WHERE merchant_id = ?",
                                   [merchant_id])
        row = cursor.fetchone()
        return dict(zip([c[0] for c in cursor.description], row, strict=True)) if row else None

    # ------------------------------------------------------------------ orders
    def replace_orders(self, merchant_id: str, rows: list[dict[str, Any]]) -> None:
        """What discovery saw for a merchant replaces what was there."""
        with self.transaction() as conn:
            self._changing("DELETE FROM orders WHERE merchant_id = ?", [[merchant_id]])
            if rows:
                columns = list(rows[0])
                # OR REPLACE: an order id is Square's, unique across merchants; a row left under
                # another merchant id (read through a mis-filed token) moves to its owner.
                conn.executemany(
                    f"INSERT OR REPLACE INTO orders ({', '.join(columns)}) VALUES "
                    f"({', '.join('?' for _ in columns)})",
                    [[row[c] for c in columns] for row in rows])

    # The methods below write one merchant's refresh; call them inside one `transaction()`.
    def write_orders(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows in `ORDER_COLUMNS` order, in one executemany. OR REPLACE: an order id is
        Square's, unique across merchants (see `replace_orders`)."""
        if rows:
            self.conn.executemany(_INSERT_ORDER, rows)

    def drop_orders(self, merchant_id: str, *, keep_locations: Sequence[str] | None = None,
                    at_locations: Sequence[str] | None = None,
                    order_ids: Sequence[str] | None = None) -> None:
        """Delete the merchant's orders: those outside `keep_locations`, those at
        `at_locations`, or those named."""
        if keep_locations is not None:
            self._changing(
                f"DELETE FROM orders WHERE merchant_id = ? AND location_id NOT IN "
                f"({', '.join('?' for _ in keep_locations)})", [[merchant_id, *keep_locations]])
        if at_locations:
            self._changing(
                f"DELETE FROM orders WHERE merchant_id = ? AND location_id IN "
                f"({', '.join('?' for _ in at_locations)})", [[merchant_id, *at_locations]])
        if order_ids:
            self._changing("DELETE FROM orders WHERE merchant_id = ? AND order_id = ?",
                           [(merchant_id, order_id) for order_id in order_ids])

    def orders_json(self, merchant_id: str, reason: str | None = None
                    ) -> list[tuple[str, str]]:
        """(order_id, order_json) of the merchant's orders, optionally only those with a
        given reason."""
        sql = "SELECT order_id, order_json FROM orders WHERE merchant_id = ?"
        params = [merchant_id]
        if reason is not None:
            # Only ineligible orders have a reason: the (merchant_id, eligible) index then
            # reads those rows alone, not all of the merchant's (issue 11: every refresh).
            sql += " AND eligible = 0 AND reason = ?"
            params.append(reason)
        return [(str(r[0]), r[1]) for r in self.conn.execute(sql, params)]

    def update_verdicts(self, rows: Sequence[tuple[int, str | None, str, str | None, str]]
                        ) -> None:
        """(eligible, reason, detail, consent_id, order_id) for orders classified anew."""
        self._changing("UPDATE orders SET eligible = ?, reason = ?, detail = ?, "
                       "consent_id = ? WHERE order_id = ?", rows)

    def order_marks(self, merchant_id: str) -> dict[str, tuple[str, str]]:
        """location_id -> (mark, full_at) of the merchant's last refreshes."""
        return {str(r[0]): (str(r[1]), str(r[2])) for r in self.conn.execute(
            "SELECT location_id, mark, full_at FROM order_marks WHERE merchant_id = ?",
            [merchant_id])}

    def save_order_marks(self, merchant_id: str, marks: dict[str, tuple[str, str]]) -> None:
        """Replace the merchant's marks (a location left out has none: read it in full)."""
        self.conn.execute("DELETE FROM order_marks WHERE merchant_id = ?", [merchant_id])
        self.conn.executemany("INSERT INTO order_marks VALUES (?, ?, ?, ?)",
                              [(merchant_id, loc, mark, full_at)
                               for loc, (mark, full_at) in marks.items()])

    def order_sync(self, merchant_id: str) -> tuple[str, str | None] | None:
        """(fetched_at, consent_sig) of the merchant's last refresh, if any."""
        row = self.conn.execute("SELECT fetched_at, consent_sig FROM order_sync "
                                "WHERE merchant_id = ?", [merchant_id]).fetchone()
        return (str(row[0]), row[1]) if row else None

    def save_order_sync(self, merchant_id: str, fetched_at: str, consent_sig: str | None
                        ) -> None:
        self.conn.execute("INSERT OR REPLACE INTO order_sync VALUES (?, ?, ?)",
                          [merchant_id, fetched_at, consent_sig])

    def merchant_order_counts(self, merchant_id: str) -> tuple[int, int]:
        """(open orders, eligible ones) stored for the merchant."""
        row = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(eligible), 0) FROM orders "
                                "WHERE merchant_id = ?", [merchant_id]).fetchone()
        return int(row[0]), int(row[1])

    def queued_orders(self, merchant_id: str | None = None, eligible_only: bool = False,
                      ordered: bool = True) -> list[QueuedOrder]:
        sql = f"SELECT {_QUEUED_COLUMNS} FROM {_QUEUED_FROM} WHERE 1=1"
        params: list[Any] = []
        if merchant_id is not None:
            sql += " AND o.merchant_id = ?"
            params.append(merchant_id)
        if eligible_only:
            sql += " AND o.eligible = 1"
        if ordered:  # the console sorts for itself
            sql += " ORDER BY o.merchant_id, o.created_at, o.order_id"
        return list(starmap(QueuedOrder, self.conn.execute(sql, params)))

    def queued_orders_json(self, refreshed: Sequence[str], eligible_only: bool = False,
                           merchant_ids: Sequence[str] | None = None, chunk: int = 5000
                           ) -> Iterator[list[bytes]]:
        fresh = set(refreshed)
        stale = [merchant_id for (merchant_id,) in self.conn.execute(
            "SELECT DISTINCT merchant_id FROM orders") if merchant_id not in fresh]
        # As bytes (BLOB): written as they come, no text decoded and encoded again.
        test = f"o.merchant_id IN ({', '.join('?' * len(stale))})"
        sql = (f"SELECT CAST({_QUEUED_JSON.format(stale=test)} AS BLOB) FROM {_QUEUED_FROM} "
               "WHERE 1=1")
        params: list[Any] = stale
        if merchant_ids is not None:
            sql += f" AND o.merchant_id IN ({', '.join('?' * len(merchant_ids))})"
            params.extend(merchant_ids)
        if eligible_only:
            sql += " AND o.eligible = 1"
        cursor = self.conn.execute(sql + " ORDER BY o.merchant_id, o.created_at, o.order_id",
                                   params)
        while rows := cursor.fetchmany(chunk):
            yield [row[0] for row in rows]

    def queued_orders_json_joined(self, merchants: Sequence[tuple[str, bool]], separator: str,
                                  eligible_only: bool = False) -> bytes:
        """`queued_orders_json`'s objects of these merchants, each given with whether it is
        stale, in this order, joined by `separator` in one text, by SQLite. A thread building
        `queue --json` beside the event loop then takes the GIL once, not once an order
        (where it waited each time the loop held it, and the loop then waited for the
        thread to be scheduled: seconds for 100,000 orders on a busy machine; issue 11)."""
        if len(merchants) > 500:  # SQLite's limit of 32,766 parameters, far off
            return separator.encode().join(part for part in (
                self.queued_orders_json_joined(merchants[start:start + 500], separator,
                                               eligible_only)
                for start in range(0, len(merchants), 500)) if part)
        if not merchants:
            return b""
        # A merchant's objects: the ORDER BY of a subquery is kept under an aggregate (SQLite
        # never flattens one into an aggregate query; tests/test_queue_output.py compares).
        # The merchants': in the order SQLite reads them, told by `k` (in the order given).
        sql = (f"WITH m(k, id, stale) AS (VALUES "
               f"{', '.join(f'({k}, ?, ?)' for k in range(len(merchants)))}) "
               "SELECT group_concat(k), CAST(group_concat(part, ?) AS BLOB) FROM (SELECT m.k AS k, "
               f"(SELECT group_concat(j, ?) FROM (SELECT {_QUEUED_JSON.format(stale='m.stale')} "
               f"AS j FROM {_QUEUED_FROM} WHERE o.merchant_id = m.id"
               f"{' AND o.eligible = 1' if eligible_only else ''} "
               "ORDER BY o.created_at, o.order_id)) AS part FROM m)")
        params: list[Any] = [value for merchant_id, stale in merchants
                             for value in (merchant_id, int(stale))]
        order, joined = self.conn.execute(sql, [*params, separator, separator]).fetchone()
        if order != ",".join(map(str, range(len(merchants)))):  # read in another order
            return separator.encode().join(part for part in (
                self.queued_orders_json_joined([merchant], separator, eligible_only)
                for merchant in merchants) if part)
        return joined or b""

    def merchants_with_orders(self) -> list[str]:
        return sorted(row[0] for row in self.conn.execute(
            "SELECT DISTINCT merchant_id FROM orders"))

    def oldest_orders(self, merchant_id: str | None = None, limit: int = 200
                      ) -> list[QueuedOrder]:
        sql = f"SELECT {_QUEUED_COLUMNS} FROM {_QUEUED_FROM}"
        params: list[Any] = []
        if merchant_id is not None:
            sql += " WHERE o.merchant_id = ?"
            params.append(merchant_id)
        else:
            # The oldest of every merchant: picked from the covering index (narrow entries),
            # not by reading every row with its order_json (~60 ms -> ~20 ms at 100,000).
            sql += (" WHERE o.rowid IN (SELECT rowid FROM orders ORDER BY created_at, order_id "
                    "LIMIT ?)")
            params.append(limit)
        sql += " ORDER BY o.created_at, o.order_id LIMIT ?"
        return list(starmap(QueuedOrder, self.conn.execute(sql, [*params, limit])))

    def candidate_created_at(self, merchant_id: str) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT created_at FROM orders WHERE merchant_id = ? AND eligible = 1",
            [merchant_id])]

    def candidates_by_age(self, merchant_ids: Sequence[str], edges: Sequence[str]
                          ) -> dict[str, tuple[int, ...] | None]:
        if not merchant_ids:
            return {}
        if len(edges) <= _EDGES_SUMMED:
            return self._candidates_summed(merchant_ids, edges)
        passed, params = edges_passed(edges)
        rows = self.conn.execute(
            f"SELECT merchant_id, {passed}, count(*), "
            f"sum(created_at GLOB '{SQUARE_TIME_GLOB}') FROM orders WHERE eligible = 1 "
            f"AND merchant_id IN ({', '.join('?' * len(merchant_ids))}) GROUP BY 1, 2",
            [*params, *merchant_ids])
        return counts_at_edges(rows, edges)

    def _candidates_summed(self, merchant_ids: Sequence[str], edges: Sequence[str]
                           ) -> dict[str, tuple[int, ...] | None]:
        """`candidates_by_age` for a refresh's few edges: a sum per edge, in one pass of the
        index in its own order (merchant_id, eligible, created_at), no grouping by edge
        passed (~30 against ~95 ms over 100,000 orders)."""
        sums = "".join(", sum(created_at <= ?)" for _ in edges)
        rows = self.conn.execute(
            f"SELECT merchant_id, count(*), sum(created_at GLOB '{SQUARE_TIME_GLOB}'){sums} "
            "FROM orders WHERE eligible = 1 "
            f"AND merchant_id IN ({', '.join('?' * len(merchant_ids))}) GROUP BY 1",
            [*edges, *merchant_ids])
        return {row[0]: None if row[2] != row[1] else (row[1], *row[3:]) for row in rows}

    def order_json(self, order_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT order_json FROM orders WHERE order_id = ?",
                                [order_id]).fetchone()
        return order_document(row[0]) if row else None

    # ------------------------------------------------------------------ batches and intents
    # The intent journal's SQL. Callers that pass no connection run inside a transaction they
    # opened (`with store.transaction()`), so the audit entry commits with the row.
    def insert_batch(self, batch_id: str, operator: str, approved_sha256: str,
                     approved_json: str) -> None:
        self.conn.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, 'running', NULL)",
                          [batch_id, operator, utc_text(), approved_sha256, approved_json])

    def finish_batch(self, batch_id: str, status: str) -> None:
        self.conn.execute("UPDATE batches SET status = ?, finished_at = ? WHERE batch_id = ?",
                          [status, utc_text(), batch_id])

    def next_attempts(self, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The next attempt number of many (order, version) pairs, in one query per 500."""
        found: dict[tuple[str, int], int] = {}
        for start in range(0, len(pairs), 500):
            chunk = pairs[start:start + 500]
            rows = self.conn.execute(
                "SELECT order_id, version, MAX(attempt) FROM intents WHERE order_id IN "
                f"({', '.join('?' for _ in chunk)}) GROUP BY order_id, version",
                [order_id for order_id, _ in chunk]).fetchall()
            found.update({(r[0], r[1]): r[2] for r in rows})
        return {pair: found.get(pair, 0) + 1 for pair in pairs}

    def insert_intents(self, rows: list[dict[str, Any]]) -> None:
        self.conn.executemany(
            f"INSERT INTO intents ({_INTENT_COLUMNS}) VALUES "
            f"({', '.join('?' for _ in INTENT_COLUMNS)})",
            [[row[n] for n in INTENT_COLUMNS] for row in rows])

    def settle_intent(self, intent_id: str, outcome: str, reason: str | None,
                      square_code: str | None, detail: str) -> None:
        """Only an open intent is settled: a second writer never overwrites an outcome."""
        self.settle_intents([(intent_id, outcome, reason, square_code, detail)])

    def settle_intents(self, rows: Sequence[tuple[str, str, str | None, str | None, str]]
                       ) -> None:
        settled_at = utc_text()  # one statement for the group (base: one call per row)
        self._changing("UPDATE intents SET outcome = ?, reason = ?, square_code = ?, "
                       "detail = ?, settled_at = ? WHERE intent_id = ? AND outcome IS NULL",
                       [(outcome, reason, code, detail, settled_at, intent_id)
                        for intent_id, outcome, reason, code, detail in rows])

    def drop_completed_orders(self, order_ids: list[str]) -> None:
        self._changing("DELETE FROM orders WHERE order_id = ?",
                       [[order_id] for order_id in order_ids])

    def _changing(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """`sql` for each of `rows`, then one change-counter bump if a row changed, in one
        transaction (the caller's, else its own): the orders and intents tables have no
        per-row change triggers (migration change_counter_per_statement)."""
        if not self.conn.in_transaction:
            with self.transaction():
                self._changing(sql, rows)
            return
        if rows and self.conn.executemany(sql, rows).rowcount > 0:
            self.conn.execute("UPDATE change_counter SET version = version + 1 WHERE id = 1")

    def writer(self) -> SQLiteStore | None:
        """A second connection to the same file for the completion journal's writer thread
        (group commits off the event loop); None for an in-memory database, which has no
        second connection. Same durability: WAL, synchronous=FULL."""
        if not isinstance(self.path, Path):
            return None
        return SQLiteStore(self.path, migrate=False)

    def for_thread(self) -> SQLiteStore:
        return SQLiteStore(self.path, migrate=False)

    def commit_group(self, parts: Sequence[Callable[[Store], None]]
                     ) -> list[BaseException | None]:
        conn = self.conn
        errors: list[BaseException | None] = [None] * len(parts)
        try:
            _begin_immediate(conn)
            try:
                for index, part in enumerate(parts):
                    conn.execute("SAVEPOINT part")
                    try:
                        part(self)
                    except sqlite3.Error as error:
                        conn.execute("ROLLBACK TO part")
                        errors[index] = error
                    conn.execute("RELEASE part")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as error:  # the commit itself failed: none of it is durable
            return [error] * len(parts)
        return errors

    def open_intents(self, merchant_id: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {_INTENT_COLUMNS} FROM intents WHERE outcome IS NULL"
        params: list[Any] = []
        if merchant_id is not None:
            sql += " AND merchant_id = ?"
            params.append(merchant_id)
        cursor = self.conn.execute(sql + " ORDER BY created_at, attempt", params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def open_intent_count(self) -> int:
        row = self.conn.execute("SELECT COUNT(*) FROM intents WHERE outcome IS NULL")
        return int(row.fetchone()[0])

    def recent_batches(self, merchant_id: str, limit: int = 5) -> list[dict[str, Any]]:
        """The merchant's last batches, newest first, with each outcome's count."""
        cursor = self.conn.execute(
            "SELECT i.batch_id, b.created_at, b.operator, b.status, "
            "SUM(i.outcome = 'completed'), SUM(i.outcome = 'skipped'), "
            "SUM(i.outcome = 'failed'), SUM(i.outcome IS NULL) "
            "FROM intents i JOIN batches b ON b.batch_id = i.batch_id "
            "WHERE i.merchant_id = ? GROUP BY i.batch_id ORDER BY b.created_at DESC LIMIT ?",
            [merchant_id, limit])
        names = ("batch_id", "created_at", "operator", "status", "completed", "skipped",
                 "failed", "open")
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # ------------------------------------------------------------------ backlog history
    def record_backlog(self, rows: list[tuple[str, str, tuple[int, int, int, int, int]]],
                       recorded_at: str, rebuilt: bool = False) -> None:
        """(day, merchant, counts) snapshots. A refresh replaces that day's row; a rebuilt
        day never replaces a recorded one."""
        verb = "INSERT OR IGNORE" if rebuilt else "INSERT OR REPLACE"
        with self.transaction() as conn:
            conn.executemany(f"{verb} INTO backlog_history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [[day, merchant_id, *counts, recorded_at, int(rebuilt)]
                              for day, merchant_id, counts in rows])

    def has_backlog_history(self, merchant_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM backlog_history WHERE merchant_id = ? LIMIT 1",
                                 [merchant_id]).fetchone() is not None

    def backlog_history(self, merchant_id: str, since_day: str
                        ) -> dict[str, tuple[tuple[int, int, int, int, int], bool]]:
        """Day -> (counts by age, whether the day was rebuilt rather than recorded)."""
        rows = self.conn.execute(
            "SELECT day, under_1d, d1_3, d3_7, d7_14, d14_plus, rebuilt FROM backlog_history "
            "WHERE merchant_id = ? AND day >= ? ORDER BY day", [merchant_id, since_day])
        return {row[0]: ((row[1], row[2], row[3], row[4], row[5]), bool(row[6]))
                for row in rows.fetchall()}

    # ------------------------------------------------------------------ leases
    def take_lease(self, lease: Lease, free: Callable[[Lease], bool]) -> Lease:
        """Atomically take `lease` unless another holder's lease is in force (`free` says
        whether a found lease's holder is gone). Returns the lease in force afterwards."""
        return self.take_leases([lease], free)[0]

    def take_leases(self, leases: Sequence[Lease], free: Callable[[Lease], bool]
                    ) -> list[Lease]:
        in_force: list[Lease] = []
        with self.transaction() as conn:
            for lease in leases:
                row = conn.execute("SELECT * FROM leases WHERE merchant_id = ?",
                                   [lease.merchant_id]).fetchone()
                if row is not None:
                    current = Lease(*row)
                    if current.token != lease.token and not free(current):
                        in_force.append(current)
                        continue
                conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             list(lease))
                in_force.append(lease)
        return in_force

    def heartbeat_leases(self, token: str, heartbeat_at: str, expires_at: str
                         ) -> set[str]:
        """Extend every lease this holder still has; returns their merchant ids."""
        with self.transaction() as conn:
            rows = conn.execute("UPDATE leases SET heartbeat_at = ?, expires_at = ? "
                                "WHERE token = ? RETURNING merchant_id",
                                [heartbeat_at, expires_at, token]).fetchall()
        return {r[0] for r in rows}

    def release_lease(self, merchant_id: str, token: str) -> None:
        self.release_leases([merchant_id], token)

    def release_leases(self, merchant_ids: Sequence[str], token: str) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM leases WHERE merchant_id = ? AND token = ?",
                             [[merchant_id, token] for merchant_id in merchant_ids])

    def leases(self) -> list[Lease]:
        return [Lease(*row) for row in self.conn.execute(
            "SELECT * FROM leases ORDER BY merchant_id").fetchall()]

    # ------------------------------------------------------------------ more orders
    def order_documents(self, merchant_id: str) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT order_json, seen_at FROM orders WHERE merchant_id = ?", [merchant_id])]

    def waiting_orders(self, reasons: Sequence[str]) -> list[tuple[Any, ...]]:
        marks = ", ".join("?" for _ in reasons)
        return self.conn.execute(
            "SELECT merchant_id, order_id, location_id, reference_id, created_at, "
            "total_amount, currency, reason FROM orders WHERE eligible = 0 AND state = "
            f"'OPEN' AND reason IN ({marks})", list(reasons)).fetchall()

    # ------------------------------------------------------------------ audit
    def append_audit(self, build: AuditBuilder) -> list[dict[str, Any]]:
        if not self.conn.in_transaction:
            with self.transaction():
                return self._append_audit(build)
        return self._append_audit(build)

    def _append_audit(self, build: AuditBuilder) -> list[dict[str, Any]]:
        # Inside BEGIN IMMEDIATE: the write lock is ours, so the head cannot move meanwhile.
        last = self.audit_last()
        entries = build(*(last or (0, None)))
        self.conn.executemany(
            f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) VALUES "
            f"({', '.join('?' for _ in AUDIT_COLUMNS)})",
            [[entry[k] for k in AUDIT_COLUMNS] for entry in entries])
        return entries

    def _stream(self, sql: str, params: Sequence[Any], size: int
                ) -> Iterator[tuple[Any, ...]]:
        cursor = self.conn.execute(sql, params)
        while rows := cursor.fetchmany(size):
            yield from rows

    def audit_rows(self, first: int, end: int | None) -> Iterator[tuple[Any, ...]]:
        sql = f"SELECT {', '.join(AUDIT_VERIFY_COLUMNS)} FROM audit WHERE seq >= ?"
        params: list[int] = [first]
        if end is not None:
            sql += " AND seq < ?"
            params.append(end)
        return self._stream(sql + " ORDER BY seq", params, 10000)

    def audit_extent(self) -> tuple[int, int]:
        row = self.conn.execute("SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM audit").fetchone()
        return int(row[0]), int(row[1])

    def audit_hash_at(self, seq: int) -> str | None:
        row = self.conn.execute("SELECT hash FROM audit WHERE seq = ?", [seq]).fetchone()
        return str(row[0]) if row else None

    def audit_last(self) -> tuple[int, str] | None:
        row = self.conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
                                ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    # ------------------------------------------------------------------ reminders
    def reminders_last_sent(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self.conn.execute(
            "SELECT merchant_id, MAX(settled_at) FROM reminder_outbox WHERE status = 'sent' "
            "GROUP BY merchant_id")}

    def reminder_heads(self) -> tuple[list[tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
        latest = self.conn.execute(
            "SELECT merchant_id, message_id, window_index, created_at, status, next_attempt_at "
            "FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY merchant_id ORDER BY created_at "
            "DESC) AS n FROM reminder_outbox) WHERE n = 1").fetchall()
        sent = {row[0]: row for row in self.conn.execute(
            "SELECT merchant_id, settled_at, order_ids_json, age_step FROM (SELECT *, "
            "ROW_NUMBER() OVER (PARTITION BY merchant_id ORDER BY created_at DESC) AS n FROM "
            "reminder_outbox WHERE status = 'sent') WHERE n = 1")}
        return latest, sent

    def reminder_opt_outs(self) -> list[tuple[str, str, str]]:
        return self.conn.execute(
            "SELECT merchant_id, by, reason FROM reminder_opt_outs WHERE opted_out = 1"
        ).fetchall()

    def save_reminder_opt_out(self, merchant_id: str, opted_out: bool, by: str, reason: str,
                              at: str) -> None:
        self.conn.execute("INSERT INTO reminder_opt_outs VALUES (?, ?, ?, ?, ?) ON CONFLICT "
                          "(merchant_id) DO UPDATE SET opted_out = excluded.opted_out, "
                          "by = excluded.by, reason = excluded.reason, at = excluded.at",
                          [merchant_id, int(opted_out), by, reason, at])

    def reminder_message(self, message_id: str) -> str | None:
        row = self.conn.execute("SELECT message_eml FROM reminder_outbox WHERE "
                                "message_id = ?", [message_id]).fetchone()
        return str(row[0]) if row else None

    def insert_reminder(self, row: dict[str, Any]) -> bool:
        columns = list(row)
        cursor = self.conn.execute(
            f"INSERT INTO reminder_outbox ({', '.join(columns)}) VALUES "
            f"({', '.join('?' for _ in columns)}) ON CONFLICT DO NOTHING",
            [row[c] for c in columns])
        return cursor.rowcount > 0

    def retake_reminder(self, message_id: str, holder: str, operator: str) -> str | None:
        row = self.conn.execute(
            "UPDATE reminder_outbox SET status = NULL, holder = ?, operator = ? "
            "WHERE message_id = ? AND status = 'deferred' RETURNING message_eml",
            [holder, operator, message_id]).fetchone()
        return None if row is None else str(row[0])

    def drop_unsent_reminder(self, message_id: str) -> None:
        self.conn.execute("DELETE FROM reminder_outbox WHERE message_id = ? AND status IS "
                          "NULL AND attempts = 0", [message_id])

    def reminder_attempts(self, message_id: str) -> tuple[int, str]:
        row = self.conn.execute("SELECT attempts, created_at FROM reminder_outbox WHERE "
                                "message_id = ?", [message_id]).fetchone()
        return int(row[0]), str(row[1])

    def settle_reminder(self, message_id: str, status: str, reason: str | None,
                        detail: str | None, attempts: int, next_attempt_at: str | None,
                        settled_at: str) -> None:
        self.conn.execute("UPDATE reminder_outbox SET status = ?, reason = ?, detail = ?, "
                          "attempts = ?, next_attempt_at = ?, settled_at = ? "
                          "WHERE message_id = ?",
                          [status, reason, detail, attempts, next_attempt_at, settled_at,
                           message_id])

    def deferred_reminder(self, message_id: str) -> tuple[Any, ...] | None:
        row = self.conn.execute("SELECT merchant_id, kind, recipients_json, orders FROM "
                                "reminder_outbox WHERE message_id = ? AND status = 'deferred'",
                                [message_id]).fetchone()
        return None if row is None else tuple(row)

    def set_reminder_reason(self, message_id: str, reason: str) -> None:
        self.conn.execute("UPDATE reminder_outbox SET reason = ? WHERE message_id = ?",
                          [reason, message_id])

    def open_reminders(self) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            "SELECT o.message_id, o.merchant_id, o.kind, o.recipients_json, o.orders, "
            "o.message_eml, o.holder, o.created_at, COALESCE(m.business_name, o.merchant_id) "
            "FROM reminder_outbox o LEFT JOIN merchants m USING (merchant_id) "
            "WHERE o.status IS NULL ORDER BY o.created_at").fetchall()

    def reminder_history(self, merchant_id: str | None) -> list[tuple[Any, ...]]:
        sql = ("SELECT o.message_id, o.merchant_id, COALESCE(m.business_name, o.merchant_id),"
               " o.kind, o.recipients_json, o.orders, o.status, o.reason, o.detail, "
               "o.attempts, o.created_at, o.settled_at, o.operator FROM reminder_outbox o "
               "LEFT JOIN merchants m USING (merchant_id)")
        params: list[Any] = []
        if merchant_id is not None:
            sql += " WHERE o.merchant_id = ?"
            params.append(merchant_id)
        return self.conn.execute(sql + " ORDER BY o.created_at DESC", params).fetchall()

    # ------------------------------------------------------------------ four-eyes approvals
    # Writers are called inside the caller's `transaction()`, so each change commits with
    # its audit entry (services/completion/approvals.py).
    def insert_approval(self, approval: Approval) -> None:
        self.conn.execute(f"INSERT INTO approvals VALUES ({', '.join('?' * len(approval))})",
                          list(approval))

    def approval(self, batch_id: str) -> Approval | None:
        row = self.conn.execute("SELECT * FROM approvals WHERE batch_id = ?",
                                [batch_id]).fetchone()
        return Approval(*row) if row else None

    def approvals(self, statuses: Sequence[str] | None = None) -> list[Approval]:
        """Prepared batches, oldest first; only those in `statuses` if given."""
        sql = "SELECT * FROM approvals"
        params: list[Any] = []
        if statuses:
            sql += f" WHERE status IN ({', '.join('?' for _ in statuses)})"
            params += list(statuses)
        return [Approval(*row) for row in self.conn.execute(
            sql + " ORDER BY prepared_at, batch_id", params).fetchall()]

    def decide_approval(self, batch_id: str, status: str, decided_by: str, decided_at: str,
                        reason: str | None, expires_at: str | None) -> bool:
        """Approve or reject a pending batch; False when it is no longer pending."""
        cursor = self.conn.execute(
            "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, reason = ?, "
            "expires_at = ? WHERE batch_id = ? AND status = 'pending'",
            [status, decided_by, decided_at, reason, expires_at, batch_id])
        return cursor.rowcount == 1

    def use_approval(self, batch_id: str, used_by: str, used_at: str) -> bool:
        """Claim an approved, unexpired batch for one run; False if it is not (any more)."""
        cursor = self.conn.execute(
            "UPDATE approvals SET status = 'used', used_by = ?, used_at = ? "
            "WHERE batch_id = ? AND status = 'approved' AND expires_at > ?",
            [used_by, used_at, batch_id, used_at])
        return cursor.rowcount == 1

    def sent_without_approval(self, since: str) -> list[tuple[str, str, int | None, str | None]]:
        return [(str(r[0]), str(r[1]), r[2], r[3]) for r in self.conn.execute(
            "SELECT DISTINCT operator, order_id, amount, currency FROM intents i "
            "WHERE created_at >= ? AND (outcome IS NULL OR outcome = 'completed') "
            "AND NOT EXISTS (SELECT 1 FROM approvals a WHERE a.batch_id = i.batch_id "
            "AND a.status = 'used')", [since])]

    def order_amounts(self, order_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """order id -> (total amount, currency) among `order_ids`: from the queue, else from
        the order's latest intent (an order sent before, e.g. a retry of the failed)."""
        found: dict[str, tuple[int, str]] = {}
        for start in range(0, len(order_ids), 500):
            chunk = list(order_ids[start:start + 500])
            marks = ", ".join("?" for _ in chunk)
            found.update({str(r[0]): (int(r[1]), str(r[2])) for r in self.conn.execute(
                "SELECT order_id, amount, currency FROM intents WHERE amount IS NOT NULL "
                f"AND order_id IN ({marks}) ORDER BY created_at, attempt", chunk)})
            found.update({str(r[0]): (int(r[1]), str(r[2])) for r in self.conn.execute(
                f"SELECT order_id, total_amount, currency FROM orders WHERE order_id IN "
                f"({marks})", chunk)})
        return found

    # ------------------------------------------------------------------ presence and changes
    def change_version(self) -> int:
        """The change counter: it moves whenever something an open console shows changes
        (orders, outcomes, consents, revocations, leases taken or released)."""
        row = self.conn.execute("SELECT version FROM change_counter WHERE id = 1").fetchone()
        return int(row[0])

    def register_session(self, session: OperatorSession, forget_before: str) -> None:
        """Add (or replace) an operator session, and forget those unseen since
        `forget_before` (the table stays the size of the team)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM operator_sessions WHERE last_seen < ?", [forget_before])
            conn.execute("INSERT OR REPLACE INTO operator_sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                         list(session))

    def touch_session(self, session_id: str, last_seen: str) -> bool:
        """The session's heartbeat; False when its row is gone (forgotten: register again)."""
        with self.transaction() as conn:
            row = conn.execute("UPDATE operator_sessions SET last_seen = ? WHERE session_id = ? "
                               "RETURNING 1", [last_seen, session_id]).fetchone()
        return row is not None

    def end_session(self, session_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM operator_sessions WHERE session_id = ?", [session_id])

    def sessions(self, seen_since: str) -> list[OperatorSession]:
        """Sessions whose last heartbeat is at or after `seen_since`, by operator."""
        return [OperatorSession(*row) for row in self.conn.execute(
            "SELECT * FROM operator_sessions WHERE last_seen >= ? "
            "ORDER BY operator, started_at, session_id", [seen_since]).fetchall()]
