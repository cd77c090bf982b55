"""One contract, two stores: every test here runs against SQLite and against a real PostgreSQL
(tests/pg_support.py starts one; without it the PostgreSQL half is skipped with a visible
reason, or fails under RECON_REQUIRE_POSTGRES=1). No mocks: what the console relies on from its
store must hold for both.

Covered: consents (import, versions, revocation final), the queue (write, drop, marks, sync,
verdicts), intents and outcomes (attempts, open intents, settle once), the journal's group
commit, leases (take, heartbeat, release, expiry), the audit (append, verify, tamper detection,
append-only, concurrent writers), signed checkpoints, migrations.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.audit import AuditAction, AuditTrail, ChainProblem
from services.checkpoints import CheckpointAnchor
from services.consent import ConsentRecord, record_sha256
from services.storage import database_errors, open_store
from services.storage.base import ORDER_COLUMNS, Lease, Store
from services.storage.sqlite import SQLiteStore
from services.store import utc_text
from tests.conftest import consent_document as base_consent
from tests.pg_support import set_template_setup

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _migrate(url: str) -> None:
    open_store(url).close()


# Every test database starts migrated (copied from a migrated template): ~1 s less per test.
set_template_setup(_migrate)


@dataclass
class Backend:
    kind: str
    store: Store
    url: str | None = None   # PostgreSQL: where to reach it as its owner

    def raw(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """What someone holding the database itself (its owner) could run."""
        if isinstance(self.store, SQLiteStore):
            cursor = self.store.conn.execute(sql, params or [])
            return cursor.fetchall()
        import psycopg
        with psycopg.connect(self.url or "", autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params or [])  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def drop_guards(self, table: str) -> None:
        """The owner can switch the triggers off: then only the chain's hashes tell."""
        if self.kind == "sqlite":
            for name in ("update", "delete"):
                self.raw(f"DROP TRIGGER IF EXISTS {table}_no_{name}")
        else:
            self.raw(f"ALTER TABLE {table} DISABLE TRIGGER USER")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        store: Store = SQLiteStore(tmp_path / "contract.db")
        yield Backend("sqlite", store)
    else:
        url = request.getfixturevalue("pg_url")
        store = open_store(url)
        yield Backend("postgres", store, url)
    store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


C1 = "00000000-0000-4000-8000-000000000001"
C2 = "00000000-0000-4000-8000-000000000002"


def consent_document(consent_id: str = C1, merchant_id: str = "M1", **changes: Any
                     ) -> dict[str, Any]:
    return base_consent(merchant_id, consent_id=consent_id, **changes)


def record_of(document: dict[str, Any]) -> ConsentRecord:
    return ConsentRecord.model_validate(document)


# ---------------------------------------------------------------------- consents
def test_consent_import_versions_and_owner(store: Store) -> None:
    first = consent_document()
    assert store.save_consent(record_of(first), first, "op", "f.json") == ("new", 1)
    assert store.save_consent(record_of(first), first, "op", "f.json") == ("unchanged", 1)
    revision = store.consents_revision()
    second = consent_document(expires_at="2027-01-01T00:00:00Z")
    assert store.save_consent(record_of(second), second, "op", "g.json") == ("new_version", 2)
    assert store.consents_revision() > revision
    [stored] = store.consents()
    assert stored.version == 2 and stored.sha256 == record_sha256(second)
    assert stored.record.expires_at is not None and stored.imported_by == "op"
    assert store.latest_consent_sha256(C1) == record_sha256(second)
    assert store.consent_merchant_id(C1) == "M1" and store.consent_versions(C1) == 2
    other = consent_document(C2, "M2")
    store.save_consent(record_of(other), other, "op", "h.json")
    assert [c.record.consent_id for c in store.consents("M2")] == [C2]
    assert store.consent_merchant_id("nope") is None


def test_revocation_is_final(backend: Backend) -> None:
    store = backend.store
    revoked = consent_document(revocation={"revoked_at": "2026-06-01T00:00:00Z",
                                           "revoked_by": "Ann", "reason": "stop"})
    with store.transaction():
        store.save_consent(record_of(revoked), revoked, "op", "revoke")
        store.record_revocation(record_of(revoked), "op", "revoke")
    # A later import of the same id without the revocation does not undo it.
    again = consent_document(expires_at="2027-12-01T00:00:00Z")
    store.save_consent(record_of(again), again, "op", "later.json")
    [stored] = store.consents()
    assert stored.version == 2 and stored.record.revocation is not None
    assert stored.record.revocation.revoked_by == "Ann"
    assert set(store.revocations()) == {C1}
    # And the database keeps it so: the revocations table refuses change.
    for sql in ("UPDATE consent_revocations SET reason = 'oops'",
                "DELETE FROM consent_revocations"):
        with pytest.raises(database_errors(), match="revocations are final"):
            backend.raw(sql)
    assert set(store.revocations()) == {C1}


