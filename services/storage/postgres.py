"""The team store: one PostgreSQL database (psycopg 3, a connection pool), its migrations, its SQL.

Transactions are per thread: `transaction()` checks a connection out of the pool for the
calling thread, and every store call on that thread joins it until it ends; outside one, each
call borrows a connection for itself (autocommit). The audit chain has one head row
(`audit_head`), locked FOR UPDATE and moved in the transaction that appends, so appends from any
number of processes are serialized and the chain never forks; triggers refuse UPDATE, DELETE and
TRUNCATE of history, and the console's role (postgres_roles.sql) has no such privilege either.
Text columns compare bytewise (COLLATE "C"), as SQLite does, so ids and timestamps order alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg
import psycopg.sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from services.consent import ConsentRecord, Revocation, record_sha256
from services.database_url import connect_kwargs, display_url
from services.errors import ConfigurationError
from services.settings import PG_POOL_MAX
from services.square_models import order_document
from services.storage.base import (
    AUDIT_COLUMNS,
    AUDIT_VERIFY_COLUMNS,
    INTENT_COLUMNS,
    ORDER_COLUMNS,
    SQUARE_TIME_LIKE,
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

__all__ = ["MIGRATIONS", "ROLES_SQL", "PostgresStore", "create_database"]

ROLES_SQL = Path(__file__).with_name("postgres_roles.sql")

# The writes other consoles must see without a refresh (as SQLite's m009_presence): each
# statement bumps the change counter and NOTIFYs recon_changes. Heartbeats do not.
CHANGE_TRIGGERS = {
    "orders": ("DELETE", "UPDATE"),
    "merchants": ("INSERT", "UPDATE"),
    "intents": ("UPDATE OF outcome",),
    "batches": ("INSERT", "UPDATE OF status"),
    "consents": ("INSERT",),
    "consent_revocations": ("INSERT",),
    "leases": ("INSERT", "DELETE", "UPDATE OF token"),
    "reminder_outbox": ("INSERT", "UPDATE OF status"),
}

_APPEND_ONLY = """
    CREATE FUNCTION {name}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION '{what}' USING ERRCODE = 'integrity_constraint_violation'; END $$;
    CREATE TRIGGER {name}_no_update BEFORE UPDATE OR DELETE ON {name}
        FOR EACH ROW EXECUTE FUNCTION {name}_refuse();
    CREATE TRIGGER {name}_no_truncate BEFORE TRUNCATE ON {name}
        FOR EACH STATEMENT EXECUTE FUNCTION {name}_refuse();
