"""The audit trail: append-only in the database, and any tampering (a changed field, a deleted
entry, two swapped, a cut tail against a checkpoint) makes `verify` fail naming where."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import sqlite3
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import services.audit as audit_module
from services.audit import (
    AUDIT_FIELDS,
    GENESIS,
    AuditAction,
    AuditTrail,
    ChainProblem,
    Checkpoint,
    VerifyReport,
    _verify_range,
    _verify_range_in_process,
)
from services.store import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trail(tmp_path: Path) -> AuditTrail:
    trail = AuditTrail(Store(tmp_path / "audit.db"))
    for index in range(30):
        trail.append(operator=f"op{index % 3}", action=AuditAction.OUTCOME,
                     merchant_id=f"M{index % 4}", order_id=f"O{index}", version=index,
                     amount=100 * index, currency="USD", consent_id="c", consent_sha256="s",
                     batch_id="b", approved_set_sha256="a", idempotency_key=f"k{index}",
                     outcome="completed" if index % 5 else "failed", square_code=None,
                     detail=f"entry {index}")
    return trail


def tamper(trail: AuditTrail, sql: str, params: list[object]) -> None:
    """What someone with the file could do: drop the guards, then edit."""
    conn = trail.store.conn
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    conn.execute(sql, params)


def test_clean_chain_verifies(trail: AuditTrail) -> None:
    report = trail.verify()
    assert report.ok and report.entries == 30


def test_database_refuses_update_and_delete(trail: AuditTrail) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        trail.store.conn.execute("UPDATE audit SET detail = 'x' WHERE seq = 3")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        trail.store.conn.execute("DELETE FROM audit WHERE seq = 30")


@pytest.mark.parametrize("field", [f for f in AUDIT_FIELDS if f != "seq"] + ["hash"])
@pytest.mark.parametrize("seq", [1, 17, 30])
def test_changing_any_field_of_any_entry_is_found(trail: AuditTrail, field: str,
                                                  seq: int) -> None:
    value = "tampered" if field not in ("version", "amount") else 999999
    tamper(trail, f"UPDATE audit SET {field} = ? WHERE seq = ?", [value, seq])
    report = trail.verify()
    assert not report.ok
    # A changed entry breaks at itself; a changed hash may show at the next link.
    assert report.broken_at in (seq, seq + 1), report


def test_deleting_one_entry_is_found(trail: AuditTrail) -> None:
    tamper(trail, "DELETE FROM audit WHERE seq = ?", [12])
    report = trail.verify()
    assert not report.ok and report.broken_at == 12 and "missing" in (report.problem or "")


def test_reordering_two_entries_is_found(trail: AuditTrail) -> None:
    conn = trail.store.conn
    tamper(trail, "UPDATE audit SET seq = -1 WHERE seq = 8", [])
    conn.execute("UPDATE audit SET seq = 8 WHERE seq = 9")
    conn.execute("UPDATE audit SET seq = 9 WHERE seq = -1")
    report = trail.verify()
    assert not report.ok and report.broken_at == 8


def test_cut_tail_is_found_against_a_checkpoint(trail: AuditTrail) -> None:
    checkpoint = trail.checkpoint()
    assert checkpoint.size == 30
    tamper(trail, "DELETE FROM audit WHERE seq > ?", [26])
    assert trail.verify().ok  # alone, a shorter chain is still a chain
    report = trail.verify(checkpoint)
    assert not report.ok and report.broken_at == 27 and "cut" in (report.problem or "")


def test_rewritten_history_is_found_against_a_checkpoint(trail: AuditTrail) -> None:
    checkpoint = trail.checkpoint()
    # Rewrite everything consistently (recomputing hashes): only the checkpoint can tell.
    rows = list(trail.entries())
    tamper(trail, "DELETE FROM audit", [])
    for row in rows:
        fields = {k: row[k] for k in AUDIT_FIELDS if k not in ("seq", "prev_hash")}
        if row["seq"] == 5:
            fields["detail"] = "history rewritten"
        trail.append(**fields)
    assert trail.verify().ok
    report = trail.verify(checkpoint)
    assert not report.ok and report.broken_at == 30 and "rewritten" in (report.problem or "")


def test_growth_after_checkpoint_still_verifies(trail: AuditTrail) -> None:
    checkpoint = trail.checkpoint()
    trail.append(operator="x", action=AuditAction.RECOVERY, detail="later")
    assert trail.verify(checkpoint).ok


def test_exports_csv_and_jsonl_with_filters(trail: AuditTrail) -> None:
    lines = trail.export_text("jsonl", merchant_id="M1").splitlines()
    assert len(lines) == 8 and all(json.loads(line)["merchant_id"] == "M1" for line in lines)
    rows = list(csv.DictReader(io.StringIO(trail.export_text("csv"))))
    assert len(rows) == 30 and rows[0]["seq"] == "1" and rows[-1]["hash"]
    assert trail.export_text("jsonl", since="2100-01-01T00:00:00Z") == ""
    assert [e["seq"] for e in trail.entries(operator="op1", outcome="failed")] == [11, 26]


def test_cli_verify_exit_codes(trail: AuditTrail, tmp_path: Path) -> None:
    db = str(trail.store.path)
    run = [sys.executable, "-m", "console.cli", "audit"]
    # Key and checkpoints beside a credentials path of the test's own, never under $HOME.
    env_args = ["--db", db, "--credentials", str(tmp_path / "credentials.toml")]
    checkpoint = tmp_path / "cp.json"
    made = subprocess.run([*run, "checkpoint", *env_args, "--output", str(checkpoint)],
                          cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0 and json.loads(checkpoint.read_text())["size"] == 30
    ok = subprocess.run([*run, "verify", *env_args, "--checkpoint", str(checkpoint), "--json"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    tamper(trail, "DELETE FROM audit WHERE seq > ?", [20])
    trail.store.conn.commit()
    cut = subprocess.run([*run, "verify", *env_args, "--checkpoint", str(checkpoint)],
                         cwd=ROOT, capture_output=True, text=True)
    assert cut.returncode == 1 and "entry 21" in cut.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    usage = subprocess.run([*run, "verify", *env_args, "--checkpoint", str(bad)], cwd=ROOT,
                           capture_output=True, text=True)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_checkpoint_shape() -> None:
    checkpoint = Checkpoint(3, "a" * 64, "2026-11-26T00:00:00Z", "b" * 64)
    assert set(checkpoint.to_json()) == {"size", "head_hash", "created_at", "signature"}


@pytest.mark.parametrize("where", [3, 15, 16, 17, 30])
def test_parallel_verify_finds_the_same_breaks(trail: AuditTrail, where: int) -> None:
    assert trail.verify(parallel_from=10).ok  # two or more ranges, one process each
    tamper(trail, "UPDATE audit SET detail = 'x' WHERE seq = ?", [where])
    report = trail.verify(parallel_from=10)
    assert not report.ok and report.broken_at == where


def test_parallel_verify_finds_gaps_and_cut_tails(trail: AuditTrail) -> None:
    checkpoint = trail.checkpoint()
    tamper(trail, "DELETE FROM audit WHERE seq = ?", [16])
    report = trail.verify(parallel_from=10)
    assert not report.ok and report.broken_at == 16
    tamper(trail, "DELETE FROM audit WHERE seq >= ?", [16])
    assert trail.verify(parallel_from=10).ok
    report = trail.verify(checkpoint, parallel_from=10)
    assert not report.ok and "cut" in (report.problem or "")


# ---------------------------------------------------------------- what operators and scripts read
FIXED = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)


def test_problems_are_named_exactly(trail: AuditTrail) -> None:
    """`problem` is what the operator reads and `problem_kind` what scripts branch on."""
    tamper(trail, "UPDATE audit SET detail = 'x' WHERE seq = ?", [9])
    report = trail.verify()
    assert (report.broken_at, report.problem, report.problem_kind, report.entries) == (
        9, "its contents do not match its hash (changed).", ChainProblem.CHANGED_ENTRY, 8)
    assert report.head_hash == trail.hash_at(8)
    assert report.to_json()["ok"] is False  # scripts read `"ok": false`, never null
    assert report.sentence() == ("Audit chain BROKEN at entry 9: its contents do not match "
                                 "its hash (changed).")


def test_a_missing_entry_and_a_broken_link_are_named(trail: AuditTrail) -> None:
    tamper(trail, "DELETE FROM audit WHERE seq = ?", [12])
    report = trail.verify()
    assert (report.problem, report.problem_kind, report.entries) == (
        "entry 12 is missing (next is 13).", ChainProblem.MISSING_ENTRY, 11)
    tamper(trail, "UPDATE audit SET prev_hash = ? WHERE seq = ?", ["f" * 64, 5])
    report = trail.verify()
    assert (report.broken_at, report.problem, report.problem_kind) == (
        5, "its prev_hash does not match the entry before it.", ChainProblem.BROKEN_LINK)


def test_verify_sentences(trail: AuditTrail) -> None:
    head = trail.hash_at(30)
    assert head is not None
    assert trail.verify().sentence() == f"Audit chain verified: 30 entries, head {head[:12]}."
    where = {"path": "/cp.json", "size": 30, "created_at": "2026-11-26T00:00:00Z"}
    anchored = VerifyReport(True, 30, head, checkpoint=where)
    assert anchored.sentence() == (f"Audit chain verified: 30 entries, head {head[:12]}, against "
                                   "checkpoint /cp.json (size 30, 2026-11-26T00:00:00Z).")
    warned = VerifyReport(True, 30, head, problem_kind="no_checkpoint", warning="no anchor")
    assert warned.sentence() == (f"Audit chain verified: 30 entries, head {head[:12]}. "
                                 "Warning: no anchor")
    assert VerifyReport(True, 30, head).against() == "no checkpoint"
    failed = VerifyReport(False, 30, head, None, "the signature does not match.")
    assert failed.sentence() == "Audit check FAILED: the signature does not match."


def test_verify_json_has_every_field(trail: AuditTrail) -> None:
    report = trail.verify()
    assert report.to_json() == {"ok": True, "entries": 30, "head_hash": trail.hash_at(30),
                                "broken_at": None, "problem": None, "problem_kind": None,
                                "warning": None, "checkpoint": None}


def test_cut_tail_and_rewrite_are_named(trail: AuditTrail) -> None:
    checkpoint = Checkpoint(30, "e" * 64, "2026-11-26T00:00:00Z")
    report = trail.verify(checkpoint)  # same size, another head: rewritten
    assert (report.ok, report.broken_at, report.problem_kind, report.entries) == (
        False, 30, ChainProblem.REWRITTEN_HISTORY, 30)
    assert report.problem == ("entry 30 does not have the hash the checkpoint of "
                              "2026-11-26T00:00:00Z saw: history was rewritten.")
    assert report.head_hash == trail.hash_at(30)
    longer = Checkpoint(31, "e" * 64, "2026-11-26T00:00:00Z")
    report = trail.verify(longer)
    assert (report.broken_at, report.problem_kind, report.entries) == (
        31, ChainProblem.CUT_TAIL, 30)
    assert report.head_hash == trail.hash_at(30)
    assert report.problem == ("the chain has 30 entries but the checkpoint of "
                              "2026-11-26T00:00:00Z saw 31: entries were cut from the end.")


def test_an_empty_trail_verifies_against_its_empty_checkpoint(tmp_path: Path) -> None:
    trail = AuditTrail(Store(tmp_path / "empty.db"), clock=lambda: FIXED)
    checkpoint = trail.checkpoint()
    assert checkpoint == Checkpoint(0, GENESIS, "2026-11-26T09:30:00.000000Z")
    report = trail.verify(checkpoint)
    assert report.ok and report.entries == 0 and report.head_hash == GENESIS
    assert trail.size() == 0
    trail.append(operator="a", action=AuditAction.PREVIEW)
    assert trail.verify(checkpoint).ok and trail.size() == 1
    assert next(trail.entries())["at"] == "2026-11-26T09:30:00.000000Z"  # the trail's clock
    assert trail.checkpoint() == Checkpoint(1, str(trail.hash_at(1)),
                                            "2026-11-26T09:30:00.000000Z")


def test_one_range_of_a_parallel_verify(trail: AuditTrail) -> None:
    """What each worker process checks: entries first..end-1, from the hash before them."""
    rows = trail.store.audit_rows(11, 21)
    assert _verify_range(rows, 11, 21, trail.hash_at(10)) == (None, 10, trail.hash_at(20))
    path = str(trail.store.path)
    assert _verify_range_in_process(path, 21, None, trail.hash_at(20)) == (
        None, 10, trail.hash_at(30))
    tamper(trail, "DELETE FROM audit WHERE seq = ?", [20])
    trail.store.conn.commit()
    assert _verify_range_in_process(path, 11, 21, trail.hash_at(10)) == (
        (20, ChainProblem.MISSING_ENTRY, "entry 20 is missing."), 9, trail.hash_at(19))


def test_verify_falls_back_to_one_process_when_workers_cannot_start(
        trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoWorkers:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise BrokenProcessPool("cannot start")

    monkeypatch.setattr(audit_module, "ProcessPoolExecutor", NoWorkers)
    assert trail.verify(parallel_from=10).to_json() == trail.verify().to_json()
    tamper(trail, "UPDATE audit SET detail = 'x' WHERE seq = ?", [25])
    assert trail.verify(parallel_from=10).broken_at == 25


def test_append_many_chains_onto_the_trail_in_one_go(tmp_path: Path) -> None:
    """The journal's group commits: the entries get the next seqs, link to the head, take the
    clock's time unless they carry one, and verify like single appends."""
    trail = AuditTrail(Store(tmp_path / "many.db"), clock=lambda: FIXED)
    with trail.store.transaction() as conn:
        trail.append_many(conn, [])
    assert trail.size() == 0
    with trail.store.transaction() as conn:
        trail.append_many(conn, [{"operator": "a", "action": AuditAction.INTENT},
                                 {"operator": "a", "action": AuditAction.OUTCOME,
                                  "at": "2026-01-01T00:00:00.000000Z"}])
        trail.append_many(conn, [{"operator": "b", "action": AuditAction.RECOVERY}])
    rows = list(trail.entries())
    assert [(r["seq"], r["action"], r["operator"], r["at"]) for r in rows] == [
        (1, "intent", "a", "2026-11-26T09:30:00.000000Z"),
        (2, "outcome", "a", "2026-01-01T00:00:00.000000Z"),
        (3, "recovery", "b", "2026-11-26T09:30:00.000000Z")]
    assert rows[0]["prev_hash"] == GENESIS
    assert [r["prev_hash"] for r in rows[1:]] == [rows[0]["hash"], rows[1]["hash"]]
    assert trail.verify().ok
    with pytest.raises(ValueError, match=r"unknown audit fields: \['colour'\]"), \
            trail.store.transaction() as conn:
        trail.append_many(conn, [{"action": AuditAction.INTENT, "colour": "red"}])
    with pytest.raises(ValueError, match=r"unknown audit fields: \['colour'\]"):
        trail.append(action=AuditAction.INTENT, colour="red")
    assert trail.size() == 3
    # Without a clock of its own, the trail stamps entries with the time now.
    unclocked = AuditTrail(trail.store)
    before = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    with trail.store.transaction() as conn:
        unclocked.append_many(conn, [{"operator": "c", "action": AuditAction.PREVIEW}])
    assert next(trail.entries(operator="c"))["at"] >= before


