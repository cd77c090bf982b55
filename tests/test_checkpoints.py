"""Issue 8, hole 9: the audit is anchored outside the database.

Whoever can write the database file can recompute the whole chain or cut its tail, and a crash
that loses the WAL cuts it too; the chain alone still verifies. A signed checkpoint, written
after every batch and revocation into a folder outside the database with a key that never
enters it, catches each of them, and a forged checkpoint is caught by its signature.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import services.audit as audit_module
from console.cli import main
from services.audit import AUDIT_FIELDS, GENESIS, AuditAction, AuditTrail, entry_hash
from services.checkpoints import KEY_FILE_NAME, CheckpointAnchor, CheckpointKey, sign
from services.completion import Outcome
from services.errors import AuditChainError
from services.store import Store
from tests.conftest import Emulator
from tests.test_completion import ready_workspace

ROOT = Path(__file__).resolve().parents[1]


class Setup:
    """A database with 30 audit entries, its credentials path and checkpoint folder."""

    def __init__(self, directory: Path) -> None:
        self.db = directory / "recon.db"
        self.credentials = directory / "credentials.toml"   # absent: the key gets its own file
        self.checkpoints = directory / "checkpoints"
        self.anchor = CheckpointAnchor(self.checkpoints, self.credentials)
        store = Store(self.db)
        append(AuditTrail(store), 30)
        store.close()

    def options(self) -> list[str]:
        return ["--db", str(self.db), "--credentials", str(self.credentials),
                "--checkpoint-dir", str(self.checkpoints)]

    def checkpoint(self) -> Path:
        store = Store(self.db)
        try:
            path = self.anchor.write(AuditTrail(store))
        finally:
            store.close()
        assert path is not None
        return path

    def verify(self, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
        capsys.readouterr()
        code = main(["audit", "verify", *self.options(), "--json", *extra])
        return code, json.loads(capsys.readouterr().out)


def append(trail: AuditTrail, count: int, start: int = 0) -> None:
    for index in range(start, start + count):
        trail.append(operator="op", action=AuditAction.OUTCOME, merchant_id="M1",
                     order_id=f"O{index}", version=index, amount=100, currency="USD",
                     outcome="completed", detail=f"entry {index}")


def sql(db: Path, *statements: tuple[str, list[Any]]) -> None:
    """What someone with the file can do: drop the guards, then edit."""
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    for text, params in statements:
        conn.execute(text, params)
    conn.commit()
    conn.close()


def recompute_every_hash(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    columns = [*AUDIT_FIELDS, "hash"]
    rows = conn.execute(f"SELECT {', '.join(columns)} FROM audit ORDER BY seq").fetchall()
    prev = GENESIS
    for row in rows:
        entry = dict(zip(columns, row, strict=True))
        entry["prev_hash"] = prev
        prev = entry_hash(entry)
        conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?",
                     [entry["prev_hash"], prev, entry["seq"]])
    conn.commit()
    conn.close()


def chain_alone_verifies(db: Path) -> bool:
    store = Store(db)
    try:
        return AuditTrail(store).verify().ok
    finally:
        store.close()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


# ---------------------------------------------------------------------- the three holes
def test_hole9_recomputed_chain_is_caught(setup: Setup, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    setup.checkpoint()
    sql(setup.db, ("UPDATE audit SET detail = 'history rewritten' WHERE seq = 5", []))
    recompute_every_hash(setup.db)
    assert chain_alone_verifies(setup.db)  # the chain alone cannot tell
    code, report = setup.verify(capsys)
    assert code == 1 and report["ok"] is False
    assert report["problem_kind"] == "rewritten_history" and report["broken_at"] == 30
    assert "rewritten" in report["problem"]
    assert report["checkpoint"]["size"] == 30


def test_hole9_cut_tail_is_caught(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.checkpoint()
    sql(setup.db, ("DELETE FROM audit WHERE seq > 20", []))
    assert chain_alone_verifies(setup.db)
    code, report = setup.verify(capsys)
    assert code == 1 and report["problem_kind"] == "cut_tail" and report["broken_at"] == 21
    assert "cut from the end" in report["problem"]
    main(["audit", "verify", *setup.options()])
    assert "BROKEN at entry 21" in capsys.readouterr().err


_CRASHING_WRITER = """
import os, signal, sys
from pathlib import Path
from services.audit import AuditAction
from services.settings import ReconSettings
from services.workspace import Workspace
db, credentials, checkpoints = (Path(p) for p in sys.argv[1:4])
workspace = Workspace.open(ReconSettings(db=db, credentials=credentials,
                                         checkpoint_dir=checkpoints))