"""

# Named, in order, each applied once in its own transaction and recorded in schema_migrations.
# Add new ones at the end; never edit one that has shipped.
MIGRATIONS: list[tuple[str, str]] = [
    ("m001_initial", """
        CREATE TABLE consents (
            id BIGSERIAL UNIQUE, consent_id TEXT NOT NULL, version INTEGER NOT NULL,
            merchant_id TEXT NOT NULL, record_json TEXT NOT NULL, record_sha256 TEXT NOT NULL,
            imported_at TEXT NOT NULL, imported_by TEXT NOT NULL, source TEXT,
            PRIMARY KEY (consent_id, version));
        CREATE INDEX consents_merchant ON consents(merchant_id);
        CREATE TABLE consent_revocations (
            seq BIGSERIAL PRIMARY KEY, consent_id TEXT NOT NULL, merchant_id TEXT NOT NULL,
            revoked_at TEXT NOT NULL, revoked_by TEXT NOT NULL, reason TEXT NOT NULL,
            recorded_at TEXT NOT NULL, operator TEXT NOT NULL, source TEXT);
        CREATE INDEX consent_revocations_id ON consent_revocations(consent_id);
        CREATE TABLE merchants (
            merchant_id TEXT PRIMARY KEY, business_name TEXT, country TEXT, currency TEXT,
            timezone TEXT, locations_json TEXT, fetched_at TEXT,
            token_health TEXT, token_expires_at TEXT, token_scopes TEXT,
            sync_time TEXT, discovery_error TEXT, discovered_at TEXT);
        CREATE TABLE orders (
            order_id TEXT PRIMARY KEY, merchant_id TEXT NOT NULL, location_id TEXT NOT NULL,
            version BIGINT, state TEXT NOT NULL, source TEXT, reference_id TEXT,
            total_amount BIGINT NOT NULL, currency TEXT NOT NULL, due_amount BIGINT NOT NULL,
            created_at TEXT NOT NULL, updated_at TEXT, eligible INTEGER NOT NULL,
            reason TEXT, detail TEXT, consent_id TEXT, fulfillments TEXT,
            order_json TEXT NOT NULL, seen_at TEXT NOT NULL);
        CREATE INDEX orders_merchant ON orders(merchant_id, eligible);
        CREATE TABLE order_marks (
            merchant_id TEXT NOT NULL, location_id TEXT NOT NULL, mark TEXT NOT NULL,
            full_at TEXT NOT NULL, PRIMARY KEY (merchant_id, location_id));
        CREATE TABLE order_sync (
            merchant_id TEXT PRIMARY KEY, fetched_at TEXT NOT NULL, consent_sig TEXT);
        CREATE TABLE backlog_history (
            day TEXT NOT NULL, merchant_id TEXT NOT NULL, under_1d INTEGER NOT NULL,
            d1_3 INTEGER NOT NULL, d3_7 INTEGER NOT NULL, d7_14 INTEGER NOT NULL,
            d14_plus INTEGER NOT NULL, recorded_at TEXT NOT NULL,
            rebuilt INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, merchant_id));
        CREATE TABLE batches (
            batch_id TEXT PRIMARY KEY, operator TEXT NOT NULL, created_at TEXT NOT NULL,
            approved_set_sha256 TEXT NOT NULL, approved_json TEXT NOT NULL,
            status TEXT NOT NULL, finished_at TEXT);
        CREATE TABLE intents (
            intent_id TEXT PRIMARY KEY, attempt INTEGER NOT NULL,
            idempotency_key TEXT NOT NULL, batch_id TEXT NOT NULL, merchant_id TEXT NOT NULL,
            order_id TEXT NOT NULL, location_id TEXT NOT NULL, version BIGINT NOT NULL,
            amount BIGINT, currency TEXT, consent_id TEXT, consent_sha256 TEXT,
            operator TEXT NOT NULL, created_at TEXT NOT NULL, body_json TEXT NOT NULL,
            outcome TEXT, reason TEXT, square_code TEXT, detail TEXT, settled_at TEXT,
            UNIQUE (order_id, version, attempt));
        CREATE INDEX intents_open ON intents(merchant_id) WHERE outcome IS NULL;
        CREATE INDEX intents_batch ON intents(batch_id);
        CREATE TABLE leases (
            merchant_id TEXT PRIMARY KEY, operator TEXT NOT NULL, host TEXT NOT NULL,
            pid INTEGER NOT NULL, started_at TEXT NOT NULL, heartbeat_at TEXT NOT NULL,
            expires_at TEXT NOT NULL, token TEXT NOT NULL);
        CREATE TABLE reminder_outbox (
            message_id TEXT PRIMARY KEY, merchant_id TEXT NOT NULL,
            window_index INTEGER NOT NULL, kind TEXT NOT NULL, recipients_json TEXT NOT NULL,
            order_ids_json TEXT NOT NULL, orders INTEGER NOT NULL, age_step INTEGER NOT NULL,
            message_eml TEXT NOT NULL, operator TEXT NOT NULL, holder TEXT NOT NULL,
            created_at TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            status TEXT, reason TEXT, detail TEXT, next_attempt_at TEXT, settled_at TEXT,
            UNIQUE (merchant_id, window_index));
        CREATE INDEX reminder_outbox_open ON reminder_outbox(status)
            WHERE status IS NULL OR status = 'deferred';
        CREATE TABLE reminder_opt_outs (
            merchant_id TEXT PRIMARY KEY, opted_out INTEGER NOT NULL, by TEXT NOT NULL,
            reason TEXT NOT NULL, at TEXT NOT NULL);
    """.replace("TEXT", 'TEXT COLLATE "C"')
        + _APPEND_ONLY.format(name="consent_revocations", what="revocations are final")),
    ("m002_audit", """
        CREATE TABLE audit (
            seq BIGINT PRIMARY KEY, at TEXT NOT NULL, operator TEXT NOT NULL,
            action TEXT NOT NULL, merchant_id TEXT, order_id TEXT, version BIGINT,
            amount BIGINT, currency TEXT, consent_id TEXT, consent_sha256 TEXT,
            batch_id TEXT, approved_set_sha256 TEXT, idempotency_key TEXT, outcome TEXT,
            square_code TEXT, detail TEXT, prev_hash TEXT NOT NULL UNIQUE, hash TEXT NOT NULL);
        -- The chain's head: one row, locked and moved by every append (serializes writers).
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash TEXT);
        INSERT INTO audit_head VALUES (1, 0, NULL);
    """.replace("TEXT", 'TEXT COLLATE "C"')
        + _APPEND_ONLY.format(name="audit", what="audit entries are append-only")),
    ("m003_approvals", """
        CREATE TABLE approvals (
            batch_id TEXT PRIMARY KEY, approved_set_sha256 TEXT NOT NULL,
            items_json TEXT NOT NULL, totals_json TEXT NOT NULL, orders INTEGER NOT NULL,
            why TEXT NOT NULL, prepared_by TEXT NOT NULL, prepared_at TEXT NOT NULL,
            status TEXT NOT NULL, decided_by TEXT, decided_at TEXT, reason TEXT,
            expires_at TEXT, used_by TEXT, used_at TEXT);
        CREATE INDEX approvals_status ON approvals(status);
    """.replace("TEXT", 'TEXT COLLATE "C"')),
    ("m004_presence", """
        CREATE TABLE operator_sessions (
            session_id TEXT PRIMARY KEY, operator TEXT NOT NULL, host TEXT NOT NULL,
            pid INTEGER NOT NULL, kind TEXT NOT NULL, started_at TEXT NOT NULL,
            last_seen TEXT NOT NULL);
        CREATE INDEX operator_sessions_seen ON operator_sessions(last_seen);
        CREATE TABLE change_counter (
            id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
        INSERT INTO change_counter VALUES (1, 0);
    """.replace("TEXT", 'TEXT COLLATE "C"') + """
        -- Bumped in the writer's own transaction, once per statement (not per row: a refresh
        -- writes thousands), and announced to every listening console.
        CREATE FUNCTION recon_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE change_counter SET version = version + 1 WHERE id = 1;
            PERFORM pg_notify('recon_changes', '');
            RETURN NULL;
        END $$;
    """ + "".join(
        f"CREATE TRIGGER {table}_changed_{event.split()[0].lower()} AFTER {event} ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION recon_changed();\n"
        for table, events in CHANGE_TRIGGERS.items() for event in events)),
    # Each merchant's orders by age in index order: its first screenful and the reads ordered
    # by merchant then age need no sort (SQLite's migration of the same name says why
    # merchant first).
    ("orders_created_at_index", """
        CREATE INDEX orders_merchant_created_at ON orders(merchant_id, created_at, order_id);
    """),
    ("intents_created_at_index", """
        CREATE INDEX intents_created_at ON intents(created_at);
    """),
    # SQLite's migrations of the same names say why.
    ("merchant_token_sha256", """
        ALTER TABLE merchants ADD COLUMN token_sha256 TEXT COLLATE "C";
    """),
]

_APPROVAL = ", ".join(Approval._fields)
# Both tables only grow, so their sizes together only grow (serial ids may commit out of order
# across sessions; counts cannot go back).
_CONSENTS_REVISION = ("SELECT (SELECT COUNT(*) FROM consents) + "
                      "(SELECT COUNT(*) FROM consent_revocations)")
_CURSOR_NAMES = itertools.count(1)
_MIGRATION_LOCK = 0x7265636F6E  # pg_advisory_xact_lock key: one migrating process at a time
_INTENTS = ", ".join(INTENT_COLUMNS)
_QUEUED = ("SELECT o.order_id, o.merchant_id, o.location_id, o.version, o.state, o.source, "
           "o.reference_id, o.total_amount, o.currency, o.due_amount, o.created_at, "
           "o.eligible, o.reason, o.detail, o.consent_id, o.fulfillments, "
           "GREATEST(o.seen_at, COALESCE(s.fetched_at, o.seen_at)) "
           "FROM orders o LEFT JOIN order_sync s ON s.merchant_id = o.merchant_id WHERE true")
# One `queue --json` order as JSON text, made by json_build_object: keys in the order of the
# document interfaces.md describes. Its parameter: the merchants refreshed just now.
_QUEUED_OBJECT = (
    "json_build_object('merchant_id', o.merchant_id, 'order_id', o.order_id, "
    "'location_id', o.location_id, 'version', o.version, 'state', o.state, "
    "'source', o.source, "
    "'total_money', json_build_object('amount', o.total_amount, 'currency', o.currency), "
    "'net_amount_due_money', json_build_object('amount', o.due_amount, "
    "'currency', o.currency), "
    "'created_at', o.created_at, 'eligible', o.eligible <> 0, 'reason', o.reason, "
    "'stale', {stale}, "
    "'fetched_at', GREATEST(o.seen_at, COALESCE(s.fetched_at, o.seen_at)))::text")
_QUEUED_FROM = "FROM orders o LEFT JOIN order_sync s ON s.merchant_id = o.merchant_id WHERE true"
_QUEUED_JSON = (f"SELECT {_QUEUED_OBJECT.format(stale='NOT (o.merchant_id = ANY(%s))')} "
                f"{_QUEUED_FROM}")
# Column types, for `_recordset`: a whole group of rows is one statement (one
# round trip, one firing of the statement-level change trigger, one plan) instead of one each.
_ORDER_TYPES = {c: "bigint" if c in ("version", "total_amount", "due_amount") else
                "integer" if c == "eligible" else "text" for c in ORDER_COLUMNS}
_INTENT_TYPES = {c: "bigint" if c in ("version", "amount") else
                 "integer" if c == "attempt" else "text" for c in INTENT_COLUMNS}


def _recordset(types: dict[str, str]) -> str:
    """The rows of one JSON parameter (an array of objects keyed by column), typed as `types`
    says: a whole group of rows as one statement (one round trip, one firing of the
    statement-level change trigger, one plan), like `_unnest`, but dumped by orjson in C
    where psycopg dumps each array element in Python (and escapes it with a regex): most of
    the client's CPU for a refresh's orders and a group's intents went there."""
    return ("json_to_recordset(%s::json) AS r("
            + ", ".join(f"{column} {kind}" for column, kind in types.items()) + ")")


