"""`recon-console db migrate --to postgresql://...`: a specialist's SQLite history moves onto the
team's PostgreSQL database whole (the audit chain to the same head hash), or not at all."""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from console.cli import main
from services import db_migrate
from services.demo import consent_for
from services.emulator import FaultPlan
from services.storage import transfer
from services.storage.sqlite import SQLiteStore
from tests.conftest import Emulator
from tests.test_completion import ready_workspace


def sqlite_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        order = "seq" if table == "audit" else "rowid"
        return conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"
                            ).fetchall()
    finally:
        conn.close()


def pg_rows(url: str, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    order = {"audit": "seq", "consents": "id", "consent_revocations": "seq"}.get(table)
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}"
                            + (f" ORDER BY {order}" if order else "")).fetchall()
    return rows if order else sorted(rows, key=repr)


def columns_of(db: Path, table: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def pg_count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


class Book:
    """One specialist's SQLite database with a real history: consents (a second version and a
    revocation), a completed batch, a reminder opt-out, and the audit chain of it all."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "recon.db"
        self.credentials = tmp_path / "credentials.toml"  # absent: the key gets its own file
        self.checkpoints = tmp_path / "checkpoints"

    def options(self) -> list[str]:
        return ["--db", str(self.db), "--credentials", str(self.credentials),
                "--checkpoint-dir", str(self.checkpoints)]


async def build_book(emulator: Emulator, tmp_path: Path, *, leave_open: bool = False) -> Book:
    book = Book(tmp_path)
    workspace = await ready_workspace(emulator, tmp_path, merchants=2)
    try:
        workspace.settings.checkpoint_dir = book.checkpoints
        items = workspace.preview().items
        await workspace.complete(workspace.preview_of(items[:4]))
        # A second version of the first merchant's consent (a narrower scope, same id).
        first = emulator.merchants[0]
        now = datetime.now(UTC)
        original = consent_for(first, now)
        changed = tmp_path / "consent-v2.json"
        changed.write_text(json.dumps([consent_for(first, now, consent_id=original[
            "consent_id"], limits={"max_orders_per_batch": 50})]))
        workspace.import_consent_files([changed])
        consents = workspace.store.consents()
        workspace.revoke_consent(consents[-1].record.consent_id, by="Owner",
                                 reason="in-house again")
        workspace.store.save_reminder_opt_out(emulator.merchants[0].merchant.id, True,
                                              "Ana", "asked by phone", "2026-11-26T12:00:00Z")
        if leave_open:  # an answer lost for good: the intent stays open
            emulator.app.set_faults(FaultPlan(lost_response_rate=1.0, operations=["UpdateOrder"]))
            await workspace.engine().run(workspace.preview().items[:1])
            emulator.app.set_faults(FaultPlan())
        workspace.write_checkpoint()
    finally:
        await workspace.aclose()
    return book


def migrate(capsys: pytest.CaptureFixture[str], book: Book, url: str, *extra: str
            ) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["db", "migrate", *book.options(), "--to", url, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_copies_the_history_and_the_chain_to_the_same_head(
        emulator: Emulator, tmp_path: Path, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    book = asyncio.run(build_book(emulator, tmp_path))
    code, out, err = migrate(capsys, book, pg_url, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert "same head" in err and report["checkpoint"]
    for table in transfer.MOVED_TABLES:
        columns = columns_of(book.db, table)
        source = sqlite_rows(book.db, table)
        copied = pg_rows(pg_url, table, columns)
        if table not in ("audit", "consents", "consent_revocations"):
            source = sorted(source, key=repr)
        assert copied == source, table
        assert report["rows"][table] == len(source)
    assert report["rows"]["audit"] > 10 and report["rows"]["consent_revocations"] == 1
    versions = pg_rows(pg_url, "consents", ["consent_id", "version"])
    assert max(version for _, version in versions) >= 2  # every version came along
    assert report["rows"]["intents"] >= 4 and report["rows"]["reminder_opt_outs"] == 1
    for table in transfer.NOT_MOVED:
        # The change counter's one row is made by the migrations, not copied.
        assert pg_count(pg_url, table) == (table == "change_counter"), table

    # The team's console verifies the copy: same entries, same head, anchored by the new
    # database's own signed checkpoint.
    capsys.readouterr()
    assert main(["audit", "verify", "--db", pg_url, "--credentials", str(book.credentials),
                 "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["ok"] and verified["checkpoint"] is not None
    assert (verified["entries"], verified["head_hash"]) == (report["audit_entries"],
                                                            report["head_hash"])
    last = sqlite_rows(book.db, "audit")[-1]
    assert report["head_hash"] == last[-1]

    # A new entry on PostgreSQL chains onto the copied head (the head row moved with it).
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT seq, hash FROM audit_head").fetchone() == (last[0], last[-1])


def test_every_table_is_either_moved_or_left_on_purpose(tmp_path: Path) -> None:
    """A table added later must be sorted into one list or the other, never forgotten."""
    SQLiteStore(tmp_path / "recon.db").close()
    conn = sqlite3.connect(tmp_path / "recon.db")
    tables = {row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "AND name != '_sqlite_migrations'")}
    conn.close()
    assert tables == set(transfer.MOVED_TABLES) | set(transfer.NOT_MOVED)


def test_migrate_refuses_while_intents_are_open(
        emulator: Emulator, tmp_path: Path, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    book = asyncio.run(build_book(emulator, tmp_path, leave_open=True))
    code, out, err = migrate(capsys, book, pg_url)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "1 completion intent is still open" in err
    assert "recon-console recover" in err
    assert pg_count(pg_url, "consents") == 0 and pg_count(pg_url, "audit") == 0


def test_migrate_refuses_a_database_that_already_holds_a_history(
        emulator: Emulator, tmp_path: Path, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    book = asyncio.run(build_book(emulator, tmp_path))
    assert migrate(capsys, book, pg_url)[0] == 0
    entries = pg_count(pg_url, "audit")
    code, _, err = migrate(capsys, book, pg_url)
    assert code == 2 and "already holds" in err and err.count("\n") == 1
    assert pg_count(pg_url, "audit") == entries  # nothing doubled


def test_migrate_refuses_a_chain_that_does_not_verify(
        emulator: Emulator, tmp_path: Path, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    book = asyncio.run(build_book(emulator, tmp_path))
    conn = sqlite3.connect(book.db)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET detail = 'rewritten' WHERE seq = 2")
    conn.commit()
    conn.close()
    code, _, err = migrate(capsys, book, pg_url)
    assert code == 1 and "does not verify before the copy" in err
    assert pg_count(pg_url, "consents") == 0 and pg_count(pg_url, "audit") == 0


def test_a_copy_that_ends_elsewhere_is_rolled_back_whole(
        emulator: Emulator, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    book = asyncio.run(build_book(emulator, tmp_path))
    # A copy that loses the audit chain on the way (a bug, a schema drift): caught inside the
    # copy's transaction, so not even the consents are left behind.
    lossy = functools.partial(transfer.copy_tables, tables=[
        table for table in transfer.MOVED_TABLES if table != "audit"])
    monkeypatch.setattr(db_migrate, "copy_tables", lossy)
    code, _, err = migrate(capsys, book, pg_url)
    assert code == 1 and "the copied audit chain ends at entry 0" in err
    assert pg_count(pg_url, "consents") == 0 and pg_count(pg_url, "audit") == 0


@pytest.mark.parametrize("to", ["postgresql://recon:hunter2-Zq9@db.example.com/recon",
                                "postgresql://recon@db.example.com/recon?password=hunter2-Zq9"])
def test_migrate_refuses_a_password_in_the_target_url(
        tmp_path: Path, to: str, capsys: pytest.CaptureFixture[str]) -> None:
    book = Book(tmp_path)
    sqlite3.connect(book.db).close()
    code, out, err = migrate(capsys, book, to)
    assert code == 2 and "holds a password" in err
    assert "hunter2" not in out + err


def test_migrate_copies_from_a_sqlite_file_only(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["db", "migrate", "--db", "postgresql://recon@db.example.com/a",
                 "--to", "postgresql://recon@db.example.com/b"])
    err = capsys.readouterr().err
    assert code == 2 and "copies from a SQLite file" in err
    code = main(["db", "migrate", "--db", str(tmp_path / "missing.db"),
                 "--to", "postgresql://recon@db.example.com/b"])
    err = capsys.readouterr().err
    assert code == 2 and "no SQLite database at" in err
