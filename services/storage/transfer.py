"""Moving a team onto PostgreSQL: copy a SQLite database's history into an empty PostgreSQL one
(`recon-console db migrate --to postgresql://...`).

What moves is what cannot be read from Square again: consents (every version) and their
revocations, merchants, batches and intents (the attempt numbers behind idempotency keys), the
audit chain byte for byte (same seq, times and hashes, so it verifies to the same head), the
reminder outbox (one reminder per merchant per window) and opt-outs, four-eyes approvals (an
approval used stays used), and the backlog history.
Discovered orders, refresh marks and leases are caches or live state: the first refresh on
PostgreSQL reads the orders again.

The copy is one PostgreSQL transaction, taken while the SQLite file's write lock is held, so
nothing lands in the file meanwhile and a failure leaves the target untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from services.errors import ConfigurationError
from services.storage.postgres import PostgresStore
from services.storage.sqlite import SQLiteStore

__all__ = ["MOVED_TABLES", "NOT_MOVED", "OpenIntents", "TargetNotEmpty", "copy_tables",
           "source_snapshot"]

# In this order (rows in each by their order in SQLite: rowid, which is seq for the audit).
MOVED_TABLES = ("consents", "consent_revocations", "merchants", "batches", "approvals", "intents",
                "audit", "reminder_outbox", "reminder_opt_outs", "backlog_history")
# Read from Square again, or only meaningful to a running process (sessions, the change
# counter each database keeps for its own consoles).
NOT_MOVED = ("orders", "order_marks", "order_sync", "leases", "operator_sessions",
             "change_counter")
# Serial columns copied with their values: their sequences move on past the copied rows.
_SERIALS = (("consent_revocations", "seq"),)


class OpenIntents(ConfigurationError):
    """The source has intents without an outcome: an interrupted batch must be settled first."""


class TargetNotEmpty(ConfigurationError):
    """The target database already holds a history: two chains cannot be merged."""


@dataclass
class Copied:
    rows: dict[str, int] = field(default_factory=dict)
    audit_head: tuple[int, str] | None = None


@contextmanager
def source_snapshot(source: SQLiteStore) -> Iterator[None]:
    """Hold the SQLite write lock for the whole copy: no batch, import or revocation can land
    in the file between the checks and the last row read (readers are not blocked)."""
    with source.transaction():
        open_count = source.open_intent_count()
        if open_count:
            raise OpenIntents(
                f"{open_count} completion intent{'s are' if open_count != 1 else ' is'} still "
                "open in the SQLite database (a batch was interrupted): run `recon-console "
                "recover` on it first, then migrate")
        yield


def _source_columns(source: SQLiteStore, table: str) -> list[str]:
    return [row[1] for row in source.conn.execute(f"PRAGMA table_info({table})")]


def _target_columns(conn: Any, table: str) -> set[str]:
    return {row[0] for row in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = %s", [table]).fetchall()}


def _refuse_unless_empty(conn: Any) -> None:
    held = [table for table in (*MOVED_TABLES, "orders")
            if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]]
    head = conn.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
    if held or (head is not None and head[0]):
        raise TargetNotEmpty(f"the PostgreSQL database already holds "
                             f"{', '.join(held) or 'an audit chain'}: migrate into a new, empty "
                             "database (two audit chains cannot be merged)")


def copy_tables(source: SQLiteStore, target: PostgresStore,
                before_commit: Callable[[], None] | None = None,
                tables: Sequence[str] = MOVED_TABLES) -> Copied:
    """Copy `tables` row for row inside one target transaction (call inside source_snapshot).
    `before_commit` runs inside it, through `target` (which joins it), after the last row:
    whatever it raises rolls the whole copy back."""
    copied = Copied()
    with target.transaction() as conn:
        # One migration at a time into a database (a second one would see it empty too).
        conn.execute("LOCK TABLE audit_head IN EXCLUSIVE MODE")
        _refuse_unless_empty(conn)
        for table in tables:
            columns = _source_columns(source, table)
            missing = set(columns) - _target_columns(conn, table)
            if missing:  # a schema drift between the two stores: copy nothing at all
                raise ConfigurationError(f"the PostgreSQL table {table} lacks the columns "
                                         f"{sorted(missing)} of the SQLite one: update the "
                                         "console on both sides and retry")
            names = ", ".join(columns)
            order = "seq" if table == "audit" else "rowid"
            count = 0
            with conn.cursor() as cursor, cursor.copy(
                    f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in source.conn.execute(f"SELECT {names} FROM {table} ORDER BY {order}"):
                    copy.write_row(row)
                    count += 1
            copied.rows[table] = count
        for table, column in _SERIALS:
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                         f"GREATEST((SELECT max({column}) FROM {table}), 1), "
                         f"(SELECT max({column}) FROM {table}) IS NOT NULL)")
        head = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if head is not None:
            conn.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
                         [head[0], head[1]])
            copied.audit_head = (int(head[0]), str(head[1]))
        if before_commit is not None:
            before_commit()
    return copied
