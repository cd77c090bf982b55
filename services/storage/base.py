"""The store interface: every read and write the console makes, in one place, for two databases.

SQLite (services/storage/sqlite.py) is the embedded default; PostgreSQL
(services/storage/postgres.py) serves a team. Nothing outside this package writes SQL: the audit
trail, the intent journal, reminders and the workspace call these methods, and
tests/test_store_contract.py runs one suite against both implementations.

Transactions: `with store.transaction():` opens one on the calling thread; every store method
called on that thread inside it joins it (the audit entry commits with the change it records).
Tokens never come here: no table has a column for them.
"""

from __future__ import annotations

import sqlite3
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import orjson

from services.consent import ConsentRecord, Revocation

__all__ = [
    "AUDIT_COLUMNS",
    "AUDIT_VERIFY_COLUMNS",
    "ORDER_COLUMNS",
    "Approval",
    "Lease",
    "OperatorSession",
    "QueuedOrder",
    "Store",
    "StoredConsent",
    "database_errors",
    "now_utc",
    "utc_text",
]


def now_utc() -> datetime:
    return datetime.now(UTC)


def utc_text(moment: datetime | None = None) -> str:
    return (moment or now_utc()).astimezone(UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def database_errors() -> tuple[type[BaseException], ...]:
    """What a refused write raises, whichever database: callers that must survive one catch
    these (`except database_errors():` is evaluated only when something was raised).
    psycopg's errors count once psycopg is loaded: only a PostgreSQL store loads it, and none
    can be raised before. Importing it up front cost every SQLite command 150-250 ms."""
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.Error,) if psycopg is None else (sqlite3.Error, psycopg.Error)

# The audit table's columns; every one but `hash` goes into the hash (services/audit.py).
AUDIT_COLUMNS = ("seq", "at", "operator", "action", "merchant_id", "order_id", "version",
                 "amount", "currency", "consent_id", "consent_sha256", "batch_id",
                 "approved_set_sha256", "idempotency_key", "outcome", "square_code", "detail",
                 "prev_hash", "hash")
# `audit_rows` gives these: the hashed fields sorted by name (as the canonical JSON orders
# them), then the stored hash.
AUDIT_VERIFY_COLUMNS = (*sorted(AUDIT_COLUMNS[:-1]), "hash")

ORDER_COLUMNS = ("order_id", "merchant_id", "location_id", "version", "state", "source",
                 "reference_id", "total_amount", "currency", "due_amount", "created_at",
                 "updated_at", "eligible", "reason", "detail", "consent_id", "fulfillments",
                 "order_json", "seen_at")
INTENT_COLUMNS = ("intent_id", "attempt", "idempotency_key", "batch_id", "merchant_id",
                  "order_id", "location_id", "version", "amount", "currency", "consent_id",
                  "consent_sha256", "operator", "created_at", "body_json")


@dataclass(frozen=True)
class StoredConsent:
    record: ConsentRecord
    document: dict[str, Any]
    sha256: str
    version: int
    imported_at: str
    imported_by: str


# Square's form of a time (RFC 3339, UTC, milliseconds: `2026-11-26T12:00:00.123Z`), by where
# its separators are. A time Python reads that has them is of that form, digits in between, and
# text of that form sorts as its time: the database can count by comparing text. (A match that
# Python would not read, like `2026-02-30T...`, is counted by its text, never refused.)
SQUARE_TIME_GLOB = "????-??-??T??:??:??.???Z"
SQUARE_TIME_LIKE = "____-__-__T__:__:__.___Z"


def edges_passed(edges: Sequence[str], at: int = 0, placeholder: str = "?"
                 ) -> tuple[str, list[str]]:
    """SQL for how many of `edges` (newest first) a created_at is at or before, and its
    parameters: a binary search (CASE in CASE), a few comparisons a row however many edges."""
    if not edges:
        return str(at), []
    middle = len(edges) // 2
    after, after_params = edges_passed(edges[middle + 1:], at + middle + 1, placeholder)
    before, before_params = edges_passed(edges[:middle], at, placeholder)
    return (f"CASE WHEN created_at <= {placeholder} THEN {after} ELSE {before} END",
            [edges[middle], *after_params, *before_params])


