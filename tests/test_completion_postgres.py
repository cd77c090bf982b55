"""The completion engine's consent look at send time on PostgreSQL (`sending.ConsentReads`):
each read of the database is a round trip there, so the sends asking at once share one (read
on the event loop, over an async connection); these tests hold a read inside the database
call to show what a send is still guaranteed: it sees every change committed before it
asked, and a change this process makes while a read is under way."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from services.completion import ApprovedItem, BatchProgress, Outcome
from services.completion.sending import ConsentReads
from services.consent import ConsentStatus
from services.demo import consent_for, workspace_on_emulator
from services.emulator import FaultPlan
from services.storage.postgres import PostgresStore
from services.workspace import Workspace
from tests.conftest import Emulator
from tests.test_completion import ENGINE, FAST_RETRY, complete_while_another_revokes, versions


async def team_workspace(emulator: Emulator, pg_url: str, home: Path, operator: str,
                         consents: bool = True) -> Workspace:
    home.mkdir(exist_ok=True)
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, pg_url, operator,
                                      timeout_s=2.0, retry=FAST_RETRY, home=home)
    workspace.engine_options = dict(ENGINE)
    if consents:
        path = home / "consents.json"
        path.write_text(json.dumps([consent_for(m, datetime.now(UTC))
                                    for m in emulator.merchants]))
        workspace.import_consent_files([path])
    return workspace


def assert_invariants(emulator: Emulator, workspace: Workspace, pg_url: str,
                      before: dict[str, tuple[str, int | None]],
                      approved: list[ApprovedItem]) -> None:
    """tests/test_completion.py's, read from PostgreSQL."""
    after = versions(emulator)
    newly = {i for i, (state, _) in after.items()
             if state == "COMPLETED" and before.get(i, ("?", None))[0] != "COMPLETED"}
    by_order = {a.order_id: a for a in approved}
    with psycopg.connect(pg_url) as conn:
        outcomes: dict[str, str | None] = dict(
            conn.execute("SELECT order_id, outcome FROM intents").fetchall())
    for order_id in newly:
        item = by_order[order_id]
        assert (before[order_id][1], after[order_id][1]) == (item.version, item.version + 1)
        assert outcomes.get(order_id) == "completed", order_id
    assert {o for o, outcome in outcomes.items() if outcome == "completed"} <= newly
    assert workspace.open_intent_count() == 0
    report = workspace.verify()
    assert report.ok, report.sentence()


class HeldRead:
    """The store, with its revision reads counted; `hold()` makes the next one stop inside the
    database call, after the query answered, until `release()`."""

    def __init__(self, store: PostgresStore, *, local_writes: bool = True) -> None:
        self.store = store
        # False: this process's consent writes are not shown (they stand for another
        # process's, which no counter here can see).
        self.local_writes = local_writes
        self.reads = 0
        self.inside = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()
        self.reader = store.consents_revision_reader()

    def hold(self) -> None:
        self.inside.clear()
        self.go.clear()

    def release(self) -> None:
        self.go.set()

    def consents_revision_reader(self) -> HeldRead:
        return self

    async def read(self) -> int:
        revision = await self.reader.read()
        self.reads += 1
        self.inside.set()
        await asyncio.wait_for(self.go.wait(), 30)
        return revision

    async def aclose(self) -> None:
        await self.reader.aclose()

    def consent_writes(self) -> int:
        return self.store.consent_writes() if self.local_writes else 0


async def until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 30)  # else: the read never started


async def test_a_send_sees_what_was_committed_before_it_asked(
        emulator: Emulator, pg_url: str, tmp_path: Path) -> None:
    """Sends asking while a read is under way do not take its answer (it may predate them):
    they share the next read, which begins after they asked."""
    workspace = await team_workspace(emulator, pg_url, tmp_path / "a", "ann")
    other = await team_workspace(emulator, pg_url, tmp_path / "b", "bob", consents=False)
    target = emulator.merchants[0].merchant.id
    assert isinstance(workspace.store, PostgresStore)
    held = HeldRead(workspace.store, local_writes=False)
    reads = ConsentReads(held, workspace.consents_for)
    try:
        await reads.current(target)  # known now: active
        held.hold()
        first = asyncio.create_task(reads.current(target))
        await until(held.inside)  # the first read has its answer: active
        consent_id = workspace.consents_for(target)[0][0].consent_id
        other.revoke_consent(consent_id, "Owner", "changed their mind")  # committed
        # Asked after the commit, while the first read (from before it) is under way.
        later = [asyncio.create_task(reads.current(target)) for _ in range(5)]
        await asyncio.sleep(0.01)
        held.release()
        now = datetime.now(UTC)
        for task in later:
            [(record, _)] = await task
            assert record.status_at(now) is ConsentStatus.REVOKED
        await first
        assert held.reads <= 4  # five sends, one read between them (and the first's)
    finally:
        held.release()
        await reads.aclose()
        await other.aclose()
        await workspace.aclose()