for index in range(5):
    workspace.audit.append(operator="op", action=AuditAction.OUTCOME, order_id=f"late{index}",
                           outcome="completed")
assert workspace.write_checkpoint() is not None, workspace.checkpoint_problem
os.kill(os.getpid(), signal.SIGKILL)  # before SQLite copies the WAL into the database
"""


def test_hole9_wal_deleted_after_a_crash_is_caught(setup: Setup,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(setup.db),
                              str(setup.credentials), str(setup.checkpoints)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    wal = Path(f"{setup.db}-wal")
    assert wal.stat().st_size > 0  # the five entries are only in the WAL
    wal.unlink()
    Path(f"{setup.db}-shm").unlink(missing_ok=True)
    assert chain_alone_verifies(setup.db)
    code, report = setup.verify(capsys)
    assert code == 1 and report["problem_kind"] == "cut_tail"
    assert report["entries"] == 30 and report["checkpoint"]["size"] == 35


# ---------------------------------------------------------------------- forged checkpoints
def _edit(path: Path, **changes: Any) -> None:
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("forgery", ["size", "head_hash", "other_key", "unsigned"])
def test_hole9_forged_checkpoint_is_caught(setup: Setup, capsys: pytest.CaptureFixture[str],
                                           forgery: str) -> None:
    path = setup.checkpoint()
    sql(setup.db, ("DELETE FROM audit WHERE seq > 20", []))
    recompute_every_hash(setup.db)
    if forgery == "size":        # make the checkpoint fit the cut chain
        _edit(path, size=20)
    elif forgery == "head_hash":
        store = Store(setup.db)
        _edit(path, head_hash=AuditTrail(store).hash_at(30) or "0" * 64)
        store.close()
    elif forgery == "other_key":  # a checkpoint of the cut chain, signed with another key
        store = Store(setup.db)
        forged = sign(AuditTrail(store).checkpoint(), CheckpointKey(b"k" * 32, "attacker"))
        store.close()
        path.write_text(json.dumps(forged.to_json()))
    else:
        _edit(path, size=20, signature=None)
    code, report = setup.verify(capsys)
    assert code == 1 and report["ok"] is False
    assert report["problem_kind"] == "forged_checkpoint"
    assert "forged" in report["problem"] and str(path) in report["problem"]
    main(["audit", "verify", *setup.options()])
    assert "Audit check FAILED: checkpoint" in capsys.readouterr().err


def test_no_checkpoint_is_a_warning(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = setup.verify(capsys)
    assert code == 0 and report["ok"] is True and report["problem_kind"] == "no_checkpoint"
    assert "not anchored" in report["warning"] and report["checkpoint"] is None
    setup.checkpoint()
    code, report = setup.verify(capsys)
    assert code == 0 and report["problem_kind"] is None and report["warning"] is None
    assert report["checkpoint"]["size"] == 30


def test_verify_uses_the_latest_checkpoint_or_the_one_given(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    first = setup.checkpoint()
    store = Store(setup.db)
    append(AuditTrail(store), 5, start=30)
    store.close()
    latest = setup.checkpoint()
    assert setup.anchor.latest() == latest and first != latest
    sql(setup.db, ("DELETE FROM audit WHERE seq > 32", []))
    code, report = setup.verify(capsys)
    assert code == 1 and report["checkpoint"]["path"] == str(latest)
    code, report = setup.verify(capsys, "--checkpoint", str(first))
    assert code == 0 and report["checkpoint"]["path"] == str(first)
    bad = setup.checkpoints.parent / "bad.json"
    bad.write_text("{}")
    assert main(["audit", "verify", *setup.options(), "--checkpoint", str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------------- writing checkpoints
def test_audit_checkpoint_command_writes_signed_owner_only_files(
        setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "checkpoint", *setup.options()]) == 0
    (written,) = setup.anchor.files()
    output = setup.checkpoints.parent / "elsewhere" / "cp.json"
    assert main(["audit", "checkpoint", *setup.options(), "--output", str(output)]) == 0
    for path in (written, output, setup.credentials.parent / KEY_FILE_NAME):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    document = json.loads(output.read_text())
    assert set(document) == {"size", "head_hash", "created_at", "signature"}
    assert document["size"] == 30 and len(document["signature"]) == 64
    assert written.name.startswith("checkpoint-000000000030-")
    assert not list(setup.checkpoints.glob(".*.tmp"))


def test_a_tampered_chain_is_never_signed(setup: Setup, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """A new checkpoint of a cut or rewritten chain would launder it: refused."""
    setup.checkpoint()
    sql(setup.db, ("DELETE FROM audit WHERE seq > 20", []))
    store = Store(setup.db)
    append(AuditTrail(store), 15, start=100)  # grows past the checkpoint again
    store.close()
    recompute_every_hash(setup.db)
    assert chain_alone_verifies(setup.db)
    assert main(["audit", "checkpoint", *setup.options()]) == 1
    assert "checkpoint not written" in capsys.readouterr().err
    assert len(setup.anchor.files()) == 1
    code, report = setup.verify(capsys)
    assert code == 1 and report["problem_kind"] == "rewritten_history"


def test_key_from_the_credentials_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    key = "correct horse battery staple and then some more"
    setup.credentials.write_text(f'[audit]\ncheckpoint_key = "{key}"\n')
    setup.credentials.chmod(0o600)
    setup.checkpoint()
    assert not (setup.credentials.parent / KEY_FILE_NAME).exists()
    assert setup.verify(capsys)[0] == 0
    setup.credentials.write_text('[audit]\ncheckpoint_key = "another key, forty characters long"')
    code, report = setup.verify(capsys)
    assert code == 1 and report["problem_kind"] == "forged_checkpoint"


def test_a_key_file_others_can_read_is_refused(setup: Setup,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    setup.checkpoint()
    key_file = setup.credentials.parent / KEY_FILE_NAME
    key_file.chmod(0o640)
    capsys.readouterr()
    assert main(["audit", "verify", *setup.options()]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "chmod 600" in error and key_file.read_text().strip() \
        not in error


def test_a_missing_key_is_reported(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.checkpoint()
    (setup.credentials.parent / KEY_FILE_NAME).unlink()
    code, report = setup.verify(capsys)
    assert code == 1 and report["problem_kind"] == "checkpoint_key_missing"
    assert not (setup.credentials.parent / KEY_FILE_NAME).exists()  # verify never makes one


# ---------------------------------------------------------------------- automatic checkpoints
async def test_hole9_checkpoint_written_after_every_batch_and_revocation(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=2)
    try:
        anchor = workspace.checkpoints
        assert anchor.directory.parent == tmp_path / "checkpoints"  # beside the credentials
        assert anchor.files() == []
        preview = workspace.preview()
        assert preview.count > 0
        _, results = await workspace.complete(preview)
        assert {r.outcome for r in results} == {Outcome.COMPLETED}
        after_batch = anchor.files()
        assert len(after_batch) == 1 and workspace.checkpoint_problem is None
        size = workspace.audit.size()
        assert json.loads(after_batch[0].read_text())["size"] == size
        report = workspace.verify()
        assert report.ok and report.checkpoint is not None
        assert report.checkpoint["path"] == str(after_batch[0])

        consent_id = workspace.consents()[0].record.consent_id
        workspace.revoke_consent(consent_id, "Owner", "closing the account")
        latest = anchor.latest()
        assert latest is not None and latest not in after_batch
        assert json.loads(latest.read_text())["size"] == workspace.audit.size() == size + 1
        assert stat.S_IMODE(latest.stat().st_mode) == 0o600

        # the key never lands in the database (nor its WAL)
        secret = anchor.key()
        assert secret is not None
        workspace.store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        for path in tmp_path.glob("recon.db*"):
            data = path.read_bytes()
            assert secret.secret not in data and secret.secret.hex().encode() not in data, path
    finally:
        await workspace.aclose()


async def test_a_refused_automatic_checkpoint_is_reported_not_raised(
        emulator: Emulator, tmp_path: Path) -> None:
    workspace = await ready_workspace(emulator, tmp_path, merchants=1)
    try:
        workspace.write_checkpoint()
        assert workspace.checkpoints.files()
        workspace.store.conn.execute("DROP TRIGGER audit_no_delete")
        last = workspace.audit.size()
        workspace.store.conn.execute("DELETE FROM audit WHERE seq = ?", [last])
        _, results = await workspace.complete(workspace.preview())
        assert results  # the batch itself ran and reports its results
        assert workspace.checkpoint_problem and "checkpoint not written" in \
            workspace.checkpoint_problem
        assert len(workspace.checkpoints.files()) == 1
        with pytest.raises(AuditChainError):
            workspace.write_checkpoint(automatic=False)
    finally:
        await workspace.aclose()


# ---------------------------------------------------------------------- issue 15 items
def test_verification_never_forks(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forking a process with threads (the console verifies from one) can deadlock."""
    seen: list[str] = []
    real = audit_module.ProcessPoolExecutor

    def recording(workers: int, mp_context: multiprocessing.context.BaseContext
                  ) -> Any:
        seen.append(mp_context.get_start_method())
        return real(workers, mp_context=mp_context)

    monkeypatch.setattr(audit_module, "ProcessPoolExecutor", recording)
    store = Store(setup.db)
    try:
        assert AuditTrail(store).verify(parallel_from=10).ok
    finally:
        store.close()
    assert seen and "fork" not in seen