def test_entries_filter_on_every_field(tmp_path: Path) -> None:
    moments = iter([datetime(2026, 11, day, tzinfo=UTC) for day in range(1, 7)])
    trail = AuditTrail(Store(tmp_path / "f.db"), clock=lambda: next(moments))
    for index in range(6):
        trail.append(operator=f"op{index % 2}", action=AuditAction.OUTCOME if index % 3
                     else AuditAction.INTENT, merchant_id=f"M{index % 3}", order_id=f"O{index}",
                     outcome="failed" if index == 4 else "completed")

    def seqs(**filters: Any) -> list[int]:
        return [e["seq"] for e in trail.entries(**filters)]

    assert seqs(merchant_id="M1") == [2, 5]
    assert seqs(operator="op1") == [2, 4, 6]
    assert seqs(order_id="O3") == [4]
    assert seqs(outcome="failed") == [5]
    assert seqs(action="intent") == [1, 4]
    assert seqs(since="2026-11-03T00:00:00.000000Z") == [3, 4, 5, 6]
    assert seqs(until="2026-11-03T00:00:00.000000Z") == [1, 2]
    assert seqs(since="2026-11-02T00:00:00.000000Z", until="2026-11-04T00:00:00.000000Z") == [2, 3]
    assert seqs(newest_first=True, limit=2) == [6, 5]
    assert seqs(limit=2) == [1, 2]
    out = io.StringIO()
    assert trail.export(out, "jsonl", operator="op0") == 3
    assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()] == [1, 3, 5]
    out = io.StringIO()
    assert trail.export(out, "csv", outcome="completed") == 5
    assert [r["seq"] for r in csv.DictReader(io.StringIO(out.getvalue()))] == [
        "1", "2", "3", "4", "6"]
    with pytest.raises(ValueError, match="unknown export format 'xml': use csv or jsonl"):
        trail.export(io.StringIO(), "xml")