# ---------------------------------------------------------------------- the queue
def order_values(order_id: str, merchant_id: str = "M1", location_id: str = "L1",
                 eligible: int = 1, created_at: str = "2026-11-20T10:00:00.000000Z",
                 reason: str | None = None, seen_at: str = "2026-11-26T11:00:00.000000Z"
                 ) -> list[Any]:
    row = {"order_id": order_id, "merchant_id": merchant_id, "location_id": location_id,
           "version": 3, "state": "OPEN", "source": "Square Online", "reference_id": None,
           "total_amount": 1250, "currency": "USD", "due_amount": 0, "created_at": created_at,
           "updated_at": None, "eligible": eligible, "reason": reason, "detail": "",
           "consent_id": "C1" if eligible else None, "fulfillments": "",
           "order_json": f'{{"id": "{order_id}"}}', "seen_at": seen_at}
    return [row[c] for c in ORDER_COLUMNS]


def test_queue_write_drop_and_marks(store: Store) -> None:
    store.upsert_merchant({"merchant_id": "M1", "business_name": "Shop"})
    store.upsert_merchant({"merchant_id": "M1", "timezone": "UTC"})
    assert store.merchant("M1") == {**store.merchant("M1"), "business_name": "Shop",  # type: ignore[dict-item]
                                    "timezone": "UTC"}
    with store.cache_transaction():
        store.write_orders([order_values("B", created_at="2026-11-21T00:00:00.000000Z"),
                            order_values("A"), order_values("C", location_id="L2"),
                            order_values("D", eligible=0, reason="NO_CONSENT"),
                            order_values("Z", merchant_id="M2")])
    # Oldest first (B is the youngest), then by id.
    assert [o.order_id for o in store.queued_orders("M1")] == ["A", "C", "D", "B"]
    assert [o.order_id for o in store.queued_orders("M1", eligible_only=True)] == [
        "A", "C", "B"]
    assert store.merchant_order_counts("M1") == (4, 3)
    assert store.order_json("A") == {"id": "A"} and store.order_json("nope") is None
    assert [r[1] for r in store.waiting_orders(["NO_CONSENT"])] == ["D"]
    # The same order id again replaces the row (an id is Square's, unique).
    store.write_orders([order_values("A", eligible=0, reason="REFUNDED")])
    assert store.merchant_order_counts("M1") == (4, 2)
    store.update_verdicts([(1, None, "ok", "C1", "A")])
    assert store.merchant_order_counts("M1") == (4, 3)
    assert dict(store.orders_json("M1", "NO_CONSENT")) == {"D": '{"id": "D"}'}
    assert store.order_documents("M2") == [('{"id": "Z"}', "2026-11-26T11:00:00.000000Z")]
    # A refresh confirms unchanged orders through the sync time, without rewriting them.
    with store.transaction():
        store.save_order_sync("M1", "2026-11-26T11:30:00.000000Z", "sig")
        store.save_order_marks("M1", {"L1": ("m1", "f1"), "L2": ("m2", "f2")})
    assert store.order_sync("M1") == ("2026-11-26T11:30:00.000000Z", "sig")
    assert {o.fetched_at for o in store.queued_orders("M1")} == {"2026-11-26T11:30:00.000000Z"}
    assert store.order_marks("M1") == {"L1": ("m1", "f1"), "L2": ("m2", "f2")}
    with store.transaction():
        store.save_order_marks("M1", {"L1": ("m3", "f3")})
        store.drop_orders("M1", keep_locations=["L1"])
    assert store.order_marks("M1") == {"L1": ("m3", "f3")}
    assert [o.order_id for o in store.queued_orders("M1")] == ["A", "D", "B"]
    store.drop_orders("M1", order_ids=["D"])
    store.drop_orders("M1", at_locations=["L9"])
    assert [o.order_id for o in store.queued_orders("M1")] == ["A", "B"]
    store.replace_orders("M1", [dict(zip(ORDER_COLUMNS, order_values("E"), strict=True))])
    assert [o.order_id for o in store.queued_orders()] == ["E", "Z"]
    store.drop_completed_orders(["E"])
    assert [o.order_id for o in store.queued_orders()] == ["Z"]


def test_a_refused_write_rolls_back_the_cache_transaction(store: Store) -> None:
    """All or nothing, also where the writes are pipelined (PostgreSQL): the refusal is
    raised, and what came before it is not kept."""
    store.insert_batch("B0", "op", "sha", "[]")
    with pytest.raises(database_errors()), store.cache_transaction():
        store.write_orders([order_values("A")])
        store.save_order_sync("M1", "2026-11-26T11:30:00.000000Z", "sig")
        store.insert_batch("B0", "op", "sha", "[]")  # the same id again: refused
        store.save_order_marks("M1", {"L1": ("m1", "f1")})
    assert store.queued_orders() == [] and store.order_sync("M1") is None
    assert store.order_marks("M1") == {}
    with store.cache_transaction():  # and the store goes on working
        store.write_orders([order_values("A")])
        assert [o.order_id for o in store.queued_orders()] == ["A"]  # a read inside
    assert [o.order_id for o in store.queued_orders()] == ["A"]

