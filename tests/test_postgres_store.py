"""PostgreSQL only: what SQLite has no counterpart for. The console's role cannot change
history even with the triggers off; TRUNCATE is refused; migrations are named and applied once;
`verify` streams from a server-side cursor; and the command line completes a batch end to end
against the emulator with `--db postgresql://...`."""

from __future__ import annotations

import json
import os
import threading
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from console.cli import main
from services.audit import AuditAction, AuditTrail
from services.demo import write_demo_files
from services.emulator import SeedConfig
from services.errors import ConfigurationError
from services.storage import open_store
from services.storage.postgres import MIGRATIONS, ROLES_SQL, PostgresStore
from tests.conftest import NOW, LoopbackServer, make_emulator
from tests.test_store_contract import intent_row, lease, order_values


def owner(url: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """The database's owner (the test cluster's superuser) at work."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname or ''}"))


def fill(store: PostgresStore, count: int) -> AuditTrail:
    trail = AuditTrail(store)
    trail.append_many(None, [{"operator": "op", "action": AuditAction.OUTCOME,
                              "order_id": f"O{i}", "outcome": "completed"}
                             for i in range(count)])
    return trail


# ---------------------------------------------------------------------- append-only, twice
@pytest.fixture
def console_url(pg_url: str) -> str:
    """The same database as the console's role (postgres_roles.sql), as an operator would
    reach it: a login in recon_console, without the owner's rights."""
    open_store(pg_url).close()  # the owner migrates first
    owner(pg_url, ROLES_SQL.read_text())
    owner(pg_url, "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
                  "'recon_operator') THEN CREATE ROLE recon_operator LOGIN IN ROLE "
                  "recon_console; END IF; END $$")
    return as_user(pg_url, "recon_operator")


def test_the_console_role_cannot_change_history(pg_url: str, console_url: str) -> None:
    store = open_store(console_url)
    assert isinstance(store, PostgresStore)
    try:
        trail = fill(store, 5)  # it appends ...
        assert trail.verify().ok
        # ... and with the triggers switched off by the owner, the role alone still refuses.
        owner(pg_url, "ALTER TABLE audit DISABLE TRIGGER USER")
        owner(pg_url, "ALTER TABLE consent_revocations DISABLE TRIGGER USER")
        for sql in ("UPDATE audit SET detail = 'x' WHERE seq = 2", "DELETE FROM audit",
                    "TRUNCATE audit", "UPDATE consent_revocations SET reason = 'x'",
                    "DELETE FROM consent_revocations", "UPDATE consents SET source = 'x'",
                    "DROP TABLE audit"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                owner(console_url, sql)
        assert trail.verify().ok and trail.size() == 5
    finally:
        store.close()


def test_the_console_role_does_its_work(console_url: str) -> None:
    """Everything the console does day to day works under the role (a missing GRANT shows
    here, not in front of an operator)."""
    store = open_store(console_url)
    try:
        with store.transaction():
            store.upsert_merchant({"merchant_id": "M1", "business_name": "Shop"})
            store.write_orders([order_values("A")])
            store.save_order_marks("M1", {"L1": ("m", "f")})
            store.save_order_sync("M1", "t", "sig")
            store.insert_batch("B1", "op", "sha", "[]")
            store.insert_intents([intent_row("A", 1)])
        store.settle_intent("B1:A:1", "completed", None, None, "ok")
        store.drop_completed_orders(["A"])
        store.record_backlog([("2026-11-25", "M1", (1, 1, 1, 1, 1))], "t")
        assert store.take_lease(lease("t1", NOW), lambda found: False).token == "t1"
        store.release_lease("M1", "t1")
        store.save_reminder_opt_out("M1", True, "Ann", "asked", "t")
        from services.store import Approval
        store.insert_approval(Approval("B9", "sha", "[]", "{}", 0, "orders", "ann", "t",
                                       "pending"))
        assert store.decide_approval("B9", "approved", "ben", "t", None, "u")
        assert store.use_approval("B9", "ann", "t")
        fill(store, 3)
        assert AuditTrail(store).verify().ok
    finally:
        store.close()


def test_truncate_is_refused_even_to_the_owner(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        fill(store, 3)  # type: ignore[arg-type]
        for table in ("audit", "consent_revocations"):
            with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
                owner(pg_url, f"TRUNCATE {table}")
        assert AuditTrail(store).size() == 3
    finally:
        store.close()


# ---------------------------------------------------------------------- migrations
def test_migrations_are_named_and_applied_once(pg_url: str) -> None:
    owner(pg_url, "CREATE DATABASE recon_empty TEMPLATE template0")
    empty = urlunsplit(urlsplit(pg_url)._replace(path="/recon_empty"))
    try:
        open_store(empty).close()
        applied = owner(empty, "SELECT name, applied_at FROM schema_migrations ORDER BY name")
        assert [name for name, _ in applied] == sorted(name for name, _ in MIGRATIONS)
        open_store(empty).close()  # nothing pending: nothing applied again
        assert owner(empty, "SELECT name, applied_at FROM schema_migrations ORDER BY name"
                     ) == applied
    finally:
        owner(pg_url, "DROP DATABASE recon_empty WITH (FORCE)")


def test_a_role_that_cannot_migrate_is_told_what_to_do(pg_url: str, console_url: str) -> None:
    owner(pg_url, "DELETE FROM schema_migrations WHERE name = %s", [MIGRATIONS[-1][0]])
    with pytest.raises(ConfigurationError, match=f"lacks migration {MIGRATIONS[-1][0]}"):
        open_store(console_url)


def test_an_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    url = f"postgresql://nobody@/recon?host={tmp_path}&port=1"
    with pytest.raises(ConfigurationError) as refused:
        open_store(url)
    text = str(refused.value)
    assert text.startswith("cannot connect to PostgreSQL at postgresql://nobody@/recon")
    assert text.isprintable()  # one line: libpq's tab (shown as a placeholder) too
    assert text.endswith("Start the server or fix the --db / RECON_DB URL (host, port, "
                         "database, user).")


# ---------------------------------------------------------------------- streaming verify
def test_verify_streams_from_a_server_side_cursor(pg_url: str) -> None:
    """While `audit_rows` is being read, the server holds a named cursor and the session
    fetches from it page by page: the chain is never read into memory whole."""
    store = open_store(pg_url)
    try:
        fill(store, 45_000)  # type: ignore[arg-type]
        rows = store.audit_rows(1, None)
        first = next(rows)
        assert first is not None
        seen: list[tuple[Any, ...]] = []

        def look() -> None:
            seen.extend(owner(pg_url, "SELECT query FROM pg_stat_activity WHERE "
                                      "datname = current_database() AND query LIKE 'FETCH%%'"))

        thread = threading.Thread(target=look)
        thread.start()
        thread.join()
        assert seen and seen[0][0].startswith("FETCH FORWARD 20000 FROM")
        assert sum(1 for _ in rows) == 45_000 - 1
        # Left after one row (a broken link found early): the read-ahead thread stops and
        # gives its connection back.
        threads = threading.active_count()
        partial = store.audit_rows(1, None)
        next(partial)
        partial.close()  # type: ignore[attr-defined]
        assert threading.active_count() == threads and store.audit_extent() == (45_000, 45_000)
    finally:
        store.close()


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows every scan node of an EXPLAIN ANALYZE plan (JSON) produced, for all its loops."""
    own = (plan["Actual Rows"] * plan["Actual Loops"]
           if "Scan" in plan["Node Type"] and plan.get("Relation Name") == "intents" else 0)
    return own + sum(_rows_read(child) for child in plan.get("Plans", []))


def test_settling_a_group_reads_its_own_intents_only(pg_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's intents are all open while it sends: a group's outcomes look up their own
    intents by key, not every open one (the planner, with no statistics yet, took the
    partial index of open intents and hashed all of them, for every group)."""
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    statements: list[tuple[str, list[Any]]] = []
    real_run = PostgresStore._run

    def run(self: PostgresStore, sql: str, params: Any = ()) -> int:
        if sql.startswith("UPDATE intents"):
            statements.append((sql, list(params)))
            raise psycopg.Rollback
        return real_run(self, sql, params)

    try:
        store.insert_batch("B1", "op", "sha", "[]")
        for start in range(0, 2000, 500):
            store.insert_intents([intent_row(f"O{i}", 1) for i in range(start, start + 500)])
        monkeypatch.setattr(PostgresStore, "_run", run)
        with store.transaction():
            store.settle_intents([(f"B1:O{i}:1", "completed", None, None, "done")
                                  for i in range(1000, 1025)])
        monkeypatch.undo()
        [(sql, params)] = statements
        with psycopg.connect(pg_url) as conn:
            [(plan,)] = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql,
                                     params).fetchall()
            conn.rollback()
        assert _rows_read(plan[0]["Plan"]) <= 2 * 25, plan
    finally:
        store.close()


def test_two_discoveries_writing_the_same_merchants_do_not_deadlock(pg_url: str) -> None:
    """Two processes' discovery commits (`cache_transaction`) upserting the same merchants in
    different orders: each upsert's statement trigger bumps the change counter, so a commit
    that locked merchant B's row, then waited for the counter, deadlocked with one that held
    the counter and then wanted B (`complete` on three consoles at once failed one with
    `deadlock detected`). The counter is taken first, as every group commit takes it."""
    first, second = PostgresStore(pg_url), PostgresStore(pg_url)
    failures: list[BaseException] = []
    try:
        for merchant_id in ("A", "B"):
            first.upsert_merchant({"merchant_id": merchant_id, "business_name": "old"})
        holding = threading.Event()

        def other() -> None:  # B first: its row, then the counter (held by `first`)
            holding.wait(30)
            try:
                with second.cache_transaction():
                    second.upsert_merchant({"merchant_id": "B", "business_name": "two"})
            except psycopg.Error as error:
                failures.append(error)

        thread = threading.Thread(target=other)
        thread.start()
        try:
            with first.cache_transaction() as conn:
                first.upsert_merchant({"merchant_id": "A", "business_name": "one"})
                holding.set()
                with psycopg.connect(pg_url, autocommit=True) as watcher:
                    for _ in range(3000):  # until the other waits for a lock
                        if watcher.execute(
                                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND wait_event_type = 'Lock' AND pid <> "
                                "%s", [conn.info.backend_pid]).fetchone()[0]:
                            break
                        threading.Event().wait(0.01)
                    else:
                        raise AssertionError("the other commit never waited")
                first.upsert_merchant({"merchant_id": "B", "business_name": "one"})
        except psycopg.Error as error:
            failures.append(error)
        thread.join(60)
        assert failures == []
        assert {m["merchant_id"]: m["business_name"] for m in first.merchants()} == {
            "A": "one", "B": "two"}
    finally:
        first.close()
        second.close()


# ---------------------------------------------------------------------- end to end
@pytest.mark.loopback
def test_cli_completes_a_batch_on_postgres(pg_url: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """consent import, queue, complete, audit verify and recover, all with
    --db postgresql://...: the engine, discovery and the command line on PostgreSQL."""
    for name in list(os.environ):
        if name.startswith("RECON_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("RECON_DB", pg_url)
    monkeypatch.setenv("RECON_OPERATOR", "pg-operator")
    emulator = make_emulator(SeedConfig(merchants=3, orders_per_location=8))
    write_demo_files(tmp_path, emulator.merchants)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    with LoopbackServer(emulator) as server:
        monkeypatch.setenv("RECON_SQUARE_BASE_URL", server.base_url)
        monkeypatch.setenv("RECON_CREDENTIALS", str(tmp_path / "credentials.toml"))
        code, _, err = run("consent", "import", str(tmp_path / "consents.json"))
        assert code == 0, err
        before = {r.id for r in emulator.square.orders.values() if r.state == "COMPLETED"}
        code, out, err = run("queue", "--format", "json")
        assert code == 0, err
        candidates = {o["order_id"] for o in json.loads(out)["orders"] if o["eligible"]}
        assert candidates
        code, out, err = run("complete", "--all-merchants", "--yes", "--format", "json")
        assert code == 0, err
        results = json.loads(out)["results"]
        assert {r["order_id"] for r in results if r["outcome"] == "completed"} == candidates
        # Square agrees: exactly the candidates went COMPLETED.
        after = {r.id for r in emulator.square.orders.values() if r.state == "COMPLETED"}
        assert after - before == candidates
        code, out, err = run("audit", "verify", "--json")
        assert code == 0 and json.loads(out)["ok"] is True, err
        code, out, err = run("recover", "--format", "json")
        assert code == 0 and json.loads(out)["results"] == [], err
    # It all went to PostgreSQL: one `completed` outcome per completed order, nothing open.
    store = open_store(pg_url)
    try:
        outcomes = [e["order_id"] for e in AuditTrail(store).entries(outcome="completed")]
        assert sorted(outcomes) == sorted(candidates)
        assert store.open_intent_count() == 0 and store.leases() == []
    finally:
        store.close()


def test_exports_of_a_team_console_go_to_the_user_data_dir(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The audit and reminder-list exports are written beside a SQLite file; a URL has no
    "beside", so they go to the user's own data directory (made owner-only)."""
    from services.settings import ReconSettings
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    settings = ReconSettings(db="postgresql://ana@db.example.com/recon")
    assert settings.local_dir == tmp_path / "data" / "recon-console"
    assert settings.local_dir.is_dir() and settings.local_dir.stat().st_mode & 0o077 == 0
    assert ReconSettings(db=tmp_path / "x.db").local_dir == tmp_path


@pytest.mark.loopback
def test_three_operators_in_processes_on_one_postgres(pg_url: str, tmp_path: Path) -> None:
    """Three `complete` processes on overlapping merchants at once, the emulator slow and
    failing now and then, then `recover`: every order Square completed has exactly one
    `completed` outcome, nothing is left open, and the team's one chain verifies."""
    from collections import Counter
    from datetime import UTC, datetime

    from services.demo import consent_for
    from services.emulator import FaultPlan
    from services.settings import ReconSettings
    from services.workspace import Workspace
    from tests.crash_harness import start_cli

    # Slow enough that a batch outlasts a process start-up: the runs overlap.
    emulator = make_emulator(SeedConfig(seed=7, merchants=3, orders_per_location=30),
                             FaultPlan(latency_ms=300, server_error_rate=0.05,
                                       lost_response_rate=0.05, operations=["UpdateOrder"],
                                       seed=7))
    write_demo_files(tmp_path, emulator.merchants)
    consents = tmp_path / "all-consents.json"
    consents.write_text(json.dumps([consent_for(m, datetime.now(UTC))
                                    for m in emulator.merchants]))
    before = {r.id: r.state for r in emulator.square.orders.values()}
    with LoopbackServer(emulator) as server:
        settings = ReconSettings(db=pg_url, square_base_url=server.base_url,
                                 credentials=tmp_path / "credentials.toml", operator="setup")
        workspace = Workspace.open(settings)
        workspace.import_consent_files([consents])
        workspace.store.close()
        env = dict(os.environ, RECON_DB=pg_url, RECON_SQUARE_BASE_URL=server.base_url,
                   RECON_CREDENTIALS=str(tmp_path / "credentials.toml"),
                   RECON_READ_RETRIES="1", XDG_DATA_HOME=str(tmp_path / "data"))
        runs = [start_cli(env, "complete", "--all-merchants", "--yes", "--json",
                          operator=name) for name in ("alice", "bob", "carol")]
        outputs = [p.communicate(timeout=240) for p in runs]
        # 0, or 1 for orders that failed (the faults): a crash is 1 too, so each run must
        # also have printed its document.
        assert all(p.returncode in (0, 1) for p in runs), [err for _, err in outputs]
        for out, err in outputs:
            assert out.strip().startswith("{"), err[-3000:]
        recovered = start_cli(env, "recover", "--json", operator="dave").communicate(
            timeout=240)
        assert json.loads(recovered[0])["open_after"] == 0, recovered[1]
    # The runs met: one found another's lease at send time, or held a leased merchant back.
    leased = [r for out, _ in outputs for r in json.loads(out)["results"]
              if r["reason"] == "LEASED"]
    assert leased or any("(MERCHANT_LEASED)" in err for _, err in outputs), \
        "the three runs did not overlap"
    newly = {r.id for r in emulator.square.orders.values()
             if r.state == "COMPLETED" and before[r.id] != "COMPLETED"}
    assert newly
    store = open_store(pg_url)
    try:
        trail = AuditTrail(store)
        completed = Counter(e["order_id"] for e in trail.entries(outcome="completed"))
        assert set(completed) == newly, "an order completed in Square without its outcome"
        assert max(completed.values()) == 1, completed.most_common(3)
        assert store.open_intent_count() == 0 and store.leases() == []
        report = trail.verify()
        assert report.ok, report.sentence()
        # Each merchant was sent for under one lease at a time: per merchant, the spans of
        # different operators' batches (first intent to last outcome) never overlap.
        spans: dict[tuple[str, str], list[str]] = {}
        for entry in trail.entries():
            if entry["action"] in ("intent", "outcome") and entry["batch_id"] and \
                    entry["operator"] in ("alice", "bob", "carol"):
                spans.setdefault((entry["merchant_id"], entry["batch_id"]), []).append(
                    entry["at"])
        by_merchant: dict[str, list[tuple[str, str]]] = {}
        for (merchant_id, _), moments in spans.items():
            by_merchant.setdefault(merchant_id, []).append((min(moments), max(moments)))
        assert len(spans) >= 3, spans.keys()
        for merchant_id, intervals in by_merchant.items():
            intervals.sort()
            for (_, end), (start, _) in pairwise(intervals):
                assert end <= start, f"two runs worked on {merchant_id} at once"
    finally:
        store.close()


async def test_a_change_elsewhere_wakes_the_feed_at_once(pg_url: str) -> None:
    """LISTEN/NOTIFY: the console's wait ends when another console's write commits, not at
    its timeout."""
    import asyncio
    import time
    watcher, writer = open_store(pg_url), open_store(pg_url)
    try:
        feed = watcher.change_feed()
        assert feed is not None
        since = feed.version()
        started = time.monotonic()
        waiting = asyncio.ensure_future(feed.wait(since, timeout=20))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(writer.upsert_merchant, {"merchant_id": "M9"})
        assert await waiting > since
        assert time.monotonic() - started < 2
        assert await feed.wait(feed.version(), timeout=0.2) == feed.version()  # no change
    finally:
        writer.close()
        watcher.close()