class InlinePool:
    """A process pool that runs each range here, in order: what the workers would compute,
    observable (and fast) in one process."""

    made: list[tuple[int, str]] = []

    def __init__(self, workers: int, mp_context: multiprocessing.context.BaseContext) -> None:
        InlinePool.made.append((workers, mp_context.get_start_method()))

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Any, *iterables: Any) -> Any:
        return map(fn, *iterables)


@pytest.mark.parametrize(("cores", "workers"), [(None, 1), (1, 1), (2, 2), (3, 3), (16, 4)])
def test_parallel_verify_splits_the_chain_one_range_per_core(
        trail: AuditTrail, monkeypatch: pytest.MonkeyPatch, cores: int | None,
        workers: int) -> None:
    """From `parallel_from` entries on, one range per core (at most 4), never forked; the
    ranges together check every link, so a change at any entry, at a range's edge or not,
    is found where it is."""
    InlinePool.made = []
    monkeypatch.setattr(audit_module, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(audit_module.os, "cpu_count", lambda: cores)
    assert trail.verify(parallel_from=31).ok and InlinePool.made == []
    clean = trail.verify(parallel_from=30)
    assert clean.to_json() == trail.verify().to_json()
    assert InlinePool.made == ([] if workers == 1 else [(workers, "forkserver")])
    for seq in (1, 7, 8, 9, 10, 11, 12, 15, 16, 17, 22, 23, 24, 25, 29, 30):
        conn = trail.store.conn
        before = conn.execute("SELECT detail FROM audit WHERE seq = ?", [seq]).fetchone()[0]
        tamper(trail, "UPDATE audit SET detail = 'x' WHERE seq = ?", [seq])
        report = trail.verify(parallel_from=30)
        assert (report.broken_at, report.entries, report.problem_kind) == (
            seq, seq - 1, ChainProblem.CHANGED_ENTRY), seq
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?", [before, seq])
    checkpoint = trail.checkpoint()
    tamper(trail, "DELETE FROM audit WHERE seq = ?", [16])  # the last of a range of 8
    report = trail.verify(parallel_from=10)
    assert (report.broken_at, report.entries, report.problem_kind) == (
        16, 15, ChainProblem.MISSING_ENTRY)
    tamper(trail, "DELETE FROM audit WHERE seq >= ?", [16])
    report = trail.verify(checkpoint, parallel_from=10)
    assert (report.ok, report.entries, report.broken_at, report.problem_kind) == (
        False, 15, 16, ChainProblem.CUT_TAIL)


def test_without_a_fork_server_workers_are_spawned_never_forked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forking a process with threads can deadlock the child (see test_checkpoints)."""
    assert audit_module._worker_context().get_start_method() == "forkserver"
    monkeypatch.setattr(audit_module.multiprocessing, "get_all_start_methods",
                        lambda: ["fork", "spawn"])
    assert audit_module._worker_context().get_start_method() == "spawn"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 7, 9, 13])
def test_a_short_chain_split_in_ranges_still_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """More cores than the chain has room for: no range may start past the last entry (it
    used to report a clean chain of 5 as 'entry 6 is missing')."""
    monkeypatch.setattr(audit_module, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(audit_module.os, "cpu_count", lambda: 4)
    trail = AuditTrail(Store(tmp_path / "short.db"))
    for _ in range(size):
        trail.append(operator="o", action=AuditAction.PREVIEW)
    report = trail.verify(parallel_from=1)
    assert report.ok and report.entries == size, report.sentence()
    tamper(trail, "UPDATE audit SET detail = 'x' WHERE seq = ?", [size])
    assert trail.verify(parallel_from=1).broken_at == size


def test_an_entry_appended_in_a_transaction_commits_or_rolls_back_with_it(
        trail: AuditTrail) -> None:
    with pytest.raises(RuntimeError), trail.store.transaction() as conn:
        trail.append(conn, operator="x", action=AuditAction.CANCEL, detail="rolled back")
        raise RuntimeError("the change it records failed")
    assert trail.size() == 30
    with trail.store.transaction() as conn:
        entry = trail.append(conn, operator="x", action=AuditAction.CANCEL, detail="kept")
    assert (entry["seq"], entry["detail"], trail.size()) == (31, "kept", 31)
    assert trail.verify().ok
