"""SIGKILL in the middle of a reminder run, then recover: every due merchant got exactly one
Message-ID, and the audit agrees with what the SMTP server received."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.audit import AuditTrail
from services.reminders import ReminderService, SmtpTarget
from services.reminders.local_server import LocalSmtpServer
from services.store import Store
from tests.reminders_support import ScriptedMailbox, fill

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


def service_for(store: Store, url: str, now: datetime, group: int = 25) -> ReminderService:
    return ReminderService(store, AuditTrail(store, lambda: now),
                           sender="Reconciliation Team <recon@ledgerline.example>",
                           consent_link="https://ledgerline.example/consent",
                           consents=dict, clock=lambda: now, operator="crash-test",
                           smtp=SmtpTarget.parse(url), backoff_s=0.001, group=group)


def child(db: str, url: str, now: str) -> None:
    """The run that gets killed: groups of 5, so some are settled and some are not."""
    store = Store(db)
    service = service_for(store, url, datetime.fromisoformat(now), group=5)
    service.send(service.plan())


def kill_mid_run(db: Path, url: str, handler: ScriptedMailbox) -> None:
    """Run `child` in a process and SIGKILL it while the server holds its 7th message."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.test_reminders_crash", str(db), url, NOW.isoformat()],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert handler.held.wait(60), "the child never reached the 7th message"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    finally:
        handler.release.set()
        if process.poll() is None:
            process.kill()


def test_sigkill_mid_run_then_recover(tmp_path: Path) -> None:
    db = tmp_path / "recon.db"
    store = Store(db)
    merchants = fill(store, 12, NOW)
    handler = ScriptedMailbox({7: "hold"})        # the 7th message: received, never answered
    with LocalSmtpServer(handler) as server:
        kill_mid_run(db, server.url(), handler)
        service = service_for(store, server.url(), NOW)
        in_doubt = service.open_rows()
        assert len(in_doubt) == 5            # the second group: intents without outcomes
        recovered = service.recover()
        assert [r.status for r in recovered] == ["sent"] * 5
        assert {r.message_id for r in recovered} == {r["message_id"] for r in in_doubt}
        # The rest of the merchants in a new run; those already reminded are not due.
        results = {r.merchant_id: r for r in service.send(service.plan())}
        assert [results[m].status for m in merchants[:10]] == ["skipped"] * 10
        assert [results[m].status for m in merchants[10:]] == ["sent"] * 2
    ids_by_merchant: dict[str, set[str]] = defaultdict(set)
    for mail in handler.messages:
        ids_by_merchant[mail.recipients[0]].add(mail.message_id)
    assert len(ids_by_merchant) == 12
    assert all(len(ids) == 1 for ids in ids_by_merchant.values())
    assert len(handler.messages) > 12          # some arrived twice: the same id both times
    sent = [e for e in service.audit.entries() if e["action"] == "reminder_sent"]
    assert sorted(e["merchant_id"] for e in sent) == merchants        # one each
    assert {e["idempotency_key"] for e in sent} == {m.message_id for m in handler.messages}
    assert service.open_rows() == [] and service.audit.verify().ok


def test_recover_command_resends_reminders_in_doubt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`recon-console recover` settles the outbox too: without SMTP set up it says so in one
    line and exits 1 (nothing lost); with it, the rows are re-sent under their own ids."""
    from console.cli import main

    db = tmp_path / "recon.db"
    store = Store(db)
    fill(store, 12, NOW)
    credentials = tmp_path / "credentials.toml"
    credentials.write_text("[merchants.M0]\naccess_token = \"emu-token-unused\"\n")
    credentials.chmod(0o600)
    handler = ScriptedMailbox({7: "hold"})
    with LocalSmtpServer(handler) as server:
        kill_mid_run(db, server.url(), handler)
        in_doubt = {r["message_id"] for r in service_for(store, server.url(), NOW).open_rows()}
        assert len(in_doubt) == 5
        common = ["recover", "--db", str(db), "--credentials", str(credentials),
                  "--square-base-url", "http://127.0.0.1:9"]
        monkeypatch.delenv("RECON_SMTP_URL", raising=False)
        capsys.readouterr()
        assert main(common) == 1
        assert "5 reminder(s) in doubt not settled" in capsys.readouterr().err
        assert len(service_for(store, server.url(), NOW).open_rows()) == 5
        received = len(handler.messages)
        monkeypatch.setenv("RECON_SMTP_URL", server.url())
        assert main(common) == 0
        assert service_for(store, server.url(), NOW).open_rows() == []
        assert {m.message_id for m in handler.messages[received:]} == in_doubt


if __name__ == "__main__":
    child(*sys.argv[1:4])