def test_export_since_compares_instants(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    db = tmp_path / "recon.db"
    store = Store(db)
    for at in ("2026-11-27T08:29:59", "2026-11-27T08:30:00", "2026-11-27T09:00:00"):
        AuditTrail(store, clock=lambda at=at: datetime.fromisoformat(at).replace(tzinfo=UTC)
                   ).append(operator="op", action=AuditAction.OUTCOME, detail=at)
    store.close()
    options = ["--db", str(db), "--credentials", str(tmp_path / "c.toml"), "--format", "jsonl"]
    capsys.readouterr()
    assert main(["audit", "export", *options, "--since", "2026-11-27T10:30+02:00"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["detail"] for line in lines] == ["2026-11-27T08:30:00", "2026-11-27T09:00:00"]
    assert main(["audit", "export", *options, "--since", "2026-11-27T10:30"]) == 2
    error = capsys.readouterr().err
    assert "no zone" in error and "Z" in error and "+02:00" in error
    assert main(["audit", "export", *options, "--since", "yesterday"]) == 2


def test_default_checkpoint_folder_is_per_database(tmp_path: Path) -> None:
    from services.checkpoints import default_checkpoint_dir
    credentials = tmp_path / "credentials.toml"
    one = default_checkpoint_dir(credentials, tmp_path / "a" / "recon.db")
    two = default_checkpoint_dir(credentials, tmp_path / "b" / "recon.db")
    assert one.parent == two.parent == tmp_path / "checkpoints" and one != two
    assert os.path.commonpath([one, credentials.parent]) == str(tmp_path)


async def test_console_verify_reports_a_cut_tail_against_the_checkpoint(tmp_path: Path) -> None:
    from console.screens.audit import AuditScreen
    from tests.console_harness import app_for, demo, merchants_loaded, wait_until

    environment = demo(tmp_path)
    workspace = environment.workspace
    assert workspace.write_checkpoint() is not None
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen))
        chain = app.screen.query_one("#chain")
        await wait_until(pilot, lambda: "verified" in str(chain.render()))
        assert "against checkpoint checkpoint-" in str(chain.render())
        workspace.store.conn.execute("DROP TRIGGER audit_no_delete")
        workspace.store.conn.execute("DELETE FROM audit WHERE seq = ?",
                                     [workspace.audit.size()])
        await pilot.press("v")
        await wait_until(pilot, lambda: "BROKEN" in str(chain.render()))
        text = str(chain.render())
        assert "cut from the end" in text and "checked against checkpoint" in text


def test_an_unwritable_checkpoint_folder_is_one_line(setup: Setup,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    blocker = setup.checkpoints.parent / "a-file"
    blocker.write_text("not a folder")
    options = [*setup.options()[:-1], str(blocker / "checkpoints")]
    capsys.readouterr()
    assert main(["audit", "checkpoint", *options]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "cannot write the checkpoint" in error
