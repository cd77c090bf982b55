"""`recon-console remind ...` against the emulator over loopback and aiosmtpd on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console.cli import main
from services.demo import write_demo_files
from services.reminders.local_server import LocalSmtpServer
from tests.conftest import LoopbackServer


@pytest.fixture
def env(tmp_path: Path, loopback: LoopbackServer, monkeypatch: pytest.MonkeyPatch
        ) -> Iterator[dict[str, Any]]:
    write_demo_files(tmp_path, loopback.emulator.merchants)   # credentials; no consent used
    with LocalSmtpServer() as mail:
        values = {"RECON_DB": str(tmp_path / "recon.db"),
                  "RECON_SQUARE_BASE_URL": loopback.base_url,
                  "RECON_CREDENTIALS": str(tmp_path / "credentials.toml"),
                  "RECON_SMTP_URL": mail.url(), "RECON_OPERATOR": "cli-test",
                  # Any hour: this test must not depend on when it runs.
                  "RECON_REMINDER_BUSINESS_HOURS": "00:00-24:00"}
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        yield {"mail": mail, "merchants": [m.merchant.id for m in loopback.emulator.merchants],
               "dir": tmp_path}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    document = json.loads(captured.out) if captured.out.strip().startswith("{") else None
    return code, document, captured.err


def test_dry_run_then_send_then_not_due(env: dict[str, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, document, _ = run(capsys, "remind", "--dry-run", "--json")
    assert code == 0
    rows = document["reminders"]
    assert {r["merchant_id"] for r in rows} == set(env["merchants"])
    assert {r["status"] for r in rows} == {"dry_run"}
    assert set(rows[0]) >= {"merchant_id", "kind", "to", "orders", "status", "reason",
                            "message_id"}
    assert all(r["kind"] == "no_consent" and r["to"] and r["orders"] > 0 for r in rows)
    assert env["mail"].mailbox.messages == []

    code, _, stderr = run(capsys, "remind", "--json")          # stdin is not a terminal
    assert code == 2 and "--yes" in stderr and env["mail"].mailbox.messages == []

    code, document, _ = run(capsys, "remind", "--yes", "--json")
    assert code == 0
    assert {r["status"] for r in document["reminders"]} == {"sent"}
    received = {m.message_id for m in env["mail"].mailbox.messages}
    assert received == {r["message_id"] for r in document["reminders"]}

    code, document, _ = run(capsys, "remind", "send", "--yes", "--json")
    assert code == 0
    assert {(r["status"], r["reason"]) for r in document["reminders"]} == {
        ("skipped", "NOT_DUE")}
    assert len(env["mail"].mailbox.messages) == 3

    code, document, _ = run(capsys, "remind", "history", "--json")
    assert code == 0 and len(document["reminders"]) == 3
    code, document, _ = run(capsys, "remind", "history", "--merchant", env["merchants"][0],
                            "--json")
    assert [r["merchant_id"] for r in document["reminders"]] == [env["merchants"][0]]
    assert document["reminders"][0]["status"] == "sent"


def test_opt_out_and_in(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    merchant = env["merchants"][1]
    run(capsys, "queue", "--json")                 # learn the merchants
    code, _, stderr = run(capsys, "remind", "opt-out", merchant, "--by", "Ana", "--reason",
                          "asked by phone")
    assert code == 0 and "opted out" in stderr
    code, _, stderr = run(capsys, "remind", "opt-out", merchant, "--by", "Ana", "--reason", "x")
    assert code == 2 and "already opted out" in stderr
    code, document, _ = run(capsys, "remind", "--dry-run", "--json", "--merchant", merchant)
    assert [(r["status"], r["reason"]) for r in document["reminders"]] == [
        ("skipped", "OPTED_OUT")]
    code, _, _ = run(capsys, "remind", "opt-in", merchant, "--by", "Ana", "--reason", "back")
    assert code == 0
    code, document, _ = run(capsys, "remind", "--dry-run", "--json", "--merchant", merchant)
    assert document["reminders"][0]["status"] == "dry_run"


def test_usage_errors(env: dict[str, Any], capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, stderr = run(capsys, "remind", "--dry-run", "--merchant", "NOPE")
    assert code == 2 and "Unknown merchant NOPE" in stderr
    monkeypatch.delenv("RECON_SMTP_URL")
    code, _, stderr = run(capsys, "remind", "--yes")
    assert code == 2 and "RECON_SMTP_URL is not set" in stderr
    assert [line for line in stderr.splitlines() if not line.startswith("Square: ")] == [
        line for line in stderr.splitlines() if line.startswith("error: ")]     # one line
    monkeypatch.setenv("RECON_SMTP_URL", "smtp://recon@127.0.0.1:25")
    code, _, stderr = run(capsys, "remind", "--yes")
    assert code == 2 and "no [smtp] password" in stderr


def test_password_comes_from_the_credentials_file(env: dict[str, Any],
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = env["dir"] / "credentials.toml"
    credentials.write_text(credentials.read_text() + '\n[smtp]\npassword = "s3cret-Pw"\n')
    with LocalSmtpServer(auth=("recon", "s3cret-Pw")) as mail:
        monkeypatch.setenv("RECON_SMTP_URL", mail.url("recon"))
        code, document, stderr = run(capsys, "remind", "--yes", "--json")
        assert code == 0, stderr
        assert len(mail.mailbox.messages) == 3
    database = Path(env["dir"] / "recon.db").read_bytes()
    assert b"s3cret-Pw" not in database and "s3cret-Pw" not in json.dumps(document)


def test_unreachable_server_is_one_clear_line(env: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    idle = LocalSmtpServer()                      # never started
    monkeypatch.setenv("RECON_SMTP_URL", idle.url())
    code, _, stderr = run(capsys, "remind", "--yes")
    assert code == 1
    assert f"cannot reach SMTP server smtp://127.0.0.1:{idle.port}" in stderr