def test_backlog_history(store: Store) -> None:
    store.record_backlog([("2026-11-25", "M1", (1, 2, 3, 4, 5))], "t1", rebuilt=True)
    store.record_backlog([("2026-11-25", "M1", (9, 9, 9, 9, 9))], "t2", rebuilt=True)
    assert store.backlog_history("M1", "2026-11-01") == {"2026-11-25": ((1, 2, 3, 4, 5), True)}
    store.record_backlog([("2026-11-25", "M1", (0, 0, 0, 0, 1))], "t3")
    assert store.backlog_history("M1", "2026-11-01") == {"2026-11-25": ((0, 0, 0, 0, 1), False)}
    assert store.has_backlog_history("M1") and not store.has_backlog_history("M2")



def test_one_call_with_a_row_given_twice(store: Store) -> None:
    """A group's rows go to PostgreSQL as one statement (which may not touch a row twice):
    a key given twice in one call ends as one write per row, in order, would leave it."""
    store.write_orders([order_values("A", reason="first"), order_values("B"),
                        order_values("A", eligible=0, reason="last")])
    assert [(o.order_id, o.eligible, o.reason) for o in store.queued_orders("M1")] == [
        ("A", 0, "last"), ("B", 1, None)]
    store.update_verdicts([(1, None, "x", "C1", "A"), (0, "NO_CONSENT", "y", None, "A")])
    assert [(o.order_id, o.reason) for o in store.queued_orders("M1")] == [
        ("A", "NO_CONSENT"), ("B", None)]
    store.record_backlog([("2026-11-25", "M1", (1, 1, 1, 1, 1)),
                          ("2026-11-25", "M1", (2, 2, 2, 2, 2))], "t1", rebuilt=True)
    assert store.backlog_history("M1", "2026-11-01") == {"2026-11-25": ((1, 1, 1, 1, 1), True)}
    store.record_backlog([("2026-11-25", "M1", (3, 3, 3, 3, 3)),
                          ("2026-11-25", "M1", (4, 4, 4, 4, 4))], "t2")
    assert store.backlog_history("M1", "2026-11-01") == {
        "2026-11-25": ((4, 4, 4, 4, 4), False)}
    with store.transaction():
        store.insert_batch("B1", "op", "sha", "[]")
        store.insert_intents([intent_row("O1", 1), intent_row("O1", 2)])
    assert store.next_attempts([("O1", 3), ("O1", 3), ("O2", 3)]) == {("O1", 3): 3,
                                                                       ("O2", 3): 1}
    store.settle_intents([("B1:O1:1", "completed", None, None, "first"),
                          ("B1:O1:1", "failed", "X", "X", "second")])
    [batch] = store.recent_batches("M1")
    assert (batch["completed"], batch["failed"], batch["open"]) == (1, 0, 1)

# ---------------------------------------------------------------------- intents
@contextmanager
def writing(store: Store) -> Iterator[Store]:
    """The store a writer process would use (`Store.writer`, a connection of its own where
    the store has one), closed after."""
    writer = store.writer() or store
    try:
        yield writer
    finally:
        if writer is not store:
            writer.close()


def intent_row(order_id: str, attempt: int, batch_id: str = "B1") -> dict[str, Any]:
    return {"intent_id": f"{batch_id}:{order_id}:{attempt}", "attempt": attempt,
            "idempotency_key": f"k-{order_id}-{attempt}", "batch_id": batch_id,
            "merchant_id": "M1", "order_id": order_id, "location_id": "L1", "version": 3,
            "amount": 1250, "currency": "USD", "consent_id": "C1", "consent_sha256": "s",
            "operator": "op", "created_at": utc_text(), "body_json": "{}"}


def test_intents_open_settle_once(store: Store) -> None:
    with store.transaction():
        store.insert_batch("B1", "op", "sha", "[]")
        assert store.next_attempts([("O1", 3), ("O2", 3)]) == {("O1", 3): 1, ("O2", 3): 1}
        store.insert_intents([intent_row("O1", 1), intent_row("O2", 1)])
    assert store.next_attempts([("O1", 3), ("O1", 4)]) == {("O1", 3): 2, ("O1", 4): 1}
    assert store.next_attempt("O1", 3) == 2
    assert [r["order_id"] for r in store.open_intents()] == ["O1", "O2"]
    assert store.open_intents("M2") == [] and store.open_intent_count() == 2
    store.settle_intent("B1:O1:1", "completed", None, None, "done")
    # A second writer (a recovery racing the batch) never overwrites an outcome.
    store.settle_intent("B1:O1:1", "failed", "X", "X", "late")
    assert [r["intent_id"] for r in store.open_intents()] == ["B1:O2:1"]
    with pytest.raises(database_errors()):  # one row per (order, version, attempt)
        store.insert_intents([intent_row("O2", 1, batch_id="B2")])
    store.finish_batch("B1", "finished")
    [batch] = store.recent_batches("M1")
    assert (batch["batch_id"], batch["status"], batch["completed"], batch["failed"],
            batch["open"]) == ("B1", "finished", 1, 0, 1)