def counts_at_edges(rows: Iterable[Sequence[Any]], edges: Sequence[str]
                    ) -> dict[str, tuple[int, ...] | None]:
    """`candidates_by_age`'s answer from its query's rows (merchant, edges passed, count,
    how many in Square's form): per merchant, how many at all and at or before each edge;
    None for a merchant with a time in another form (Python counts those)."""
    found: dict[str, list[int] | None] = {}
    for merchant_id, passed, count, square_form in rows:
        counts = found.setdefault(merchant_id, [0] * (len(edges) + 1))
        if counts is None or square_form != count:
            found[merchant_id] = None
        else:
            counts[passed] += count
    # Those at or before edge i: every class that passed it.
    return {merchant_id: None if counts is None else
            (sum(counts), *(sum(counts[i:]) for i in range(1, len(edges) + 1)))
            for merchant_id, counts in found.items()}


class QueuedOrder(msgspec.Struct, frozen=True, gc=False):
    """An order as the queue shows it: the row of `orders`, typed (`QueuedOrder(*row)`).
    A Struct the garbage collector does not track (it holds only strings and numbers): a
    console holding 100,000 of them pays nothing for them in each full collection, which
    runs holding the GIL and so stalled the UI thread (0.8 s under load). Built 2x faster
    than a NamedTuple. `eligible` comes as 0/1."""

    order_id: str
    merchant_id: str
    location_id: str
    version: int | None
    state: str
    source: str | None
    reference_id: str | None
    total_amount: int
    currency: str
    due_amount: int
    created_at: str
    eligible: bool
    reason: str | None
    detail: str | None
    consent_id: str | None
    fulfillments: str
    fetched_at: str | None = None   # when discovery last read it from Square (`seen_at`)


class Lease(NamedTuple):
    """Who works on a merchant right now (a row of `leases`)."""

    merchant_id: str
    operator: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: str
    expires_at: str
    token: str

    def describe(self) -> str:
        return (f"{self.operator} on {self.host} (pid {self.pid}) since {self.started_at}, "
                f"last heartbeat {self.heartbeat_at}")


class Approval(NamedTuple):
    """A prepared batch and its four-eyes decision (a row of `approvals`). `items_json` is
    [[merchant_id, order_id, version], ...] sorted; `totals_json` {merchant: {currency:
    minor units}} as the preparer saw them. status: pending, approved, rejected, used."""

    batch_id: str
    approved_set_sha256: str
    items_json: str
    totals_json: str
    orders: int
    why: str
    prepared_by: str
    prepared_at: str
    status: str
    decided_by: str | None = None
    decided_at: str | None = None
    reason: str | None = None
    expires_at: str | None = None
    used_by: str | None = None
    used_at: str | None = None


class OperatorSession(NamedTuple):
    """An open console or a running command (a row of `operator_sessions`)."""

    session_id: str
    operator: str
    host: str
    pid: int
    kind: str        # "console", "read-only console", "complete", "recover"
    started_at: str
    last_seen: str


# Given the chain's last (seq, hash), or (0, None) when it is empty: the complete entries to
# append after it (every AUDIT_COLUMNS key), chained in order.
AuditBuilder = Callable[[int, str | None], list[dict[str, Any]]]