async def test_a_consent_written_here_during_a_read_is_read_again(
        emulator: Emulator, pg_url: str, tmp_path: Path) -> None:
    """This process's own revocation (the console's revoke key, on the loop) while a send's
    read is under way: the read may predate it, so the send reads again."""
    workspace = await team_workspace(emulator, pg_url, tmp_path / "a", "ann")
    target = emulator.merchants[0].merchant.id
    assert isinstance(workspace.store, PostgresStore)
    held = HeldRead(workspace.store)
    reads = ConsentReads(held, workspace.consents_for)
    try:
        [(record, _)] = await reads.current(target)  # known now: active
        assert record.status_at(datetime.now(UTC)) is ConsentStatus.ACTIVE
        held.hold()
        send = asyncio.create_task(reads.current(target))
        await until(held.inside)  # the read's answer is in, from before the revocation
        workspace.revoke_consent(record.consent_id, "Owner", "changed their mind")
        held.release()
        [(record, _)] = await send
        assert record.status_at(datetime.now(UTC)) is ConsentStatus.REVOKED
    finally:
        held.release()
        await reads.aclose()
        await workspace.aclose()


async def test_consent_revoked_by_another_console_stops_the_next_send_on_postgres(
        emulator: Emulator, pg_url: str, tmp_path: Path) -> None:
    """A whole batch on PostgreSQL: once the revocation is committed (through another
    console's connection), nothing more of the merchant is sent."""
    workspace = await team_workspace(emulator, pg_url, tmp_path / "a", "ann")
    other = await team_workspace(emulator, pg_url, tmp_path / "b", "bob", consents=False)
    await workspace.refresh()
    try:
        preview, before = await complete_while_another_revokes(emulator, workspace, other)
        assert_invariants(emulator, workspace, pg_url, before, preview.items)
    finally:
        await other.aclose()
        await workspace.aclose()


async def test_a_lost_revision_connection_is_opened_again(pg_url: str) -> None:
    """The consents' revision reader's connection, cut (a server restart, a killed backend):
    the read that finds it opens another connection and answers, instead of failing the
    batch."""
    store = PostgresStore(pg_url)
    reader = store.consents_revision_reader()
    try:
        first = await reader.read()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                          "datname = current_database() AND pid <> pg_backend_pid() AND "
                          "query LIKE 'SELECT (SELECT COUNT(*) FROM consents)%'")
        assert await reader.read() == first  # cut while idle: read again, on a new one
        assert await reader.read() == first
    finally:
        await reader.aclose()
        store.close()


async def test_a_batch_outlives_its_revision_connection_being_cut(
        emulator: Emulator, pg_url: str, tmp_path: Path) -> None:
    """The consents' revision reader's connection cut in the middle of a batch (a server
    restart, a killed backend, a firewall's idle timeout): the read that finds it is taken
    again on a new connection, still begun after the sends waiting for it asked. The batch
    goes on; before, that read's error left every send waiting for it, raised out of the
    batch (no BATCH_FINISHED, intents left open, the other sends orphaned)."""
    workspace = await team_workspace(emulator, pg_url, tmp_path / "a", "ann")
    await workspace.refresh()
    cut: list[int] = []

    def progress(event: BatchProgress) -> None:
        if event.completed >= 3 and not cut:
            with psycopg.connect(pg_url, autocommit=True) as admin:
                cut.append(len(admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                    "datname = current_database() AND pid <> pg_backend_pid() AND "
                    "query LIKE 'SELECT (SELECT COUNT(*) FROM consents)%'").fetchall()))

    try:
        preview = workspace.preview()
        before = versions(emulator)
        emulator.app.set_faults(FaultPlan(latency_ms=2))
        _, results = await workspace.complete(preview, on_progress=progress)
        assert cut == [1]  # the reader's connection, and only it
        assert {r.outcome for r in results} == {Outcome.COMPLETED}
        assert len(results) == len(preview.items)
        assert_invariants(emulator, workspace, pg_url, before, preview.items)
    finally:
        await workspace.aclose()