def _records(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> str:
    """`rows` (in `columns`' order) as `_recordset`'s parameter."""
    return orjson.dumps([dict(zip(columns, row, strict=True)) for row in rows]).decode()


_AUDIT_TYPES = {c: "bigint" if c in ("seq", "version", "amount") else "text"
                for c in AUDIT_COLUMNS}
_APPEND_AUDIT = (f"WITH appended AS (INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) SELECT "
                 f"{', '.join(AUDIT_COLUMNS)} FROM {_recordset(_AUDIT_TYPES)}) "
                 "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1")
_APPEND_AS_JSON = 5000  # entries; more go by COPY, streamed
_UPSERT_ORDER = (f"INSERT INTO orders ({', '.join(ORDER_COLUMNS)}) SELECT "
                 f"{', '.join(ORDER_COLUMNS)} FROM {_recordset(_ORDER_TYPES)} "
                 "ON CONFLICT (order_id) DO UPDATE SET "
                 + ", ".join(f"{c} = excluded.{c}" for c in ORDER_COLUMNS[1:]))
_VERDICT_TYPES = {"eligible": "integer", "reason": "text", "detail": "text",
                  "consent_id": "text", "order_id": "text"}
_SETTLE_TYPES = {"intent_id": "text", "outcome": "text", "reason": "text",
                 "square_code": "text", "detail": "text"}


def _unnest(types: Sequence[str]) -> str:
    """unnest() of one array parameter per column, in `types`' order."""
    return "unnest(" + ", ".join(f"%s::{t}[]" for t in types) + ")"


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """`rows` as one list per column: `_unnest`'s parameters."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _last_of_each(rows: Sequence[Sequence[Any]], key: Callable[[Sequence[Any]], Any]
                  ) -> list[Sequence[Any]]:
    """One row per key, the last given (what one upsert per row, in order, leaves): an
    upsert of one statement may not touch a row twice."""
    return list({key(row): row for row in rows}.values())


class PostgresStore(Store):
    """One PostgreSQL database, shared by every thread of the process (and by the team)."""

    _MARK = "%s"
    # Moved by every consent or revocation this process writes, through any store object
    # (hence on the class): see `consent_writes`.
    _consent_writes = 0

    def __init__(self, url: str, *, password: str | None = None,
                 max_connections: int = PG_POOL_MAX, migrate: bool = True) -> None:
        self.location = url
        self._local = threading.local()
        # The password travels as a connection keyword, never in the URL (a process list, a
        # log line, a traceback show the URL): the credentials file's (services/database_url)
        # or libpq's own pgpass/service file.
        kwargs: dict[str, Any] = {"autocommit": True, **connect_kwargs(url)}
        if password is not None:
            kwargs["password"] = password
        self._kwargs = kwargs
        try:
            with psycopg.connect(url, **kwargs) as conn:
                if migrate:
                    _migrate(conn)
                else:
                    _check_migrated(conn)
        except psycopg.OperationalError as error:
            # libpq's last line, its tabs and other control characters made spaces (one line,
            # nothing a terminal would act on), then what to do.
            lines = str(error).strip().splitlines()
            reason = " ".join("".join(c if c.isprintable() else " " for c in lines[-1]).split()
                              ).rstrip("?.") if lines else "no answer"
            raise ConfigurationError(f"cannot connect to PostgreSQL at {display_url(url)}: "
                                     f"{reason}. Start the server or fix the --db / RECON_DB "
                                     "URL (host, port, database, user).") from None
        self.pool = ConnectionPool(url, min_size=1, max_size=max_connections, kwargs=kwargs,
                                   open=True, name="recon-console")
        self._feeds: list[ListenChangeFeed] = []  # closed with the store

    # ------------------------------------------------------------------ connections
    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """The thread's open transaction, or a pooled connection for one statement."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.pool.connection() as conn:
            yield conn

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchone()

    def _run(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._conn() as conn:
            self._changes_first(conn)
            return conn.execute(sql, params).rowcount

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._conn() as conn, conn.cursor() as cursor:
                self._changes_first(conn)
                cursor.executemany(sql, rows)

    def _changes_first(self, conn: psycopg.Connection[Any]) -> None:
        """In a transaction, before its first write: the change counter's row, locked to the
        commit. Every write to a table a console watches bumps the counter (its trigger),
        but only after it has locked its own rows: two transactions writing the same rows in
        different orders (two discoveries' groups of merchants, a consent's reclassification
        beside a refresh) each held a row the other wanted while waiting for the counter
        (`deadlock detected`, seen with three operators at once). Taken first, by every
        writer (`commit_group` too, before the audit head), the second writer waits for the
        first's commit before it locks anything. Writes outside a transaction are one
        statement each and hold nothing while they wait."""
        if getattr(self._local, "conn", None) is conn and not self._local.changes_locked:
            conn.execute("SELECT 1 FROM change_counter WHERE id = 1 FOR UPDATE")
            self._local.changes_locked = True

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        # `_local.head`: the audit head (seq, hash) as this transaction has it, its row locked
        # (None: not read yet). Appends after the first need not read it again.
        # `_local.changes_locked`: whether it holds the change counter's row (`_changes_first`).
        conn = getattr(self._local, "conn", None)
        if conn is not None:  # nested: a savepoint of the thread's transaction
            head, locked = self._local.head, self._local.changes_locked
            with conn.transaction():
                try:
                    yield conn
                except BaseException:
                    # Rolled back to the savepoint, with the locks taken since.
                    self._local.head, self._local.changes_locked = head, locked
                    raise
            return
        with self.pool.connection() as conn:
            self._local.conn = conn
            self._local.head = None
            self._local.changes_locked = False
            try:
                with conn.transaction():
                    yield conn
            finally:
                self._local.conn = None
                self._local.head = None
                self._local.changes_locked = False

    @contextmanager
    def cache_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        # (Not pipelined: psycopg 3.3's pipeline hung here, client and server each waiting
        # for the other, once a refresh's rows made a message larger than the socket buffer.)
        with self.transaction() as conn:
            # Data Square gives again: no wait for the WAL flush (still atomic; a later
            # durable commit flushes it too). The change counter's row first, in the same
            # round trip: every such group writes (`_changes_first`).
            conn.execute("SET LOCAL synchronous_commit = off; "
                         "SELECT 1 FROM change_counter WHERE id = 1 FOR UPDATE")
            self._local.changes_locked = True
            yield conn

    def commit_group(self, parts: Sequence[Callable[[Store], None]]
                     ) -> list[BaseException | None]:
        errors: list[BaseException | None] = [None] * len(parts)
        try:
            with self.transaction() as conn:
                # The change counter's row before the audit head, the order every other
                # writer takes them in (a change, its trigger bumping the counter, then its
                # audit entry). Taken as the parts come, a group whose intents part appended
                # (the head) before its outcomes part bumped the counter deadlocked with
                # another process's group doing the reverse.
                # Then the audit head's, in the same round trip (two statements, run in
                # order): every part appends.
                cursor = conn.execute("SELECT 1 FROM change_counter WHERE id = 1 FOR UPDATE; "
                                      "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
                cursor.nextset()
                row = cursor.fetchone()
                assert row is not None, "audit_head has lost its row"
                self._local.head = (int(row[0]), row[1])
                self._local.changes_locked = True
                if len(parts) == 1:  # refused, it is refused alone either way: no savepoint
                    parts[0](self)
                    return errors
                for index, part in enumerate(parts):
                    head = self._local.head
                    try:
                        with conn.transaction():  # a savepoint per part
                            part(self)
                    except psycopg.Error as error:
                        errors[index] = error
                        self._local.head = head  # its appends rolled back
        except Exception as error:  # the commit itself failed: none of it is durable
            return [error] * len(parts)
        return errors

    def writer(self) -> PostgresStore:
        return self  # the pool is shared by threads; each thread has its own transaction

    def for_thread(self) -> PostgresStore:
        return _Borrowed(self)

    def close(self) -> None:
        for feed in self._feeds:
            feed.close()
        self.pool.close()

    # ------------------------------------------------------------------ consents
    def save_consent(self, record: ConsentRecord, document: dict[str, Any], operator: str,
                     source: str) -> tuple[str, int]:
        digest = record_sha256(document)
        PostgresStore._consent_writes += 1
        with self.transaction():
            # One writer per consent id at a time: two imports never pick the same version.
            self._run("SELECT pg_advisory_xact_lock(hashtext('consent:' || %s))",
                      [record.consent_id])
            row = self._one("SELECT version, record_sha256 FROM consents WHERE consent_id = %s "
                            "ORDER BY version DESC LIMIT 1", [record.consent_id])
            if row is not None and row[1] == digest:
                return "unchanged", int(row[0])
            version = 1 if row is None else int(row[0]) + 1
            self._run("INSERT INTO consents (consent_id, version, merchant_id, record_json, "
                      "record_sha256, imported_at, imported_by, source) VALUES "
                      "(%s, %s, %s, %s, %s, %s, %s, %s)",
                      [record.consent_id, version, record.merchant_id,
                       orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode(), digest,
                       utc_text(), operator, source])
        return ("new" if row is None else "new_version"), version

    def _latest_consent_rows(self, merchant_id: str | None) -> list[tuple[Any, ...]]:
        sql = ("SELECT c.consent_id, c.version, c.merchant_id, c.record_json, c.record_sha256, "
               "c.imported_at, c.imported_by FROM consents c JOIN (SELECT consent_id, "
               "MAX(version) v FROM consents GROUP BY consent_id) l "
               "ON c.consent_id = l.consent_id AND c.version = l.v")
        params: list[Any] = []
        if merchant_id is not None:
            sql += " WHERE c.merchant_id = %s"
            params.append(merchant_id)
        return self._all(sql + " ORDER BY c.merchant_id, c.consent_id", params)

    def latest_consent_sha256(self, consent_id: str) -> str | None:
        row = self._one("SELECT record_sha256 FROM consents WHERE consent_id = %s "
                        "ORDER BY version DESC LIMIT 1", [consent_id])
        return str(row[0]) if row else None

    def consent_merchant_id(self, consent_id: str) -> str | None:
        row = self._one("SELECT merchant_id FROM consents WHERE consent_id = %s "
                        "ORDER BY version LIMIT 1", [consent_id])
        return str(row[0]) if row else None

    def revocations(self) -> dict[str, Revocation]:
        result: dict[str, Revocation] = {}
        for consent_id, revoked_at, revoked_by, reason in self._all(
                "SELECT consent_id, revoked_at, revoked_by, reason FROM consent_revocations "
                "ORDER BY revoked_at DESC, seq DESC"):
            result[consent_id] = Revocation(revoked_at=revoked_at, revoked_by=revoked_by,
                                            reason=reason)
        return result

    def record_revocation(self, record: ConsentRecord, operator: str, source: str) -> None:
        revocation = record.revocation
        assert revocation is not None
        revoked_at = utc_text(revocation.revoked_at)
        PostgresStore._consent_writes += 1
        with self.transaction():
            earlier = self._one("SELECT 1 FROM consent_revocations WHERE consent_id = %s AND "
                                "revoked_at <= %s", [record.consent_id, revoked_at])
            if earlier is None:
                self._run("INSERT INTO consent_revocations (consent_id, merchant_id, "
                          "revoked_at, revoked_by, reason, recorded_at, operator, source) "
                          "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                          [record.consent_id, record.merchant_id, revoked_at,
                           revocation.revoked_by, revocation.reason, utc_text(), operator,
                           source])

    def consents_revision(self) -> int:
        row = self._one(_CONSENTS_REVISION)
        return int(row[0]) if row else 0

    def consents_revision_reader(self) -> ConsentsRevisionReader:
        """`consents_revision` for the event loop: services/completion/sending.ConsentReads."""
        return ConsentsRevisionReader(self)

    def consent_writes(self) -> int:
        """A number that moves whenever this process writes a consent or a revocation (before
        the write): a `consents_revision` read in another thread while it moved may predate
        the write (services/completion/sending.ConsentReads reads again)."""
        return PostgresStore._consent_writes

    def consent_versions(self, consent_id: str) -> int:
        row = self._one("SELECT COUNT(*) FROM consents WHERE consent_id = %s", [consent_id])
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ merchants
    def upsert_merchant(self, row: dict[str, Any]) -> None:
        columns = list(row)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "merchant_id")
        self._run(f"INSERT INTO merchants ({', '.join(columns)}) VALUES "
                  f"({', '.join('%s' for _ in columns)}) ON CONFLICT (merchant_id) "
                  + (f"DO UPDATE SET {updates}" if updates else "DO NOTHING"),
                  [row[c] for c in columns])

    def merchants(self) -> list[dict[str, Any]]:
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute("SELECT * FROM merchants ORDER BY merchant_id").fetchall()

    def merchant(self, merchant_id: str) -> dict[str, Any] | None:
        with self._conn() as conn, conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute("SELECT * FROM merchants WHERE merchant_id = %s",
                                  [merchant_id]).fetchone()

    # ------------------------------------------------------------------ orders
    def replace_orders(self, merchant_id: str, rows: list[dict[str, Any]]) -> None:
        with self.transaction():
            self._run("DELETE FROM orders WHERE merchant_id = %s", [merchant_id])
            if rows:
                columns = list(rows[0])
                self._many(f"INSERT INTO orders ({', '.join(columns)}) VALUES "
                           f"({', '.join('%s' for _ in columns)}) ON CONFLICT (order_id) "
                           "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in columns
                                                        if c != "order_id"),
                           [[row[c] for c in columns] for row in rows])

    def write_orders(self, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._run(_UPSERT_ORDER, [_records(_last_of_each(rows, lambda row: row[0]),
                                               ORDER_COLUMNS)])

    def drop_orders(self, merchant_id: str, *, keep_locations: Sequence[str] | None = None,
                    at_locations: Sequence[str] | None = None,
                    order_ids: Sequence[str] | None = None) -> None:
        if keep_locations is not None:
            self._run("DELETE FROM orders WHERE merchant_id = %s AND "
                      "location_id <> ALL(%s)", [merchant_id, list(keep_locations)])
        if at_locations:
            self._run("DELETE FROM orders WHERE merchant_id = %s AND location_id = ANY(%s)",
                      [merchant_id, list(at_locations)])
        if order_ids:
            self._run("DELETE FROM orders WHERE merchant_id = %s AND order_id = ANY(%s)",
                      [merchant_id, list(order_ids)])

    def orders_json(self, merchant_id: str, reason: str | None = None
                    ) -> list[tuple[str, str]]:
        sql = "SELECT order_id, order_json FROM orders WHERE merchant_id = %s"
        params = [merchant_id]
        if reason is not None:
            sql += " AND reason = %s"
            params.append(reason)
        return [(str(r[0]), r[1]) for r in self._all(sql, params)]

    def order_documents(self, merchant_id: str) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._all(
            "SELECT order_json, seen_at FROM orders WHERE merchant_id = %s", [merchant_id])]

    def update_verdicts(self, rows: Sequence[tuple[int, str | None, str, str | None, str]]
                        ) -> None:
        if rows:  # one statement for all (see `_recordset`)
            self._run("UPDATE orders o SET eligible = r.eligible, reason = r.reason, "
                      "detail = r.detail, consent_id = r.consent_id FROM "
                      + _recordset(_VERDICT_TYPES) + " WHERE o.order_id = r.order_id",
                      [_records(_last_of_each(rows, lambda row: row[4]), list(_VERDICT_TYPES))])

    def order_marks(self, merchant_id: str) -> dict[str, tuple[str, str]]:
        return {str(r[0]): (str(r[1]), str(r[2])) for r in self._all(
            "SELECT location_id, mark, full_at FROM order_marks WHERE merchant_id = %s",
            [merchant_id])}

    def save_order_marks(self, merchant_id: str, marks: dict[str, tuple[str, str]]) -> None:
        with self.transaction():
            self._run("DELETE FROM order_marks WHERE merchant_id = %s", [merchant_id])
            self._many("INSERT INTO order_marks VALUES (%s, %s, %s, %s)",
                       [(merchant_id, loc, mark, full_at)
                        for loc, (mark, full_at) in marks.items()])

    def order_sync(self, merchant_id: str) -> tuple[str, str | None] | None:
        row = self._one("SELECT fetched_at, consent_sig FROM order_sync WHERE merchant_id = %s",
                        [merchant_id])
        return (str(row[0]), row[1]) if row else None

    def save_order_sync(self, merchant_id: str, fetched_at: str, consent_sig: str | None
                        ) -> None:
        self._run("INSERT INTO order_sync VALUES (%s, %s, %s) ON CONFLICT (merchant_id) DO "
                  "UPDATE SET fetched_at = excluded.fetched_at, "
                  "consent_sig = excluded.consent_sig", [merchant_id, fetched_at, consent_sig])

    def merchant_order_counts(self, merchant_id: str) -> tuple[int, int]:
        row = self._one("SELECT COUNT(*), COALESCE(SUM(eligible), 0) FROM orders "
                        "WHERE merchant_id = %s", [merchant_id])
        assert row is not None
        return int(row[0]), int(row[1])

    def queued_orders(self, merchant_id: str | None = None, eligible_only: bool = False,
                      ordered: bool = True) -> list[QueuedOrder]:
        sql = _QUEUED
        params: list[Any] = []
        if merchant_id is not None:
            sql += " AND o.merchant_id = %s"
            params.append(merchant_id)
        if eligible_only:
            sql += " AND o.eligible = 1"
        if ordered:
            sql += " ORDER BY o.merchant_id, o.created_at, o.order_id"
        return list(itertools.starmap(QueuedOrder, self._all(sql, params)))

    def queued_orders_json(self, refreshed: Sequence[str], eligible_only: bool = False,
                           merchant_ids: Sequence[str] | None = None, chunk: int = 5000
                           ) -> Iterator[list[bytes]]:
        sql = _QUEUED_JSON
        params: list[Any] = [list(refreshed)]
        if merchant_ids is not None:
            sql += " AND o.merchant_id = ANY(%s)"
            params.append(list(merchant_ids))
        if eligible_only:
            sql += " AND o.eligible = 1"
        rows = self._all(sql + " ORDER BY o.merchant_id, o.created_at, o.order_id", params)
        for start in range(0, len(rows), chunk):
            yield [row[0].encode() for row in rows[start:start + chunk]]

    def queued_orders_json_joined(self, merchants: Sequence[tuple[str, bool]], separator: str,
                                  eligible_only: bool = False) -> bytes:
        if not merchants:
            return b""
        sql = (f"SELECT string_agg(part, %s ORDER BY k) FROM (SELECT m.k, (SELECT string_agg("
               f"{_QUEUED_OBJECT.format(stale='m.stale')}, %s ORDER BY o.created_at, "
               f"o.order_id) {_QUEUED_FROM} AND o.merchant_id = m.id"
               f"{' AND o.eligible = 1' if eligible_only else ''}) AS part FROM "
               "unnest(%s::text[], %s::boolean[]) WITH ORDINALITY AS m(id, stale, k)) parts")
        row = self._one(sql, [separator, separator, [m for m, _ in merchants],
                              [stale for _, stale in merchants]])
        return row[0].encode() if row and row[0] is not None else b""

    def merchants_with_orders(self) -> list[str]:
        return sorted(row[0] for row in self._all("SELECT DISTINCT merchant_id FROM orders"))

    def oldest_orders(self, merchant_id: str | None = None, limit: int = 200
                      ) -> list[QueuedOrder]:
        sql = _QUEUED
        params: list[Any] = []
        if merchant_id is not None:
            sql += " AND o.merchant_id = %s"
            params.append(merchant_id)
        sql += " ORDER BY o.created_at, o.order_id LIMIT %s"
        return list(itertools.starmap(QueuedOrder, self._all(sql, [*params, limit])))

    def candidate_created_at(self, merchant_id: str) -> list[str]:
        return [r[0] for r in self._all(
            "SELECT created_at FROM orders WHERE merchant_id = %s AND eligible = 1",
            [merchant_id])]

    def candidates_by_age(self, merchant_ids: Sequence[str], edges: Sequence[str]
                          ) -> dict[str, tuple[int, ...] | None]:
        if not merchant_ids:
            return {}
        # Compared as bytes: a locale's collation may weigh punctuation apart.
        passed, params = edges_passed(edges, placeholder='%s COLLATE "C"')
        rows = self._all(
            f"SELECT merchant_id, {passed}, count(*), count(*) FILTER (WHERE created_at "
            f"LIKE '{SQUARE_TIME_LIKE}') FROM orders WHERE eligible = 1 "
            "AND merchant_id = ANY(%s) GROUP BY 1, 2", [*params, list(merchant_ids)])
        return counts_at_edges(rows, edges)

    def waiting_orders(self, reasons: Sequence[str]) -> list[tuple[Any, ...]]:
        return self._all(
            "SELECT merchant_id, order_id, location_id, reference_id, created_at, "
            "total_amount, currency, reason FROM orders WHERE eligible = 0 AND "
            "state = 'OPEN' AND reason = ANY(%s)", [list(reasons)])

    def order_json(self, order_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT order_json FROM orders WHERE order_id = %s", [order_id])
        return order_document(row[0]) if row else None

    # ------------------------------------------------------------------ batches and intents
    def insert_batch(self, batch_id: str, operator: str, approved_sha256: str,
                     approved_json: str) -> None:
        self._run("INSERT INTO batches VALUES (%s, %s, %s, %s, %s, 'running', NULL)",
                  [batch_id, operator, utc_text(), approved_sha256, approved_json])

    def finish_batch(self, batch_id: str, status: str) -> None:
        self._run("UPDATE batches SET status = %s, finished_at = %s WHERE batch_id = %s",
                  [status, utc_text(), batch_id])

    def next_attempts(self, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        # One index lookup per order (order_id leads the UNIQUE index): `order_id = ANY(%s)`
        # was planned as a scan of every intent, each compared with every id given.
        found = {(r[0], r[1]): r[2] for r in self._all(
            "SELECT o.order_id, i.version, i.attempt FROM unnest(%s::text[]) AS o(order_id) "
            "CROSS JOIN LATERAL (SELECT version, MAX(attempt) AS attempt FROM intents "
            "WHERE order_id = o.order_id GROUP BY version) AS i",
            [list(dict.fromkeys(order_id for order_id, _ in pairs))])}
        return {pair: found.get(pair, 0) + 1 for pair in pairs}

    def insert_intents(self, rows: list[dict[str, Any]]) -> None:
        if rows:  # one statement for all (see `_recordset`)
            self._run(f"INSERT INTO intents ({_INTENTS}) SELECT {_INTENTS} FROM "
                      + _recordset(_INTENT_TYPES),
                      [orjson.dumps([{n: row[n] for n in INTENT_COLUMNS} for row in rows])
                       .decode()])

    def settle_intent(self, intent_id: str, outcome: str, reason: str | None,
                      square_code: str | None, detail: str) -> None:
        self._run("UPDATE intents SET outcome = %s, reason = %s, square_code = %s, "
                  "detail = %s, settled_at = %s WHERE intent_id = %s AND outcome IS NULL",
                  [outcome, reason, square_code, detail, utc_text(), intent_id])

    def settle_intents(self, rows: Sequence[tuple[str, str, str | None, str | None, str]]
                       ) -> None:
        if not rows:
            return
        # One statement for the group (see `_recordset`); an intent given twice keeps its first
        # outcome, as one UPDATE each, in order, would (`outcome IS NULL`).
        first = list({row[0]: row for row in reversed(rows)}.values())
        # Each row found by its key (OFFSET 0 keeps that lookup a subquery of its own), then
        # updated by its ctid: joined directly, the planner, which thinks few intents open
        # (`intents_open`) before any ANALYZE, hashed every open intent (the whole batch's,
        # ~2 ms a group of 25 at 5,000) for each group. A row settled meanwhile by another
        # writer has a new ctid, and `outcome IS NULL` would keep it anyway.
        self._run("UPDATE intents i SET outcome = r.outcome, reason = r.reason, "
                  "square_code = r.square_code, detail = r.detail, settled_at = %s FROM "
                  + _recordset(_SETTLE_TYPES)
                  + " CROSS JOIN LATERAL (SELECT x.ctid AS found FROM intents x "
                  "WHERE x.intent_id = r.intent_id OFFSET 0) k "
                  "WHERE i.ctid = k.found AND i.outcome IS NULL",
                  [utc_text(), _records(first, list(_SETTLE_TYPES))])

    def drop_completed_orders(self, order_ids: list[str]) -> None:
        if order_ids:
            self._run("DELETE FROM orders WHERE order_id = ANY(%s)", [order_ids])

    def open_intents(self, merchant_id: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {_INTENTS} FROM intents WHERE outcome IS NULL"
        params: list[Any] = []
        if merchant_id is not None:
            sql += " AND merchant_id = %s"
            params.append(merchant_id)
        rows = self._all(sql + " ORDER BY created_at, attempt", params)
        return [dict(zip(INTENT_COLUMNS, row, strict=True)) for row in rows]

    def open_intent_count(self) -> int:
        row = self._one("SELECT COUNT(*) FROM intents WHERE outcome IS NULL")
        return int(row[0]) if row else 0

    def recent_batches(self, merchant_id: str, limit: int = 5) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT i.batch_id, b.created_at, b.operator, b.status, "
            "COUNT(*) FILTER (WHERE i.outcome = 'completed'), "
            "COUNT(*) FILTER (WHERE i.outcome = 'skipped'), "
            "COUNT(*) FILTER (WHERE i.outcome = 'failed'), "
            "COUNT(*) FILTER (WHERE i.outcome IS NULL) "
            "FROM intents i JOIN batches b ON b.batch_id = i.batch_id WHERE i.merchant_id = %s "
            "GROUP BY i.batch_id, b.created_at, b.operator, b.status "
            "ORDER BY b.created_at DESC LIMIT %s", [merchant_id, limit])
        names = ("batch_id", "created_at", "operator", "status", "completed", "skipped",
                 "failed", "open")
        return [dict(zip(names, row, strict=True)) for row in rows]

    # ------------------------------------------------------------------ backlog history
    def record_backlog(self, rows: list[tuple[str, str, tuple[int, int, int, int, int]]],
                       recorded_at: str, rebuilt: bool = False) -> None:
        action = "DO NOTHING" if rebuilt else (
            "DO UPDATE SET under_1d = excluded.under_1d, d1_3 = excluded.d1_3, "
            "d3_7 = excluded.d3_7, d7_14 = excluded.d7_14, d14_plus = excluded.d14_plus, "
            "recorded_at = excluded.recorded_at, rebuilt = excluded.rebuilt")
        if not rows:
            return
        # One statement (see `_unnest`): a (day, merchant) given twice ends as one row each
        # would leave it (the first kept by DO NOTHING, the last by DO UPDATE).
        values = _last_of_each([[day, merchant_id, *counts, recorded_at, int(rebuilt)]
                                for day, merchant_id, counts in (rows[::-1] if rebuilt
                                                                 else rows)],
                               lambda row: (row[0], row[1]))
        self._run("INSERT INTO backlog_history SELECT * FROM "
                  + _unnest(["text", "text", *["integer"] * 5, "text", "integer"])
                  + f" ON CONFLICT (day, merchant_id) {action}", _columns(values, 9))

    def has_backlog_history(self, merchant_id: str) -> bool:
        return self._one("SELECT 1 FROM backlog_history WHERE merchant_id = %s LIMIT 1",
                         [merchant_id]) is not None

    def backlog_history(self, merchant_id: str, since_day: str
                        ) -> dict[str, tuple[tuple[int, int, int, int, int], bool]]:
        rows = self._all(
            "SELECT day, under_1d, d1_3, d3_7, d7_14, d14_plus, rebuilt FROM backlog_history "
            "WHERE merchant_id = %s AND day >= %s ORDER BY day", [merchant_id, since_day])
        return {row[0]: ((row[1], row[2], row[3], row[4], row[5]), bool(row[6]))
                for row in rows}

    # ------------------------------------------------------------------ leases
    def take_lease(self, lease: Lease, free: Callable[[Lease], bool]) -> Lease:
        return self.take_leases([lease], free)[0]

    def take_leases(self, leases: Sequence[Lease], free: Callable[[Lease], bool]
                    ) -> list[Lease]:
        merchant_ids = [lease.merchant_id for lease in leases]
        with self.transaction():
            # Takers of a merchant's lease queue here, across processes and hosts. Every taker
            # locks its merchants in one order (the lock key's), so two takers of overlapping
            # sets cannot deadlock.
            self._run("SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT "
                      "hashtext('lease:' || m) AS k FROM unnest(%s::text[]) AS m ORDER BY k) "
                      "AS keys", [merchant_ids])
            found = {row[0]: Lease(*row) for row in self._all(
                "SELECT merchant_id, operator, host, pid, started_at, heartbeat_at, "
                "expires_at, token FROM leases WHERE merchant_id = ANY(%s)", [merchant_ids])}
            in_force: list[Lease] = []
            for lease in leases:
                current = found.get(lease.merchant_id)
                if current is not None and current.token != lease.token and not free(current):
                    in_force.append(current)  # another holder's, in force
                else:
                    in_force.append(lease)
            taken = _last_of_each([lease for lease, now in zip(leases, in_force, strict=True)
                                   if now is lease], lambda lease: lease[0])
            if taken:  # one statement for all (see `_unnest`)
                self._run("INSERT INTO leases SELECT * FROM "
                          + _unnest(["text", "text", "text", "integer", "text", "text", "text",
                                     "text"])
                          + " ON CONFLICT (merchant_id) DO UPDATE SET "
                          "operator = excluded.operator, host = excluded.host, "
                          "pid = excluded.pid, started_at = excluded.started_at, "
                          "heartbeat_at = excluded.heartbeat_at, "
                          "expires_at = excluded.expires_at, token = excluded.token",
                          _columns(taken, 8))
        return in_force

    def heartbeat_leases(self, token: str, heartbeat_at: str, expires_at: str) -> set[str]:
        rows = self._all("UPDATE leases SET heartbeat_at = %s, expires_at = %s "
                         "WHERE token = %s RETURNING merchant_id",
                         [heartbeat_at, expires_at, token])
        return {r[0] for r in rows}

    def release_lease(self, merchant_id: str, token: str) -> None:
        self.release_leases([merchant_id], token)

    def release_leases(self, merchant_ids: Sequence[str], token: str) -> None:
        self._run("DELETE FROM leases WHERE merchant_id = ANY(%s) AND token = %s",
                  [list(merchant_ids), token])

    def leases(self) -> list[Lease]:
        return [Lease(*row) for row in self._all(
            "SELECT merchant_id, operator, host, pid, started_at, heartbeat_at, expires_at, "
            "token FROM leases ORDER BY merchant_id")]

    # ------------------------------------------------------------------ audit
    def append_audit(self, build: AuditBuilder) -> list[dict[str, Any]]:
        if getattr(self._local, "conn", None) is None:
            with self.transaction():
                return self._append_audit(build)
        # Inside the thread's transaction, without a savepoint of its own (two round trips
        # each): an error here aborts that transaction, or the savepoint around it (a group
        # commit's part), which puts the head back (`transaction`, `commit_group`).
        return self._append_audit(build)

    def _append_audit(self, build: AuditBuilder) -> list[dict[str, Any]]:
        head = self._local.head
        if head is None:
            with self._conn() as conn:
                self._changes_first(conn)  # the counter before the head, as every writer
            # The head row's lock is held to COMMIT: the next writer reads the head this
            # transaction leaves, so every entry links to the one committed before it.
            row = self._one("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            assert row is not None, "audit_head has lost its row"
            head = (int(row[0]), row[1])
        entries = build(*head)
        if not entries:
            self._local.head = head
            return entries
        if len(entries) <= _APPEND_AS_JSON:
            # A group commit's entries and the head's move: one statement, one round trip.
            self._run(_APPEND_AUDIT, [orjson.dumps(
                [{k: entry[k] for k in AUDIT_COLUMNS} for entry in entries]).decode(),
                entries[-1]["seq"], entries[-1]["hash"]])
        else:  # many (a migration's): COPY streams them
            with self._conn() as conn, conn.cursor() as cursor, cursor.copy(
                    f"COPY audit ({', '.join(AUDIT_COLUMNS)}) FROM STDIN") as copy:
                for entry in entries:
                    copy.write_row([entry[k] for k in AUDIT_COLUMNS])
            self._run("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
                      [entries[-1]["seq"], entries[-1]["hash"]])
        self._local.head = (entries[-1]["seq"], entries[-1]["hash"])
        return entries

    def _stream(self, sql: str, params: Sequence[Any], size: int
                ) -> Iterator[tuple[Any, ...]]:
        """Rows from a server-side (named) cursor, `size` per round trip."""
        with self._conn() as conn, conn.transaction(), \
                conn.cursor(name=f"recon_stream_{next(_CURSOR_NAMES)}", binary=True) as cursor:
            cursor.itersize = size
            cursor.execute(sql, params)
            yield from cursor

    def audit_rows(self, first: int, end: int | None) -> Iterator[tuple[Any, ...]]:
        sql = f"SELECT {', '.join(AUDIT_VERIFY_COLUMNS)} FROM audit WHERE seq >= %s"
        params: list[int] = [first]
        if end is not None:
            sql += " AND seq < %s"
            params.append(end)
        rows = self._stream(sql + " ORDER BY seq", params, 20000)
        if getattr(self._local, "conn", None) is not None:
            return rows  # inside this thread's transaction: read on it (what it wrote too)
        return _read_ahead(rows, 20000)

    def audit_extent(self) -> tuple[int, int]:
        row = self._one("SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM audit")
        assert row is not None
        return int(row[0]), int(row[1])

    def audit_hash_at(self, seq: int) -> str | None:
        row = self._one("SELECT hash FROM audit WHERE seq = %s", [seq])
        return str(row[0]) if row else None

    def audit_last(self) -> tuple[int, str] | None:
        row = self._one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (int(row[0]), str(row[1])) if row else None

    # ------------------------------------------------------------------ reminders
    def reminders_last_sent(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self._all(
            "SELECT merchant_id, MAX(settled_at) FROM reminder_outbox WHERE status = 'sent' "
            "GROUP BY merchant_id")}

    def reminder_heads(self) -> tuple[list[tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
        latest = self._all(
            "SELECT merchant_id, message_id, window_index, created_at, status, next_attempt_at "
            "FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY merchant_id ORDER BY created_at "
            "DESC) AS n FROM reminder_outbox) t WHERE n = 1")
        sent = {row[0]: row for row in self._all(
            "SELECT merchant_id, settled_at, order_ids_json, age_step FROM (SELECT *, "
            "ROW_NUMBER() OVER (PARTITION BY merchant_id ORDER BY created_at DESC) AS n FROM "
            "reminder_outbox WHERE status = 'sent') t WHERE n = 1")}
        return latest, sent

    def reminder_opt_outs(self) -> list[tuple[str, str, str]]:
        return [(r[0], r[1], r[2]) for r in self._all(
            "SELECT merchant_id, by, reason FROM reminder_opt_outs WHERE opted_out = 1")]

    def save_reminder_opt_out(self, merchant_id: str, opted_out: bool, by: str, reason: str,
                              at: str) -> None:
        self._run("INSERT INTO reminder_opt_outs VALUES (%s, %s, %s, %s, %s) ON CONFLICT "
                  "(merchant_id) DO UPDATE SET opted_out = excluded.opted_out, "
                  "by = excluded.by, reason = excluded.reason, at = excluded.at",
                  [merchant_id, int(opted_out), by, reason, at])

    def reminder_message(self, message_id: str) -> str | None:
        row = self._one("SELECT message_eml FROM reminder_outbox WHERE message_id = %s",
                        [message_id])
        return str(row[0]) if row else None

    def insert_reminder(self, row: dict[str, Any]) -> bool:
        columns = list(row)
        return self._run(f"INSERT INTO reminder_outbox ({', '.join(columns)}) VALUES "
                         f"({', '.join('%s' for _ in columns)}) ON CONFLICT DO NOTHING",
                         [row[c] for c in columns]) > 0

    def retake_reminder(self, message_id: str, holder: str, operator: str) -> str | None:
        row = self._one("UPDATE reminder_outbox SET status = NULL, holder = %s, operator = %s "
                        "WHERE message_id = %s AND status = 'deferred' RETURNING message_eml",
                        [holder, operator, message_id])
        return None if row is None else str(row[0])

    def drop_unsent_reminder(self, message_id: str) -> None:
        self._run("DELETE FROM reminder_outbox WHERE message_id = %s AND status IS NULL "
                  "AND attempts = 0", [message_id])

    def reminder_attempts(self, message_id: str) -> tuple[int, str]:
        row = self._one("SELECT attempts, created_at FROM reminder_outbox WHERE "
                        "message_id = %s", [message_id])
        assert row is not None
        return int(row[0]), str(row[1])

    def settle_reminder(self, message_id: str, status: str, reason: str | None,
                        detail: str | None, attempts: int, next_attempt_at: str | None,
                        settled_at: str) -> None:
        self._run("UPDATE reminder_outbox SET status = %s, reason = %s, detail = %s, "
                  "attempts = %s, next_attempt_at = %s, settled_at = %s WHERE message_id = %s",
                  [status, reason, detail, attempts, next_attempt_at, settled_at, message_id])

    def deferred_reminder(self, message_id: str) -> tuple[Any, ...] | None:
        return self._one("SELECT merchant_id, kind, recipients_json, orders FROM "
                         "reminder_outbox WHERE message_id = %s AND status = 'deferred'",
                         [message_id])

    def set_reminder_reason(self, message_id: str, reason: str) -> None:
        self._run("UPDATE reminder_outbox SET reason = %s WHERE message_id = %s",
                  [reason, message_id])

    def open_reminders(self) -> list[tuple[Any, ...]]:
        return self._all(
            "SELECT o.message_id, o.merchant_id, o.kind, o.recipients_json, o.orders, "
            "o.message_eml, o.holder, o.created_at, COALESCE(m.business_name, o.merchant_id) "
            "FROM reminder_outbox o LEFT JOIN merchants m USING (merchant_id) "
            "WHERE o.status IS NULL ORDER BY o.created_at")

    def reminder_history(self, merchant_id: str | None) -> list[tuple[Any, ...]]:
        sql = ("SELECT o.message_id, o.merchant_id, COALESCE(m.business_name, o.merchant_id),"
               " o.kind, o.recipients_json, o.orders, o.status, o.reason, o.detail, "
               "o.attempts, o.created_at, o.settled_at, o.operator FROM reminder_outbox o "
               "LEFT JOIN merchants m USING (merchant_id)")
        params: list[Any] = []
        if merchant_id is not None:
            sql += " WHERE o.merchant_id = %s"
            params.append(merchant_id)
        return self._all(sql + " ORDER BY o.created_at DESC", params)

    # ------------------------------------------------------------------ four-eyes approvals
    def insert_approval(self, approval: Approval) -> None:
        self._run(f"INSERT INTO approvals VALUES ({', '.join('%s' for _ in approval)})",
                  list(approval))

    def approval(self, batch_id: str) -> Approval | None:
        row = self._one(f"SELECT {_APPROVAL} FROM approvals WHERE batch_id = %s", [batch_id])
        return Approval(*row) if row else None

    def approvals(self, statuses: Sequence[str] | None = None) -> list[Approval]:
        sql = f"SELECT {_APPROVAL} FROM approvals"
        params: list[Any] = []
        if statuses:
            sql += " WHERE status = ANY(%s)"
            params.append(list(statuses))
        return [Approval(*row) for row in self._all(sql + " ORDER BY prepared_at, batch_id",
                                                    params)]

    def decide_approval(self, batch_id: str, status: str, decided_by: str, decided_at: str,
                        reason: str | None, expires_at: str | None) -> bool:
        return self._run(
            "UPDATE approvals SET status = %s, decided_by = %s, decided_at = %s, reason = %s, "
            "expires_at = %s WHERE batch_id = %s AND status = 'pending'",
            [status, decided_by, decided_at, reason, expires_at, batch_id]) == 1

    def use_approval(self, batch_id: str, used_by: str, used_at: str) -> bool:
        return self._run(
            "UPDATE approvals SET status = 'used', used_by = %s, used_at = %s "
            "WHERE batch_id = %s AND status = 'approved' AND expires_at > %s",
            [used_by, used_at, batch_id, used_at]) == 1

    def sent_without_approval(self, since: str) -> list[tuple[str, str, int | None, str | None]]:
        return [(str(r[0]), str(r[1]), r[2], r[3]) for r in self._all(
            "SELECT DISTINCT operator, order_id, amount, currency FROM intents i "
            "WHERE created_at >= %s AND (outcome IS NULL OR outcome = 'completed') "
            "AND NOT EXISTS (SELECT 1 FROM approvals a WHERE a.batch_id = i.batch_id "
            "AND a.status = 'used')", [since])]

    def order_amounts(self, order_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        ids = list(order_ids)
        # %b: a batch's thousands of ids as a binary array; as text, psycopg escapes each one
        # with a regex (~8 ms of CPU for 5,000, against ~2).
        found = {str(r[0]): (int(r[1]), str(r[2])) for r in self._all(
            "SELECT order_id, amount, currency FROM intents WHERE amount IS NOT NULL "
            "AND order_id = ANY(%b) ORDER BY created_at, attempt", [ids])}
        found.update({str(r[0]): (int(r[1]), str(r[2])) for r in self._all(
            "SELECT order_id, total_amount, currency FROM orders WHERE order_id = ANY(%b)",
            [ids])})
        return found

    # ------------------------------------------------------------------ presence and changes
    def change_version(self) -> int:
        row = self._one("SELECT version FROM change_counter WHERE id = 1")
        return int(row[0]) if row else 0

    def register_session(self, session: OperatorSession, forget_before: str) -> None:
        with self.transaction():
            self._run("DELETE FROM operator_sessions WHERE last_seen < %s", [forget_before])
            self._run("INSERT INTO operator_sessions VALUES (%s, %s, %s, %s, %s, %s, %s) "
                      "ON CONFLICT (session_id) DO UPDATE SET operator = excluded.operator, "
                      "host = excluded.host, pid = excluded.pid, kind = excluded.kind, "
                      "started_at = excluded.started_at, last_seen = excluded.last_seen",
                      list(session))

    def touch_session(self, session_id: str, last_seen: str) -> bool:
        return self._one("UPDATE operator_sessions SET last_seen = %s WHERE session_id = %s "
                         "RETURNING 1", [last_seen, session_id]) is not None

    def end_session(self, session_id: str) -> None:
        self._run("DELETE FROM operator_sessions WHERE session_id = %s", [session_id])

    def sessions(self, seen_since: str) -> list[OperatorSession]:
        return [OperatorSession(*row) for row in self._all(
            "SELECT session_id, operator, host, pid, kind, started_at, last_seen "
            "FROM operator_sessions WHERE last_seen >= %s "
            "ORDER BY operator, started_at, session_id", [seen_since])]

    def change_feed(self) -> ListenChangeFeed:
        """Live updates by LISTEN/NOTIFY (the change triggers notify recon_changes)."""
        feed = ListenChangeFeed(self)
        self._feeds.append(feed)
        return feed


class ConsentsRevisionReader:
    """`consents_revision` read on the event loop, over an async connection of its own
    (opened at the first read, closed by `aclose`): no thread to wait for the GIL behind the
    loop, no hop back to the loop with the answer."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._cursor: psycopg.AsyncCursor[Any] | None = None

    async def read(self) -> int:
        # A connection lost since the last read (a server restart, a killed backend, a
        # firewall's idle timeout) fails only the read that finds it: it is taken again,
        # once, on a new connection (begun later still, so as recent as asked). Raised into
        # the sends waiting for it, that error aborted the whole batch.
        reused = self._cursor is not None
        try:
            return await self._read()
        except psycopg.OperationalError:
            if not reused:
                raise
            return await self._read()

    async def _read(self) -> int:
        if self._cursor is None:
            self._conn = await psycopg.AsyncConnection.connect(str(self.store.location),
                                                               **self.store._kwargs)
            self._cursor = self._conn.cursor()
        try:
            # One cursor, the statement prepared once: ~1,000 reads a batch of 5,000.
            await self._cursor.execute(_CONSENTS_REVISION, prepare=True)
            row = await self._cursor.fetchone()
        except psycopg.Error:
            await self.aclose()  # a broken connection: the next read opens another
            raise
        return int(row[0]) if row else 0

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = self._cursor = None


class ListenChangeFeed:
    """PostgreSQL's change feed: the triggers that bump `change_counter` also NOTIFY
    recon_changes, and `wait` blocks on this connection's socket until one arrives (in a
    worker thread, so the event loop keeps painting) instead of polling."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._conn = psycopg.connect(str(store.location), **store._kwargs)
        # Its own connection: LISTEN holds it, and `wait` blocks on it in a worker thread.
        self._conn.execute("LISTEN recon_changes")

    def version(self) -> int:
        return self.store.change_version()

    async def wait(self, since: int, timeout: float) -> int:
        current = self.version()
        if current != since or timeout <= 0:
            return current
        await asyncio.to_thread(self._block, timeout)
        return self.version()

    def _block(self, timeout: float) -> None:
        with contextlib.suppress(psycopg.Error):  # closed meanwhile: the console is closing
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                pass

    def close(self) -> None:
        self._conn.close()


class _Borrowed(PostgresStore):
    """The same pool for another thread; closing it leaves the pool open for its owner."""

    def __init__(self, owner: PostgresStore) -> None:
        self.location = owner.location
        self._local = owner._local
        self._kwargs = owner._kwargs
        self.pool = owner.pool
        self._feeds = owner._feeds

    def close(self) -> None:
        return None


def _read_ahead(rows: Iterator[tuple[Any, ...]], page: int) -> Iterator[tuple[Any, ...]]:
    """`rows`, read a page ahead in a thread of their own: the server fills the next page
    while the caller works through this one (verify hashes as the next page arrives)."""
    pages: queue.Queue[list[tuple[Any, ...]] | BaseException | None] = queue.Queue(2)
    stop = threading.Event()

    def put(item: list[tuple[Any, ...]] | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                pages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            batch: list[tuple[Any, ...]] = []
            for row in rows:
                batch.append(row)
                if len(batch) == page:
                    if not put(batch):
                        return
                    batch = []
            if batch and not put(batch):
                return
            put(None)
        except BaseException as error:  # handed to the reader, raised there
            put(error)
        finally:
            rows.close()  # type: ignore[attr-defined]  # a generator: its cursor and connection

    reader = threading.Thread(target=read, name="audit-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = pages.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        reader.join()


def create_database(server_url: str, name: str) -> None:
    """CREATE DATABASE `name` on the server `server_url` reaches (an administrator's URL)."""
    with psycopg.connect(server_url, autocommit=True, **connect_kwargs(server_url)) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


def _applied(conn: psycopg.Connection[Any]) -> set[str] | None:
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,):
        return None
    return {r[0] for r in conn.execute("SELECT name FROM schema_migrations").fetchall()}


def _check_migrated(conn: psycopg.Connection[Any]) -> None:
    applied = _applied(conn) or set()
    missing = [name for name, _ in MIGRATIONS if name not in applied]
    if missing:
        raise ConfigurationError(f"the PostgreSQL database lacks migration {missing[0]}: open "
                                 "it once as its owner (who may create tables) to migrate it.")


def _migrate(conn: psycopg.Connection[Any]) -> None:
    """Apply the migrations not yet recorded. A role that may not create tables (the console's
    own, postgres_roles.sql) gets here only when nothing is pending, and only reads."""
    applied = _applied(conn)
    if applied is not None and all(name in applied for name, _ in MIGRATIONS):
        return
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK])
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         "name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
            done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
            for name, sql in MIGRATIONS:
                if name not in done:
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)",
                                 [name, utc_text()])
    except psycopg.errors.InsufficientPrivilege:
        _check_migrated(conn)
        raise