class Store(ABC):
    """One database. `Store(db)` opens the implementation for `db`: a path (SQLite) or a
    `postgresql://` URL (see `services.storage.open_store`)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Store:
        if cls is Store:  # the interface itself: pick the implementation by the location
            from services.storage import implementation_for
            cls = implementation_for(args[0] if args else kwargs["path"])
        return super().__new__(cls)

    # What `Store(location)` reopens (a path, ":memory:", or a URL without a password).
    location: Path | str

    # ------------------------------------------------------------------ life cycle
    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A durable transaction on this thread; store calls inside it join it."""

    @abstractmethod
    def cache_transaction(self) -> AbstractContextManager[Any]:
        """A transaction for what can be read from Square again: atomic, and allowed to commit
        without waiting for the disk (a later durable commit makes it durable too)."""

    def large_writes(self) -> AbstractContextManager[Any]:
        """Around many cache transactions in a row (a discovery): whatever makes them cheaper
        (the SQLite store: a larger page cache); nothing here."""
        return nullcontext()

    @abstractmethod
    def commit_group(self, parts: Sequence[Callable[[Store], None]]
                     ) -> list[BaseException | None]:
        """The intent journal's group commit: one transaction, each part in a savepoint of its
        own (a refused part does not take the others with it). Returns each part's error (a
        database error) or None; all the same error when the commit itself failed."""

    @abstractmethod
    def writer(self) -> Store | None:
        """A store for the journal's writer thread (its own connection), or None when this one
        must be used on the caller's thread (an in-memory SQLite database)."""

    @abstractmethod
    def for_thread(self) -> Store:
        """A store another thread may use (the caller closes it with `close`)."""

    @abstractmethod
    def close(self) -> None: ...

    def change_feed(self) -> Any | None:
        """A feed that is told of changes (services/changes.ChangeFeed), or None: then the
        console polls `change_version` (SQLite)."""
        return None

    # ------------------------------------------------------------------ consents
    @abstractmethod
    def save_consent(self, record: ConsentRecord, document: dict[str, Any], operator: str,
                     source: str) -> tuple[str, int]:
        """Store a record; returns ('unchanged' | 'new' | 'new_version', version)."""

    def consents(self, merchant_id: str | None = None) -> list[StoredConsent]:
        """The latest version of every consent (optionally one merchant's), with any durable
        revocation applied."""
        rows = self._latest_consent_rows(merchant_id)
        revocations = self.revocations()
        result = []
        for row in rows:
            document = orjson.loads(row[3])
            record = ConsentRecord.model_validate(document)
            durable = revocations.get(record.consent_id)
            # A later version without `revocation` (or with a later one) does not undo it.
            if durable is not None and (record.revocation is None
                                        or durable.revoked_at < record.revocation.revoked_at):
                record = record.model_copy(update={"revocation": durable})
            result.append(StoredConsent(record, document, row[4], int(row[1]), row[5], row[6]))
        return result

    @abstractmethod
    def _latest_consent_rows(self, merchant_id: str | None) -> list[tuple[Any, ...]]:
        """(consent_id, version, merchant_id, record_json, record_sha256, imported_at,
        imported_by) of each consent's latest version (only `merchant_id`'s if given), by
        merchant and consent id."""

    @abstractmethod
    def latest_consent_sha256(self, consent_id: str) -> str | None: ...

    @abstractmethod
    def consent_merchant_id(self, consent_id: str) -> str | None:
        """The merchant a consent id was first stored for (an id never moves to another)."""

    @abstractmethod
    def revocations(self) -> dict[str, Revocation]:
        """Every revoked consent id and its earliest revocation (which is the one in force)."""

    @abstractmethod
    def record_revocation(self, record: ConsentRecord, operator: str, source: str) -> None:
        """Keep `record.revocation` for good (final: the table refuses UPDATE and DELETE)."""

    @abstractmethod
    def consents_revision(self) -> int:
        """Grows whenever a consent version or a revocation is added."""

    @abstractmethod
    def consent_versions(self, consent_id: str) -> int: ...

    # ------------------------------------------------------------------ merchants
    @abstractmethod
    def upsert_merchant(self, row: dict[str, Any]) -> None:
        """Insert, or update the columns given."""

    @abstractmethod
    def merchants(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def merchant(self, merchant_id: str) -> dict[str, Any] | None: ...

    # ------------------------------------------------------------------ orders
    @abstractmethod
    def replace_orders(self, merchant_id: str, rows: list[dict[str, Any]]) -> None:
        """What discovery saw for a merchant replaces what was there (own transaction)."""

    @abstractmethod
    def write_orders(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows in `ORDER_COLUMNS` order; an order id already stored is replaced."""

    @abstractmethod
    def drop_orders(self, merchant_id: str, *, keep_locations: Sequence[str] | None = None,
                    at_locations: Sequence[str] | None = None,
                    order_ids: Sequence[str] | None = None) -> None: ...

    @abstractmethod
    def orders_json(self, merchant_id: str, reason: str | None = None
                    ) -> list[tuple[str, str]]: ...

    @abstractmethod
    def order_documents(self, merchant_id: str) -> list[tuple[str, str]]:
        """(order_json, seen_at) of the merchant's stored orders (to classify them again)."""

    @abstractmethod
    def update_verdicts(self, rows: Sequence[tuple[int, str | None, str, str | None, str]]
                        ) -> None: ...

    @abstractmethod
    def order_marks(self, merchant_id: str) -> dict[str, tuple[str, str]]: ...

    @abstractmethod
    def save_order_marks(self, merchant_id: str, marks: dict[str, tuple[str, str]]) -> None: ...

    @abstractmethod
    def order_sync(self, merchant_id: str) -> tuple[str, str | None] | None: ...

    @abstractmethod
    def save_order_sync(self, merchant_id: str, fetched_at: str, consent_sig: str | None
                        ) -> None: ...

    @abstractmethod
    def merchant_order_counts(self, merchant_id: str) -> tuple[int, int]: ...

    @abstractmethod
    def queued_orders(self, merchant_id: str | None = None, eligible_only: bool = False,
                      ordered: bool = True) -> list[QueuedOrder]: ...

    @abstractmethod
    def queued_orders_json(self, refreshed: Sequence[str], eligible_only: bool = False,
                           merchant_ids: Sequence[str] | None = None, chunk: int = 5000
                           ) -> Iterator[list[bytes]]:
        """`queue --json`'s orders (interfaces.md), in `queued_orders`' order, each a JSON
        object (UTF-8) built by the database itself, a chunk at a time: keys, values and their order
        as `queue --json` has always written them; `"stale": true` for merchants not in
        `refreshed`. No object per order in Python: 100,000 orders as dicts and through
        orjson cost 4x more CPU (issue 11). The text is not yet `json_inert`: the caller
        writes it through that."""

    @abstractmethod
    def queued_orders_json_joined(self, merchants: Sequence[tuple[str, bool]], separator: str,
                                  eligible_only: bool = False) -> bytes:
        """`queued_orders_json`'s objects of `merchants` (each with whether it is stale), in
        that order, joined by `separator` in one text (UTF-8; empty without any), by the
        database."""

    @abstractmethod
    def merchants_with_orders(self) -> list[str]:
        """Every merchant some order is stored for, sorted as Python sorts."""

    @abstractmethod
    def oldest_orders(self, merchant_id: str | None = None, limit: int = 200
                      ) -> list[QueuedOrder]:
        """The `limit` oldest open orders (ties by id): the queue's first screenful, shown
        before the rest has loaded, in the order the full queue sorts them by age."""

    @abstractmethod
    def candidate_created_at(self, merchant_id: str) -> list[str]:
        """`created_at` of the merchant's eligible orders (the backlog chart counts them)."""

    @abstractmethod
    def candidates_by_age(self, merchant_ids: Sequence[str], edges: Sequence[str]
                          ) -> dict[str, tuple[int, ...] | None]:
        """Per merchant with eligible orders: (how many, how many created at or before each
        of `edges`), counted by the database; `edges` are times in Square's form, newest
        first. None for a merchant with a `created_at` in another form (its text may not
        sort as its time): the caller reads those times itself. Issue 11: parsing 100,000
        times in Python at every refresh cost more than the whole count here."""

    @abstractmethod
    def waiting_orders(self, reasons: Sequence[str]) -> list[tuple[Any, ...]]:
        """Open ineligible orders with one of `reasons`: (merchant_id, order_id, location_id,
        reference_id, created_at, total_amount, currency, reason)."""

    @abstractmethod
    def order_json(self, order_id: str) -> dict[str, Any] | None: ...

    # ------------------------------------------------------------------ batches and intents
    @abstractmethod
    def insert_batch(self, batch_id: str, operator: str, approved_sha256: str,
                     approved_json: str) -> None: ...

    @abstractmethod
    def finish_batch(self, batch_id: str, status: str) -> None: ...

    def next_attempt(self, order_id: str, version: int) -> int:
        return self.next_attempts([(order_id, version)])[(order_id, version)]

    @abstractmethod
    def next_attempts(self, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], int]: ...

    def insert_intent(self, row: dict[str, Any]) -> None:
        self.insert_intents([row])

    @abstractmethod
    def insert_intents(self, rows: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    def settle_intent(self, intent_id: str, outcome: str, reason: str | None,
                      square_code: str | None, detail: str) -> None:
        """Only an open intent is settled: a second writer never overwrites an outcome."""

    def settle_intents(self, rows: Sequence[tuple[str, str, str | None, str | None, str]]
                       ) -> None:
        """`settle_intent` for many (intent_id, outcome, reason, square_code, detail)."""
        for intent_id, outcome, reason, square_code, detail in rows:
            self.settle_intent(intent_id, outcome, reason, square_code, detail)

    def drop_completed_order(self, order_id: str) -> None:
        self.drop_completed_orders([order_id])

    @abstractmethod
    def drop_completed_orders(self, order_ids: list[str]) -> None: ...

    @abstractmethod
    def open_intents(self, merchant_id: str | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def open_intent_count(self) -> int: ...

    @abstractmethod
    def recent_batches(self, merchant_id: str, limit: int = 5) -> list[dict[str, Any]]: ...

    # ------------------------------------------------------------------ backlog history
    @abstractmethod
    def record_backlog(self, rows: list[tuple[str, str, tuple[int, int, int, int, int]]],
                       recorded_at: str, rebuilt: bool = False) -> None: ...

    @abstractmethod
    def has_backlog_history(self, merchant_id: str) -> bool: ...

    @abstractmethod
    def backlog_history(self, merchant_id: str, since_day: str
                        ) -> dict[str, tuple[tuple[int, int, int, int, int], bool]]: ...

    # ------------------------------------------------------------------ leases
    @abstractmethod
    def take_lease(self, lease: Lease, free: Callable[[Lease], bool]) -> Lease:
        """Atomically take `lease` unless another holder's lease is in force (`free` says
        whether a found lease's holder is gone). Returns the lease in force afterwards."""

    def take_leases(self, leases: Sequence[Lease], free: Callable[[Lease], bool]
                    ) -> list[Lease]:
        """`take_lease` for each, in one transaction (one durable commit for all); the lease
        in force afterwards for each, in order."""
        with self.transaction():
            return [self.take_lease(lease, free) for lease in leases]

    @abstractmethod
    def heartbeat_leases(self, token: str, heartbeat_at: str, expires_at: str) -> set[str]:
        """Extend every lease this holder still has; returns their merchant ids."""

    @abstractmethod
    def release_lease(self, merchant_id: str, token: str) -> None: ...

    def release_leases(self, merchant_ids: Sequence[str], token: str) -> None:
        """`release_lease` for each, in one transaction (one durable commit for all)."""
        with self.transaction():
            for merchant_id in merchant_ids:
                self.release_lease(merchant_id, token)

    @abstractmethod
    def leases(self) -> list[Lease]: ...

    # ------------------------------------------------------------------ audit
    @abstractmethod
    def append_audit(self, build: AuditBuilder) -> list[dict[str, Any]]:
        """Append the entries `build` makes after the chain's head, serialized against every
        other writer (the chain never forks), inside the open transaction or one of its own."""

    def audit_entries(self, filters: dict[str, Any], since: str | None, until: str | None,
                      limit: int | None, newest_first: bool) -> Iterator[dict[str, Any]]:
        """Entries whose columns equal `filters`, with `at` in [since, until), by seq."""
        mark = self._MARK
        sql = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit WHERE 1=1"
        params: list[Any] = []
        for column, value in filters.items():
            if column not in AUDIT_COLUMNS:  # a column name goes into the SQL: known ones only
                raise ValueError(f"unknown audit column {column!r}")
            sql += f" AND {column} = {mark}"
            params.append(value)
        if since is not None:
            sql += f" AND at >= {mark}"
            params.append(since)
        if until is not None:
            sql += f" AND at < {mark}"
            params.append(until)
        sql += " ORDER BY seq" + (" DESC" if newest_first else "")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self._stream(sql, params, 5000):
            yield dict(zip(AUDIT_COLUMNS, row, strict=True))

    # The driver's parameter mark (sqlite3: ?, psycopg: %s).
    _MARK = "?"

    @abstractmethod
    def _stream(self, sql: str, params: Sequence[Any], size: int
                ) -> Iterator[tuple[Any, ...]]:
        """The rows of a query, fetched `size` at a time (never all of them in memory)."""

    @abstractmethod
    def audit_rows(self, first: int, end: int | None) -> Iterator[tuple[Any, ...]]:
        """Entries first..end-1 (to the last if end is None) by seq, as AUDIT_VERIFY_COLUMNS
        tuples, streamed (never the whole chain in memory)."""

    @abstractmethod
    def audit_extent(self) -> tuple[int, int]:
        """(highest seq or 0, number of entries)."""

    @abstractmethod
    def audit_hash_at(self, seq: int) -> str | None: ...

    @abstractmethod
    def audit_last(self) -> tuple[int, str] | None:
        """(seq, hash) of the last entry."""

    # ------------------------------------------------------------------ reminders
    @abstractmethod
    def reminders_last_sent(self) -> dict[str, str]:
        """Merchant id -> when its last reminder was sent."""

    @abstractmethod
    def reminder_heads(self) -> tuple[list[tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
        """Per merchant, its latest outbox row (merchant_id, message_id, window_index,
        created_at, status, next_attempt_at), and its latest sent one (merchant_id,
        settled_at, order_ids_json, age_step)."""

    @abstractmethod
    def reminder_opt_outs(self) -> list[tuple[str, str, str]]:
        """(merchant_id, by, reason) of every merchant opted out now."""

    @abstractmethod
    def save_reminder_opt_out(self, merchant_id: str, opted_out: bool, by: str, reason: str,
                              at: str) -> None: ...

    @abstractmethod
    def reminder_message(self, message_id: str) -> str | None: ...

    @abstractmethod
    def insert_reminder(self, row: dict[str, Any]) -> bool:
        """A new outbox row; False when the merchant already has one for that window."""

    @abstractmethod
    def retake_reminder(self, message_id: str, holder: str, operator: str) -> str | None:
        """Take a deferred row up again; its stored message, or None if another run did."""

    @abstractmethod
    def drop_unsent_reminder(self, message_id: str) -> None: ...

    @abstractmethod
    def reminder_attempts(self, message_id: str) -> tuple[int, str]:
        """(attempts so far, created_at) of an outbox row."""

    @abstractmethod
    def settle_reminder(self, message_id: str, status: str, reason: str | None,
                        detail: str | None, attempts: int, next_attempt_at: str | None,
                        settled_at: str) -> None: ...

    @abstractmethod
    def deferred_reminder(self, message_id: str) -> tuple[Any, ...] | None:
        """(merchant_id, kind, recipients_json, orders) of a deferred row."""

    @abstractmethod
    def set_reminder_reason(self, message_id: str, reason: str) -> None: ...

    @abstractmethod
    def open_reminders(self) -> list[tuple[Any, ...]]:
        """Rows without an outcome: (message_id, merchant_id, kind, recipients_json, orders,
        message_eml, holder, created_at, business name), oldest first."""

    @abstractmethod
    def reminder_history(self, merchant_id: str | None) -> list[tuple[Any, ...]]:
        """(message_id, merchant_id, business name, kind, recipients_json, orders, status,
        reason, detail, attempts, created_at, settled_at, operator), newest first."""

    # ------------------------------------------------------------------ four-eyes approvals
    # Writers are called inside the caller's `transaction()`, so each change commits with
    # its audit entry (services/completion/approvals.py).
    @abstractmethod
    def insert_approval(self, approval: Approval) -> None: ...

    @abstractmethod
    def approval(self, batch_id: str) -> Approval | None: ...

    @abstractmethod
    def approvals(self, statuses: Sequence[str] | None = None) -> list[Approval]:
        """Prepared batches, oldest first; only those in `statuses` if given."""

    @abstractmethod
    def decide_approval(self, batch_id: str, status: str, decided_by: str, decided_at: str,
                        reason: str | None, expires_at: str | None) -> bool:
        """Approve or reject a pending batch; False when it is no longer pending."""

    @abstractmethod
    def use_approval(self, batch_id: str, used_by: str, used_at: str) -> bool:
        """Claim an approved, unexpired batch for one run; False if it is not (any more)."""

    @abstractmethod
    def sent_without_approval(self, since: str) -> list[tuple[str, str, int | None, str | None]]:
        """(operator, order_id, amount, currency) of orders sent since `since` (intents
        completed or still in doubt, not failed nor skipped) in batches that ran without a
        second operator's approval: four-eyes counts them with an operator's next batch."""

    @abstractmethod
    def order_amounts(self, order_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """order id -> (total amount, currency) among `order_ids`: from the queue, else from
        the order's latest intent (an order sent before, e.g. a retry of the failed)."""

    # ------------------------------------------------------------------ presence and changes
    @abstractmethod
    def change_version(self) -> int:
        """The change counter: it moves whenever something an open console shows changes
        (orders, outcomes, consents, revocations, leases taken or released)."""

    @abstractmethod
    def register_session(self, session: OperatorSession, forget_before: str) -> None:
        """Add (or replace) an operator session, and forget those unseen since
        `forget_before` (the table stays the size of the team)."""

    @abstractmethod
    def touch_session(self, session_id: str, last_seen: str) -> bool:
        """The session's heartbeat; False when its row is gone (forgotten: register again)."""

    @abstractmethod
    def end_session(self, session_id: str) -> None: ...

    @abstractmethod
    def sessions(self, seen_since: str) -> list[OperatorSession]:
        """Sessions whose last heartbeat is at or after `seen_since`, by operator."""
