"""Issue 8, holes 1 and 7, through the real command line against the emulator over loopback:
a revoked consent id stays revoked whatever is imported later, and a consent import stores all
of its files or nothing. Each test ends by asking Square (the emulator) what became of the
merchant's orders: not candidates in `queue`, not completed by `complete`."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlite_utils import Database

from console.cli import main
from services.demo import consent_for
from services.emulator import SeedConfig
from services.store import migrations
from tests.conftest import Emulator, LoopbackServer, make_emulator

pytestmark = pytest.mark.loopback


@dataclass
class Cli:
    """`recon-console` run in-process with its own database, credentials and emulator."""

    tmp_path: Path
    emulator: Emulator
    server: LoopbackServer
    capsys: pytest.CaptureFixture[str]
    credentials: Path
    db: Path
    runs: list[tuple[list[str], int, str]] = field(default_factory=list)

    def run(self, *args: str) -> tuple[int, str, list[str]]:
        """Exit code, stdout, and the stderr lines of one command."""
        self.capsys.readouterr()
        code = main([*args, "--db", str(self.db), "--credentials", str(self.credentials),
                     "--square-base-url", self.server.base_url, "--operator", "tester"])
        out, errors = self.capsys.readouterr()
        self.runs.append((list(args), code, errors))
        return code, out, errors.splitlines()

    def merchant(self, index: int) -> str:
        return self.emulator.merchants[index].merchant.id

    def write(self, name: str, documents: Any) -> Path:
        path = self.tmp_path / name
        path.write_text(json.dumps(documents))
        return path

    def consent(self, index: int, **changes: Any) -> dict[str, Any]:
        document = consent_for(self.emulator.merchants[index], datetime.now(UTC))
        document.update(changes)
        return document

    def consents(self) -> dict[str, dict[str, Any]]:
        code, out, _ = self.run("consent", "list", "--json")
        assert code == 0
        return {row["consent_id"]: row for row in json.loads(out)["consents"]}

    def candidates(self) -> dict[str, int]:
        """Eligible orders per merchant, as `queue` finds them in Square right now."""
        code, out, errors = self.run("queue", "--json")
        assert code == 0, errors
        counts: dict[str, int] = {}
        for order in json.loads(out)["orders"]:
            if order["eligible"]:
                counts[order["merchant_id"]] = counts.get(order["merchant_id"], 0) + 1
        return counts

    def completed_in_square(self, merchant_id: str) -> set[str]:
        return {o.id for o in self.emulator.square.orders.values()
                if o.merchant_id == merchant_id and o.state == "COMPLETED"}

    def complete_all(self) -> dict[str, set[str]]:
        """`complete --all-merchants --yes`; the orders Square shows newly COMPLETED, per
        merchant."""
        before = {i: self.completed_in_square(self.merchant(i))
                  for i in range(len(self.emulator.merchants))}
        code, out, errors = self.run("complete", "--all-merchants", "--yes", "--json")
        assert code == 0, errors
        newly = {self.merchant(i): self.completed_in_square(self.merchant(i)) - before[i]
                 for i in range(len(self.emulator.merchants))}
        reported = {r["order_id"] for r in json.loads(out)["results"]
                    if r["outcome"] == "completed"}
        assert reported == set().union(*newly.values()), "the run and Square disagree"
        return newly

    def audit_actions(self) -> list[str]:
        code, out, _ = self.run("audit", "export", "--format", "jsonl")
        assert code == 0
        return [json.loads(line)["action"] for line in out.splitlines()]


def _credentials(path: Path, emulator: Emulator, indexes: list[int]) -> Path:
    path.write_text("".join(f'[merchants.{emulator.merchants[i].merchant.id}]\n'
                            f'access_token = "{emulator.token(i)}"\n' for i in indexes))
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=12))
    credentials = _credentials(tmp_path / "credentials.toml", emulator, [0, 1])
    with LoopbackServer(emulator) as server:
        yield Cli(tmp_path, emulator, server, capsys, credentials, tmp_path / "recon.db")


def _one_error(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, lines
    return errors[0]


# ---------------------------------------------------------------------- hole 1


def test_hole1_revoked_consent_stays_revoked_after_reimport(cli: Cli) -> None:
    m0, m1 = cli.merchant(0), cli.merchant(1)
    first = cli.consent(0)
    consent_id = first["consent_id"]
    original = cli.write("consents.json", [first])
    assert cli.run("consent", "import", str(original))[0] == 0
    assert cli.candidates().get(m0), "the merchant had candidates before the revoke"
    code, _, lines = cli.run("consent", "revoke", consent_id, "--by", "Owner",
                             "--reason", "Handling orders in-house again")
    assert code == 0 and f"{consent_id}: revoked from" in lines[0]
    audit_before = cli.audit_actions()

    # The same file again, beside a good file for another merchant: one line, nothing stored.
    other = cli.write("other.json", cli.consent(1))
    code, _, lines = cli.run("consent", "import", str(original), str(other))
    assert code == 2
    line = _one_error(lines)
    assert consent_id in line and "revoked" in line and "new consent_id" in line
    assert set(cli.consents()) == {consent_id}, "the good file was stored anyway"
    assert cli.consents()[consent_id]["status"] == "revoked"
    assert cli.consents()[consent_id]["version"] == 2
    assert cli.audit_actions() == audit_before

    # And Square sees nothing done for that merchant.
    assert not cli.candidates().get(m0)
    completed = cli.complete_all()
    assert completed[m0] == set()
    assert completed[m1] == set()  # its consent was refused with the rest

    # Reinstating takes a new record with a new id; the old one stays revoked.
    renewal = cli.write("renewal.json", cli.consent(0, consent_id=str(uuid.uuid4())))
    assert cli.run("consent", "import", str(renewal))[0] == 0
    assert cli.consents()[consent_id]["status"] == "revoked"
    assert cli.candidates().get(m0)


def test_hole1_revoked_id_stays_revoked_in_a_database_where_a_later_version_lost_it(
        cli: Cli) -> None:
    """Today's main let `consent import` store a version without `revocation` after a revoke.
    Opening such a database, the id is still revoked: in `consent list`, in classification,
    and for `complete`."""
    m0 = cli.merchant(0)
    document = cli.consent(0)
    consent_id = document["consent_id"]
    revoked = {**document, "revocation": {"revoked_at": "2026-01-01T00:00:00Z",
                                          "revoked_by": "Owner", "reason": "Closing"}}
    db = Database(cli.db)
    migrations.apply(db, stop_before="m002_consent_revocations")  # the schema of today's main
    for version, doc in enumerate([document, revoked, document], start=1):
        db.execute("INSERT INTO consents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [consent_id, version, m0, orjson.dumps(doc).decode(), f"{version:064x}",
                    "2026-01-01T00:00:00Z", "tester", "old"])
    db.conn.commit()
    db.close()

    rows = cli.consents()
    assert rows[consent_id]["status"] == "revoked" and rows[consent_id]["version"] == 3
    assert not cli.candidates().get(m0)
    assert cli.complete_all()[m0] == set()
    code, _, lines = cli.run("consent", "import", str(cli.write("again.json", document)))
    assert code == 2 and consent_id in _one_error(lines)


def test_hole1_future_revoked_at_does_not_block_revoke_now(cli: Cli) -> None:
    m0 = cli.merchant(0)
    later = datetime.now(UTC) + timedelta(days=30)
    document = cli.consent(0, revocation={
        "revoked_at": later.isoformat().replace("+00:00", "Z"), "revoked_by": "Owner",
        "reason": "Moving to another provider next month"})
    consent_id = document["consent_id"]
    assert cli.run("consent", "import", str(cli.write("c.json", document)))[0] == 0
    assert cli.consents()[consent_id]["status"] == "active"
    assert cli.candidates().get(m0)

    before = datetime.now(UTC)
    code, _, lines = cli.run("consent", "revoke", consent_id, "--by", "Owner",
                             "--reason", "Stop now")
    assert code == 0, lines
    row = cli.consents()[consent_id]
    assert row["status"] == "revoked"
    revoked_at = datetime.fromisoformat(row["revoked_at"])
    assert before <= revoked_at <= datetime.now(UTC)
    assert cli.audit_actions()[-1] == "consent_revoked"
    assert not cli.candidates().get(m0)
    assert cli.complete_all()[m0] == set()


def test_hole1_revoke_names_the_merchants_other_active_consents(cli: Cli) -> None:
    m0 = cli.merchant(0)
    original = cli.consent(0)
    renewal = cli.consent(0, consent_id=str(uuid.uuid4()))
    assert cli.run("consent", "import", str(cli.write("c.json", [original, renewal])))[0] == 0
    code, _, lines = cli.run("consent", "revoke", original["consent_id"], "--by", "Owner",
                             "--reason", "Replaced by the renewal")
    assert code == 0
    warning = [line for line in lines if "stays eligible" in line]
    assert len(warning) == 1, lines
    assert renewal["consent_id"] in warning[0] and original["consent_id"] not in warning[0]
    assert f"--all-for-merchant {m0}" in warning[0]
    # What it says is true: the merchant is still eligible under the renewal.
    assert cli.candidates().get(m0)


def test_hole1_revoke_all_for_merchant_revokes_every_consent_in_one_go(cli: Cli) -> None:
    m0, m1 = cli.merchant(0), cli.merchant(1)
    original = cli.consent(0)
    renewal = cli.consent(0, consent_id=str(uuid.uuid4()))
    future = cli.consent(0, consent_id=str(uuid.uuid4()),
                         effective_from=(datetime.now(UTC) + timedelta(days=3)).isoformat())
    keep = cli.consent(1)
    path = cli.write("c.json", [original, renewal, future, keep])
    assert cli.run("consent", "import", str(path))[0] == 0
    # Exactly one of CONSENT_ID and --all-for-merchant.
    assert cli.run("consent", "revoke", "--by", "O", "--reason", "r")[0] == 2
    assert cli.run("consent", "revoke", original["consent_id"], "--all-for-merchant", m0,
                   "--by", "O", "--reason", "r")[0] == 2

    code, _, lines = cli.run("consent", "revoke", "--all-for-merchant", m0, "--by", "Owner",
                             "--reason", "Closing the shop")
    assert code == 0, lines
    assert not any("stays eligible" in line for line in lines)
    rows = cli.consents()
    for document in (original, renewal, future):
        assert rows[document["consent_id"]]["status"] == "revoked"
    assert rows[keep["consent_id"]]["status"] == "active"
    assert cli.audit_actions()[-3:] == ["consent_revoked"] * 3
    # Nothing left to revoke: a usage error, no new audit entry.
    assert cli.run("consent", "revoke", "--all-for-merchant", m0, "--by", "Owner",
                   "--reason", "again")[0] == 2
    assert cli.audit_actions().count("consent_revoked") == 3

    completed = cli.complete_all()
    assert completed[m0] == set()
    assert completed[m1], "the other merchant's orders were completed as usual"


# ---------------------------------------------------------------------- hole 7


def test_hole7_consent_import_is_all_or_nothing(cli: Cli) -> None:
    m0 = cli.merchant(0)
    good = cli.write("good.json", cli.consent(0))
    bad_schema = cli.consent(1, consent_id=str(uuid.uuid4()))
    bad_schema["grantor"] = {**bad_schema["grantor"], "email": "not an address"}
    bad_dates = cli.consent(1, consent_id=str(uuid.uuid4()),
                            expires_at=bad_schema["effective_from"])
    bad = cli.write("bad.json", [cli.consent(1), bad_schema, bad_dates])
    code, _, lines = cli.run("consent", "import", str(good), str(bad))
    assert code == 2
    assert len(lines) == 2 and all(line.startswith("error:") for line in lines), lines
    assert f"{bad}: record 1: $.grantor.email" in lines[0]
    assert f"{bad}: record 2: $.expires_at" in lines[1]
    assert cli.consents() == {}
    assert cli.audit_actions() == []
    assert not cli.candidates().get(m0)
    assert cli.complete_all()[m0] == set()

    # Duplicate ids with different content across files: refused too.
    changed = {**cli.consent(0), "expires_at": "2099-01-01T00:00:00Z"}
    code, _, lines = cli.run("consent", "import", str(good),
                             str(cli.write("changed.json", changed)))
    assert code == 2 and "also in" in _one_error(lines)
    assert cli.consents() == {}


@pytest.mark.parametrize("expires", ["same", "before"])
def test_hole7_expires_at_not_after_effective_from_is_refused(cli: Cli, expires: str) -> None:
    m0 = cli.merchant(0)
    document = cli.consent(0)
    effective = datetime.fromisoformat(document["effective_from"])
    moment = effective if expires == "same" else effective - timedelta(days=1)
    document["expires_at"] = moment.isoformat().replace("+00:00", "Z")
    path = cli.write("c.json", document)
    code, _, lines = cli.run("consent", "import", str(path))
    assert code == 2
    line = _one_error(lines)
    assert f"{path}: $.expires_at:" in line and "not after effective_from" in line
    assert cli.consents() == {}
    assert not cli.candidates().get(m0)


def test_hole7_evidence_captured_in_the_future_is_refused(cli: Cli) -> None:
    m0 = cli.merchant(0)
    document = cli.consent(0)
    document["evidence"] = {**document["evidence"], "captured_at": (
        datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")}
    path = cli.write("c.json", [document])
    code, _, lines = cli.run("consent", "import", str(path))
    assert code == 2
    line = _one_error(lines)
    assert f"{path}: record 0: $.evidence.captured_at:" in line and "future" in line
    assert cli.consents() == {}
    assert not cli.candidates().get(m0)
    assert cli.complete_all()[m0] == set()


def test_hole7_merchant_without_credentials_is_a_warning(cli: Cli) -> None:
    m0, m1 = cli.merchant(0), cli.merchant(1)
    cli.credentials = _credentials(cli.tmp_path / "only-m1.toml", cli.emulator, [1])
    path = cli.write("c.json", [cli.consent(0), cli.consent(1)])
    code, _, lines = cli.run("consent", "import", str(path))
    assert code == 0
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and m0 in warnings[0] and m1 not in warnings[0], lines
    assert len(cli.consents()) == 2  # a warning, not a refusal

    # No credentials file at all: one warning that merchants could not be checked.
    cli.credentials = cli.tmp_path / "missing.toml"
    renewal = cli.write("r.json", [cli.consent(0, consent_id=str(uuid.uuid4())),
                                   cli.consent(1, consent_id=str(uuid.uuid4()))])
    code, _, lines = cli.run("consent", "import", str(renewal))
    assert code == 0
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "could not check" in warnings[0], lines
    assert len(cli.consents()) == 4


def test_hole1_a_consent_id_never_moves_to_another_merchant(cli: Cli) -> None:
    """A file that re-files merchant 0's consent id under merchant 1 would make merchant 1
    eligible on merchant 0's word: refused, nothing stored, merchant 1 completes nothing."""
    m1 = cli.merchant(1)
    first = cli.consent(0)
    assert cli.run("consent", "import", str(cli.write("a.json", first)))[0] == 0
    moved = dict(cli.consent(1), consent_id=first["consent_id"])
    code, _, lines = cli.run("consent", "import", str(cli.write("moved.json", moved)))
    assert code == 2
    line = _one_error(lines)
    assert first["consent_id"] in line and "belongs to merchant" in line
    assert cli.consents()[first["consent_id"]]["merchant_id"] == cli.merchant(0)
    assert not cli.candidates().get(m1)
    assert cli.complete_all()[m1] == set()


@pytest.mark.parametrize("blank", [["--by", "  "], ["--reason", " \t"]])
def test_revoke_refuses_a_blank_by_or_reason(cli: Cli, blank: list[str]) -> None:
    consent = cli.consent(0)
    assert cli.run("consent", "import", str(cli.write("c.json", [consent])))[0] == 0
    options = {"--by": "Owner", "--reason": "asked by phone"}
    options[blank[0]] = blank[1]
    code, _, _ = cli.run("consent", "revoke", consent["consent_id"],
                         *[x for pair in options.items() for x in pair])
    assert code == 2
    assert "consent_revoked" not in cli.audit_actions()
