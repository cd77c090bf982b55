"""The audit trail: append-only in the database, and any tampering (a changed field, a deleted
entry, two swapped, a cut tail against a checkpoint) makes `verify` fail naming where."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from services.audit import AUDIT_FIELDS, AuditAction, AuditTrail, Checkpoint
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