def test_intents_settled_together_settle_once(store: Store) -> None:
    """The journal's group commit settles its outcomes in one call (one round trip on
    PostgreSQL): each open intent gets its own outcome; a settled one keeps its first."""
    with store.transaction():
        store.insert_batch("B1", "op", "sha", "[]")
        store.insert_intents([intent_row("O1", 1), intent_row("O2", 1), intent_row("O3", 1)])
    store.settle_intent("B1:O3:1", "skipped", "LEASED", None, "first")
    store.settle_intents([("B1:O1:1", "completed", None, None, "done"),
                          ("B1:O2:1", "failed", "NOT_COMPLETED", "NOT_COMPLETED", "open"),
                          ("B1:O3:1", "completed", None, None, "late")])
    store.settle_intents([])
    assert store.open_intents() == []
    [batch] = store.recent_batches("M1")
    assert (batch["completed"], batch["skipped"], batch["failed"]) == (1, 1, 1)


def test_group_commit_keeps_the_good_parts(store: Store) -> None:
    """A part the database refuses is rolled back alone; the others commit together."""
    store.insert_batch("B1", "op", "sha", "[]")

    def good(name: str) -> Callable[[Store], None]:
        return lambda s: s.insert_intents([intent_row(name, 1)])

    def refused(s: Store) -> None:
        s.insert_intents([intent_row("O3", 1)])
        s.insert_intents([intent_row("O3", 1)])  # duplicate: refused

    with writing(store) as writer:
        errors = writer.commit_group([good("O1"), refused, good("O2")])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], database_errors())
    assert sorted(r["order_id"] for r in store.open_intents()) == ["O1", "O2"]


def test_a_refused_part_takes_its_audit_entries_back_with_it(store: Store) -> None:
    """A part that appended to the audit and was then refused leaves no entry, and the next
    part's entries link to the last kept one: the chain neither forks nor breaks."""
    store.insert_batch("B1", "op", "sha", "[]")

    def entry(order_id: str) -> dict[str, Any]:
        return {"operator": "op", "action": AuditAction.INTENT, "order_id": order_id}

    def good(name: str) -> Callable[[Store], None]:
        def part(s: Store) -> None:
            s.insert_intents([intent_row(name, 1)])
            AuditTrail(s).append_many(None, [entry(name)])
        return part

    def refused(s: Store) -> None:
        AuditTrail(s).append_many(None, [entry("O3"), entry("O3")])
        s.insert_intents([intent_row("O1", 1)])  # O1's again: refused

    with writing(store) as writer:
        errors = writer.commit_group([good("O1"), refused, good("O2")])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], database_errors())
    trail = AuditTrail(store)
    assert [e["order_id"] for e in trail.entries()] == ["O1", "O2"]
    report = trail.verify()
    assert report.ok and report.entries == 2, report.sentence()


