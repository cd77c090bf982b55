"""`recon-console demo --team`: the demo on a throwaway PostgreSQL cluster, and the one command
that opens a second console on it as another operator; all of it deleted on exit."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import console.app as app_module
from console.cli import main
from services.postgres_cluster import PostgresUnavailable
from services.settings import ReconSettings
from services.storage import open_store
from services.team_demo import SECOND_OPERATOR, team_demo
from tests import pg_support

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = str(Path(sys.executable).with_name("recon-console"))


def second_console(command: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the printed command, with a headless subcommand instead of the console."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECON_")}
    return subprocess.run(["bash", "-c", f"{command} {shlex.join(argv)}"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def port_open(base_url: str) -> bool:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def test_a_second_operator_works_the_same_database_and_square() -> None:
    try:
        demo_context = team_demo(operator="Ana")
        demo = demo_context.__enter__()
    except PostgresUnavailable as error:
        pg_support.postgres_unavailable(str(error))
    try:
        command = demo.second_console_command(PROGRAM)
        assert demo.cluster.password and demo.cluster.password not in command
        assert f"RECON_OPERATOR={SECOND_OPERATOR}" in command

        listed = second_console(command, "consent", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert f"Database: {demo.url}" in listed.stderr
        consents = json.loads(listed.stdout)["consents"]
        assert len(consents) >= 9  # the demo's consents, in every state, on PostgreSQL

        queue = second_console(command, "queue", "--json")
        assert queue.returncode in (0, 1), queue.stderr  # some demo tokens are expired
        assert f"Square: {demo.base_url}" in queue.stderr
        assert queue.stdout.strip().startswith("{"), queue.stderr[-3000:]  # its document
        assert json.loads(queue.stdout)  # the emulator answered over loopback

        # Reminders go to the demo's mail server, as in `demo`, from either console; each
        # message lands in the demo's mailbox folder (not beside the database: it is a URL).
        mailbox = demo.mail["demo_mailbox"]
        assert demo.settings("Ana").demo_mailbox == mailbox
        assert demo.settings("Ana").smtp_url == demo.mail["smtp_url"]
        reminded = second_console(command, "remind", "--yes", "--json")
        assert reminded.returncode == 0, reminded.stderr
        sent = [r for r in json.loads(reminded.stdout)["reminders"] if r["status"] == "sent"]
        assert sent and len(list(mailbox.glob("*.eml"))) == len(sent)

        active = next(row for row in consents if row["status"] == "active")
        revoked = second_console(command, "consent", "revoke", active["consent_id"],
                                 "--by", "Owner", "--reason", "asked by phone")
        assert revoked.returncode == 0, revoked.stderr
        # The first operator's store sees the second operator's revocation, under their name.
        store = open_store(demo.settings("Ana").db)
        try:
            entries = list(store.audit_entries({"action": "consent_revoked"}, None, None,
                                               None, False))
        finally:
            store.close()
        assert [entry["operator"] for entry in entries][-1:] == [SECOND_OPERATOR]
        directory, cluster_dir, base_url = demo.directory, demo.cluster.directory, demo.base_url
    finally:
        demo_context.__exit__(None, None, None)
    assert not directory.exists() and not cluster_dir.exists()
    assert not port_open(base_url)


def test_demo_team_prints_the_second_console_command_and_cleans_up(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    def console(settings: ReconSettings, read_only: bool = False) -> int:
        seen["settings"] = settings  # instead of the TUI: where would it have opened?
        seen["cluster"] = Path(str(settings.db).split("host=")[1].split("&")[0])
        seen["alive"] = seen["cluster"].exists()
        return 0

    monkeypatch.setattr(app_module, "run_console", console)
    for name in [name for name in os.environ if name.startswith("RECON_")]:
        if name != pg_support.REQUIRE_ENV:
            monkeypatch.delenv(name)
    try:
        code = main(["demo", "--team", "--operator", "Ana"])
    except PostgresUnavailable as error:  # pragma: no cover - no server on this machine
        pg_support.postgres_unavailable(str(error))
    out, err = capsys.readouterr()
    if code == 2 and "PostgreSQL" in err:
        pg_support.postgres_unavailable(err.strip())
    assert code == 0, err
    assert err.startswith("Square: local emulator (team demo")
    command = out.split("as another operator, with:\n\n  ")[1].split("\n")[0]
    assert command.startswith("RECON_DB=") and "RECON_OPERATOR=second-operator" in command
    settings = seen["settings"]
    assert settings.operator == "Ana" and str(settings.db).startswith("postgresql://")
    assert seen["alive"] and not seen["cluster"].exists()  # deleted after the console closed