def test_group_commits_of_two_writers_never_deadlock(store: Store) -> None:
    """Two processes' journals: one group appends its intents' entries (the audit head) and
    then settles outcomes (the change counter); another settles first, then appends. Each
    waits for the other's lock unless every group takes them in the same order."""
    with store.transaction():
        store.insert_batch("B1", "op", "sha", "[]")
        store.insert_intents([intent_row("O1", 1), intent_row("O2", 1)])
    b_settled = threading.Event()
    errors: dict[str, list[BaseException | None]] = {}

    def entry(order_id: str) -> dict[str, Any]:
        return {"operator": "op", "action": AuditAction.OUTCOME, "order_id": order_id}

    def a_intents(s: Store) -> None:
        s.insert_intents([intent_row("O3", 1)])
        AuditTrail(s).append_many(None, [entry("O3")])  # the head, locked to the commit
        b_settled.wait(1.0)  # (never set when the other writer waits for this one first)

    def a_outcomes(s: Store) -> None:
        s.settle_intents([("B1:O1:1", "completed", None, None, "a")])

    def b_outcomes(s: Store) -> None:
        s.settle_intents([("B1:O2:1", "completed", None, None, "b")])
        b_settled.set()
        AuditTrail(s).append_many(None, [entry("O2")])

    def group(name: str, parts: list[Callable[[Store], None]], after: float) -> None:
        time.sleep(after)
        with writing(store) as writer:
            errors[name] = writer.commit_group(parts)

    threads = [threading.Thread(target=group, args=("a", [a_intents, a_outcomes], 0.0)),
               threading.Thread(target=group, args=("b", [b_outcomes], 0.2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == {"a": [None, None], "b": [None]}
    assert [r["order_id"] for r in store.open_intents()] == ["O3"]
    assert AuditTrail(store).verify().ok

@pytest.mark.parametrize("kind", ["cache_transaction", "transaction"])
def test_write_groups_of_two_writers_never_deadlock(store: Store, kind: str) -> None:
    """Two processes' discoveries each commit a group of merchants (`cache_transaction`), in
    different orders: A writes M1 and then M2, B writes M2 and then M1. On PostgreSQL each
    write's trigger bumps the change counter after the row is locked, so unless a group takes
    the counter first, A (M1's row, the counter) and B (M2's row, waiting for the counter)
    wait for each other: `deadlock detected` ended one operator's `complete` (seen with three
    operators at once, tests/test_postgres_store.py). Any other transaction that writes
    (`transaction`: a consent's reclassification, a lease) likewise."""
    b_wrote = threading.Event()
    errors: dict[str, BaseException | None] = {}

    def merchant(merchant_id: str, name: str) -> dict[str, Any]:
        return {"merchant_id": merchant_id, "business_name": name}

    def group(name: str, first: str, then: str, after: float) -> None:
        time.sleep(after)
        try:
            with writing(store) as writer, getattr(writer, kind)():
                writer.upsert_merchant(merchant(first, name))
                if name == "a":
                    b_wrote.wait(1.0)  # (never set when B waits for A from its start)
                else:
                    b_wrote.set()
                writer.upsert_merchant(merchant(then, name))
            errors[name] = None
        except BaseException as error:  # reported by the assertion below
            errors[name] = error

    threads = [threading.Thread(target=group, args=("a", "M1", "M2", 0.0)),
               threading.Thread(target=group, args=("b", "M2", "M1", 0.2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == {"a": None, "b": None}
    assert {m["merchant_id"]: m["business_name"] for m in store.merchants()} == {
        "M1": "b", "M2": "b"}  # B's group committed last, whole


# ---------------------------------------------------------------------- leases
def lease(token: str, expires: datetime, operator: str = "ann") -> Lease:
    return Lease("M1", operator, "host-a", 4242, utc_text(NOW), utc_text(NOW),
                 utc_text(expires), token)


def test_leases_take_heartbeat_release_expire(store: Store) -> None:
    def expired(found: Lease) -> bool:
        return found.expires_at <= utc_text(NOW)

    mine = lease("t1", NOW + timedelta(seconds=30))
    assert store.take_lease(mine, expired) == mine
    theirs = lease("t2", NOW + timedelta(seconds=30), operator="bob")
    assert store.take_lease(theirs, expired) == mine          # live: refused, told who
    assert store.heartbeat_leases("t1", utc_text(NOW), utc_text(NOW + timedelta(60))) == {"M1"}
    assert store.heartbeat_leases("t2", utc_text(NOW), utc_text(NOW)) == set()
    store.release_lease("M1", "t2")                            # not theirs to release
    assert [lease.token for lease in store.leases()] == ["t1"]
    store.release_lease("M1", "t1")
    assert store.leases() == []
    # A holder that stopped heart-beating loses the lease when it expires.
    dead = lease("t3", NOW - timedelta(seconds=1))
    assert store.take_lease(dead, expired) == dead
    assert store.take_lease(theirs, expired) == theirs
    assert store.leases() == [theirs]


def test_one_lease_among_racing_takers(store: Store, backend: Backend, tmp_path: Path) -> None:
    """Eight threads, each with its own store (its own connections), take one merchant's
    lease at once: exactly one gets it."""
    won: list[str] = []
    start = threading.Barrier(8)

    def take(index: int) -> None:
        own = open_store(backend.url or store.location)
        try:
            start.wait()
            candidate = lease(f"t{index}", NOW + timedelta(seconds=30))
            if own.take_lease(candidate, lambda found: False).token == candidate.token:
                won.append(candidate.token)
        finally:
            own.close()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and [lease.token for lease in store.leases()] == won


def test_leases_taken_together(store: Store) -> None:
    """A batch takes all its merchants' leases in one transaction: each is taken unless
    another holder's is in force, as one `take_lease` each would."""
    def expired(found: Lease) -> bool:
        return found.expires_at <= utc_text(NOW)

    live = NOW + timedelta(seconds=30)
    theirs = lease("t2", live, operator="bob")
    gone = Lease("M3", "cy", "host-b", 1, utc_text(NOW), utc_text(NOW),
                 utc_text(NOW - timedelta(seconds=1)), "t3")
    assert store.take_leases([theirs, gone], expired) == [theirs, gone]
    mine = [theirs._replace(operator="ann", token="t1"),
            theirs._replace(merchant_id="M2", operator="ann", token="t1"),
            gone._replace(operator="ann", token="t1", expires_at=utc_text(live))]
    assert store.take_leases(mine, expired) == [theirs, mine[1], mine[2]]
    assert [(lease.merchant_id, lease.token) for lease in store.leases()] == [
        ("M1", "t2"), ("M2", "t1"), ("M3", "t1")]
    store.release_leases(["M1", "M2", "M3"], "t1")  # M1 is not t1's: kept
    assert [(lease.merchant_id, lease.token) for lease in store.leases()] == [("M1", "t2")]


def test_racing_takers_of_overlapping_merchants(store: Store, backend: Backend) -> None:
    """Six takers, each its own store, take the leases of overlapping sets of merchants, in
    different orders, at once: no deadlock, and each merchant has exactly one holder."""
    results: dict[int, list[Lease]] = {}
    start = threading.Barrier(6)
    merchants = [f"M{i}" for i in range(8)]

    def take(index: int) -> None:
        own = open_store(backend.url or store.location)
        try:
            mine = [Lease(m, f"op{index}", "h", index, utc_text(NOW), utc_text(NOW),
                          utc_text(NOW + timedelta(seconds=30)), f"t{index}")
                    for m in random.Random(index).sample(merchants, 5)]
            start.wait()
            results[index] = own.take_leases(mine, lambda found: False)
        finally:
            own.close()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6  # none of them died (a deadlock is an error on PostgreSQL)
    held = {lease.merchant_id: lease.token for lease in store.leases()}
    for in_force in results.values():  # every taker was told the one holder there is
        assert all(held[lease.merchant_id] == lease.token for lease in in_force)


# ---------------------------------------------------------------------- the audit
def fill(trail: AuditTrail, count: int, prefix: str = "O") -> None:
    for index in range(count):
        trail.append(operator=f"op{index % 3}", action=AuditAction.OUTCOME,
                     merchant_id=f"M{index % 4}", order_id=f"{prefix}{index}", version=index,
                     amount=100 * index, currency="USD", outcome="completed",
                     detail=f"entry {index}")


def test_audit_append_verify_and_read(store: Store) -> None:
    trail = AuditTrail(store)
    assert trail.verify().ok and trail.checkpoint().size == 0
    fill(trail, 20)
    with store.transaction():  # entries join an open transaction, chained in order
        trail.append_many(None, [{"operator": "x", "action": AuditAction.INTENT,
                                  "order_id": f"I{i}"} for i in range(5)])
    report = trail.verify()
    assert report.ok and report.entries == 25 and trail.size() == 25
    assert trail.hash_at(25) == report.head_hash == trail.checkpoint().head_hash
    assert [e["order_id"] for e in trail.entries(merchant_id="M1")] == [
        "O1", "O5", "O9", "O13", "O17"]
    assert [e["seq"] for e in trail.entries(limit=2, newest_first=True)] == [25, 24]
    assert trail.export_text("jsonl", action="intent").count("\n") == 5


def test_audit_filters_by_time_and_refuses_unknown_columns(store: Store) -> None:
    """One query builder for both stores (base.py): `at` in [since, until), and a filter's
    column name, which goes into the SQL, only from the audit's own columns."""
    trail = AuditTrail(store)
    fill(trail, 3)
    ats = [e["at"] for e in store.audit_entries({}, None, None, None, False)]
    window = [seq for seq, at in enumerate(ats, 1) if ats[1] <= at < ats[2]]
    assert 2 in window
    assert [e["seq"] for e in store.audit_entries({}, ats[1], ats[2], None, False)] == window
    with pytest.raises(ValueError, match="unknown audit column"):
        next(store.audit_entries({"seq = seq OR 1": 1}, None, None, None, False))
    assert trail.verify().ok


def test_audit_rolled_back_with_its_change(store: Store) -> None:
    trail = AuditTrail(store)
    with pytest.raises(RuntimeError), store.transaction():
        trail.append(operator="x", action=AuditAction.PREVIEW)
        raise RuntimeError("the change it records failed")
    assert trail.size() == 0
    fill(trail, 2)
    assert trail.verify().ok


@pytest.mark.parametrize("sql", ["UPDATE audit SET detail = 'x' WHERE seq = 3",
                                 "DELETE FROM audit WHERE seq = 10"])
def test_audit_is_append_only(backend: Backend, sql: str) -> None:
    fill(AuditTrail(backend.store), 10)
    with pytest.raises(database_errors(), match="append-only"):
        backend.raw(sql)
    assert AuditTrail(backend.store).verify().entries == 10


@pytest.mark.parametrize("tampering, broken_at, kind", [
    ("UPDATE audit SET detail = 'edited' WHERE seq = 7", 7, ChainProblem.CHANGED_ENTRY),
    ("UPDATE audit SET amount = 1 WHERE seq = 12", 12, ChainProblem.CHANGED_ENTRY),
    ("DELETE FROM audit WHERE seq = 5", 5, ChainProblem.MISSING_ENTRY),
    ("UPDATE audit SET prev_hash = 'f' || prev_hash WHERE seq = 9", 9, ChainProblem.BROKEN_LINK),
])
def test_audit_tampering_is_found(backend: Backend, tampering: str, broken_at: int,
                                  kind: str) -> None:
    trail = AuditTrail(backend.store)
    fill(trail, 15)
    backend.drop_guards("audit")
    backend.raw(tampering)
    report = trail.verify()
    assert not report.ok and report.broken_at == broken_at and report.problem_kind == kind


def test_signed_checkpoints(backend: Backend, tmp_path: Path) -> None:
    trail = AuditTrail(backend.store)
    fill(trail, 12)
    anchor = CheckpointAnchor(tmp_path / "checkpoints", tmp_path / "credentials.toml")
    written = anchor.write(trail)
    assert written is not None and anchor.verify(trail).ok
    fill(trail, 3, prefix="later")
    assert anchor.verify(trail).ok                  # growth after a checkpoint is fine
    backend.drop_guards("audit")
    backend.raw("DELETE FROM audit WHERE seq > 10")  # a cut tail verifies alone...
    assert trail.verify().ok
    report = anchor.verify(trail)                   # ...but not against the checkpoint
    assert not report.ok and report.problem_kind == ChainProblem.CUT_TAIL
    assert report.broken_at == 11


def _append_from_process(location: str, worker: int, count: int) -> int:
    store = open_store(location)
    try:
        trail = AuditTrail(store)
        for index in range(count):
            trail.append(operator=f"w{worker}", action=AuditAction.OUTCOME,
                         order_id=f"w{worker}-{index}")
        return count
    finally:
        store.close()


def test_concurrent_writers_never_fork_the_chain(backend: Backend) -> None:
    """Six threads with their own stores, then three processes, append at once: every entry
    lands, on one chain that verifies."""
    location = backend.url or str(backend.store.location)
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            start.wait()
            _append_from_process(location, worker, 40)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        assert pool.starmap(_append_from_process,
                            [(location, 10 + i, 40) for i in range(3)]) == [40, 40, 40]
    trail = AuditTrail(backend.store)
    report = trail.verify()
    assert report.ok and report.entries == 9 * 40
    assert len({e["order_id"] for e in trail.entries()}) == 9 * 40


# ---------------------------------------------------------------------- four-eyes approvals
def test_approvals_decided_once_used_once(store: Store) -> None:
    from services.store import Approval
    prepared = Approval("B1", "sha", '[["M1", "A", 3]]', '{"M1": {"USD": 1250}}', 1,
                        "orders", "ann", utc_text(NOW), "pending")
    with store.transaction():
        store.insert_approval(prepared)
        store.insert_approval(prepared._replace(batch_id="B2", prepared_at=utc_text(
            NOW + timedelta(seconds=1))))
    assert store.approval("B1") == prepared and store.approval("nope") is None
    assert [a.batch_id for a in store.approvals()] == ["B1", "B2"]
    expires = utc_text(NOW + timedelta(minutes=30))
    assert store.decide_approval("B1", "approved", "bob", utc_text(NOW), "ok", expires)
    # A decision taken is final: a second one finds no pending row.
    assert not store.decide_approval("B1", "rejected", "carl", utc_text(NOW), "no", None)
    assert store.decide_approval("B2", "rejected", "bob", utc_text(NOW), "no", None)
    assert [a.batch_id for a in store.approvals(["approved"])] == ["B1"]
    # Expired approvals cannot be used; a good one is used by one run only.
    assert not store.use_approval("B1", "ann", utc_text(NOW + timedelta(minutes=31)))
    assert store.use_approval("B1", "ann", utc_text(NOW + timedelta(minutes=1)))
    assert not store.use_approval("B1", "ann", utc_text(NOW + timedelta(minutes=2)))
    used = store.approval("B1")
    assert used is not None and (used.status, used.used_by) == ("used", "ann")


def test_sent_without_approval_since_a_moment(store: Store) -> None:
    """Four-eyes' window: orders completed or in doubt since `since`, in batches that ran
    without a used approval; failed and skipped ones, older ones and approved batches not."""
    from services.store import Approval
    old, new = utc_text(NOW - timedelta(hours=2)), utc_text(NOW)
    with store.transaction():
        for batch in ("B1", "B2", "B3"):
            store.insert_batch(batch, "op", "sha", "[]")
        store.insert_intents([
            {**intent_row("DONE", 1), "created_at": new},
            {**intent_row("DOUBT", 1), "created_at": new, "operator": "ann"},
            {**intent_row("FAILED", 1), "created_at": new},
            {**intent_row("SKIPPED", 1), "created_at": new},
            {**intent_row("OLD", 1), "created_at": old},
            {**intent_row("APPROVED", 1, batch_id="B2"), "created_at": new},
            {**intent_row("PENDING", 1, batch_id="B3"), "created_at": new,
             "amount": None, "currency": None}])
        store.insert_approval(Approval("B2", "sha", "[]", "{}", 1, "x", "ann", new,
                                       "approved", "bob", new, None, utc_text(
                                           NOW + timedelta(minutes=5))))
        store.insert_approval(Approval("B3", "sha", "[]", "{}", 1, "x", "ann", new, "pending"))
    assert store.use_approval("B2", "ann", new)
    for name, outcome in (("DONE", "completed"), ("FAILED", "failed"), ("SKIPPED", "skipped"),
                          ("OLD", "completed"), ("APPROVED", "completed"),
                          ("PENDING", "completed")):
        batch = {"APPROVED": "B2", "PENDING": "B3"}.get(name, "B1")
        store.settle_intent(f"{batch}:{name}:1", outcome, None, None, "")
    since = utc_text(NOW - timedelta(hours=1))
    assert sorted(store.sent_without_approval(since)) == [
        ("ann", "DOUBT", 1250, "USD"), ("op", "DONE", 1250, "USD"),
        ("op", "PENDING", None, None)]


def test_order_amounts_from_the_queue_else_the_last_intent(store: Store) -> None:
    store.write_orders([order_values("A")])
    store.insert_batch("B1", "op", "sha", "[]")
    store.insert_intents([{**intent_row("Z", 1), "amount": 999, "currency": "EUR"}])
    assert store.order_amounts(["A", "Z", "nope"]) == {"A": (1250, "USD"), "Z": (999, "EUR")}


def test_verify_inside_a_transaction_sees_its_own_entries(store: Store) -> None:
    """`db migrate` checks the copied chain before it commits: verify reads through the open
    transaction, uncommitted entries included."""
    trail = AuditTrail(store)
    with store.transaction():
        fill(trail, 3)
        assert trail.verify().entries == 3


# ---------------------------------------------------------------------- presence and changes
def test_change_counter_moves_for_changes_not_heartbeats(store: Store) -> None:
    start = store.change_version()
    store.upsert_merchant({"merchant_id": "M1", "business_name": "Shop"})
    after_merchant = store.change_version()
    assert after_merchant > start
    taken = lease("t1", NOW + timedelta(seconds=30))
    store.take_lease(taken, lambda found: False)
    after_lease = store.change_version()
    assert after_lease > after_merchant
    store.heartbeat_leases("t1", utc_text(NOW), utc_text(NOW + timedelta(seconds=60)))
    assert store.change_version() == after_lease          # a heartbeat is not a change
    store.release_lease("M1", "t1")
    assert store.change_version() > after_lease


def test_change_counter_moves_for_settled_intents_and_dropped_or_reclassified_orders(
        store: Store) -> None:
    """What a completion and a refresh change in bulk (SQLite bumps once per statement from
    the store's code, not from row triggers): every one of these writes moves the counter,
    inside a transaction or on its own."""
    with store.transaction():
        store.write_orders([order_values(f"O{n}") for n in range(6)])
        store.insert_batch("B1", "op", "sha", "[]")
        store.insert_intents([intent_row(f"O{n}", 1) for n in range(3)])
    writes: list[tuple[str, bool, Callable[[], None]]] = [  # (name, in a transaction, write)
        ("settle_intent", False, lambda: store.settle_intent("B1:O0:1", "completed", None,
                                                              None, "")),
        ("settle_intents", True, lambda: store.settle_intents(
            [("B1:O1:1", "failed", "X", "X", ""), ("B1:O2:1", "skipped", "Y", None, "")])),
        ("drop_completed_orders", False, lambda: store.drop_completed_orders(["O0", "O1"])),
        ("update_verdicts", True, lambda: store.update_verdicts(
            [(0, "NO_CONSENT", "", None, "O2")])),
        ("drop_orders by id", True, lambda: store.drop_orders("M1", order_ids=["O3"])),
        ("drop_orders at locations", True, lambda: store.drop_orders("M1",
                                                                      at_locations=["L1"])),
    ]
    for name, in_transaction, write in writes:
        before = store.change_version()
        if in_transaction:
            with store.transaction():
                write()
        else:
            write()
        assert store.change_version() > before, name
    assert [r["intent_id"] for r in store.open_intents()] == []
    assert store.queued_orders("M1") == []


def test_operator_sessions(store: Store) -> None:
    from services.store import OperatorSession
    ana = OperatorSession("s1", "ana", "host", 1, "console", utc_text(NOW), utc_text(NOW))
    old = OperatorSession("s0", "old", "host", 2, "console", utc_text(NOW - timedelta(days=2)),
                          utc_text(NOW - timedelta(days=2)))
    store.register_session(old, utc_text(NOW - timedelta(days=3)))
    store.register_session(ana, utc_text(NOW - timedelta(days=1)))   # forgets `old`
    assert store.sessions(utc_text(NOW - timedelta(days=5))) == [ana]
    later = utc_text(NOW + timedelta(seconds=5))
    assert store.touch_session("s1", later)
    assert store.sessions(later) == [ana._replace(last_seen=later)]
    store.end_session("s1")
    assert not store.touch_session("s1", later) and store.sessions(utc_text(NOW)) == []


def test_oldest_orders_and_candidate_ages(store: Store) -> None:
    store.write_orders([order_values("B", created_at="2026-11-21T00:00:00.000000Z"),
                        order_values("A"), order_values("C", merchant_id="M2"),
                        order_values("D", eligible=0, reason="NO_CONSENT",
                                     created_at="2026-11-19T00:00:00.000000Z")])
    assert [o.order_id for o in store.oldest_orders(limit=3)] == ["D", "A", "C"]
    assert [o.order_id for o in store.oldest_orders("M1", limit=5)] == ["D", "A", "B"]
    assert sorted(store.candidate_created_at("M1")) == [
        "2026-11-20T10:00:00.000000Z", "2026-11-21T00:00:00.000000Z"]
