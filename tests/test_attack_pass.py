"""Defects found by the attacker's pass (safety/attack-pass): each test failed before its fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from console.cli import main


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECON_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


# A user name or password in the base URL: aiohttp refused to combine it with the bearer
# token (a traceback), and `Square: ...` had already printed the password on stderr.
@pytest.mark.parametrize("url", ["http://user:SECRETPW@127.0.0.1:8765",
                                 "https://tok:SECRETPW@connect.squareup.com",
                                 "https://SECRETPW@connect.squareup.com"])
def test_base_url_with_credentials_is_refused_without_echoing_them(
        tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "queue", "--db", str(tmp_path / "r.db"),
                         "--square-base-url", url)
    assert code == 2 and len(err) == 1, err
    assert "SECRETPW" not in out + "\n".join(err)
    assert "user name or password" in err[0]


# A consent "file" that is a directory, nested past Python's recursion limit, or far larger
# than any consent file: each was a traceback (or read without bound); now one line, exit 2.
def test_unreadable_or_hostile_consent_files_get_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "r.db")
    (tmp_path / "a_dir.json").mkdir()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    huge = tmp_path / "huge.json"
    with huge.open("w") as handle:  # sparse: 100 MiB of nothing on disk
        handle.truncate(100 * 1024 * 1024)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo, 0o600)  # open() would wait for a writer forever
    for path, says in ((tmp_path / "a_dir.json", "directory"), (deep, "nested"),
                       (huge, "larger"), (fifo, "not a regular file"),
                       (Path("/dev/zero"), "not a regular file")):
        code, _, err = run(capsys, "consent", "import", "--db", db, str(path))
        assert code == 2 and len(err) == 1, (path, err)
        assert str(path) in err[0] and says in err[0], err


# `--max-orders -5` sliced the candidates to "all but the last five": a limit that let a
# batch grow. A count below one is a usage error now, before anything is read or sent.
@pytest.mark.parametrize("value", ["-5", "0", "-1"])
def test_max_orders_below_one_is_a_usage_error(
        tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "complete", "--db", str(tmp_path / "r.db"),
                         "--square-base-url", "http://127.0.0.1:9", "--merchant", "M1",
                         "--max-orders", value, "--dry-run")
    assert code == 2 and len(err) == 1 and out == "", err
    assert "--max-orders" in err[0]



# The emulator's own flags: out-of-range values ended in pydantic's or socket's traceback.
@pytest.mark.parametrize(("flag", "value"), [("--fault-rate", "5"), ("--latency-ms", "-100"),
                                             ("--rate-limit", "-1"), ("--port", "99999")])
def test_emulator_flags_out_of_range_get_one_line(
        flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "emulator", "serve", flag, value)
    assert code == 2, err
    assert len(err) == 1 and flag in err[0], err


# `--db` at a file that is not ours: a text file (say, the credentials file by a slip) was a
# sqlite3 traceback; another application's SQLite database got our 40 tables, triggers and
# WAL mode written into it. Both are refused in one line, and the file is left as it was.
def test_a_database_that_is_not_ours_is_refused_and_left_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3
    text = tmp_path / "notes.txt"
    text.write_text("[merchants.M1]\naccess_token = \"x\"\n")
    foreign = tmp_path / "shop.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    before = foreign.read_bytes()
    for path, says in ((text, "not a SQLite database"), (foreign, "another application")):
        code, out, err = run(capsys, "consent", "list", "--db", str(path))
        assert code == 2 and len(err) == 1 and out == "", err
        assert str(path) in err[0] and says in err[0], err
    assert text.read_text().startswith("[merchants.M1]")
    assert foreign.read_bytes() == before
    assert not (tmp_path / "shop.db-wal").exists()


def test_a_new_or_empty_database_file_is_still_ours(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import DATA
    empty = tmp_path / "empty.db"
    empty.touch(mode=0o600)
    new = tmp_path / "new.db"
    # A new one is made by a command that records (a reading one refuses a missing file).
    code, _, err = run(capsys, "consent", "import", "--db", str(new),
                       str(DATA / "consent" / "valid" / "minimal.json"))
    assert code == 0, err
    for path in (empty, new):
        code, _, err = run(capsys, "consent", "list", "--db", str(path))
        assert code == 0, err
        code, _, err = run(capsys, "consent", "list", "--db", str(path))  # and again, migrated
        assert code == 0, err


# A full disk (seen on a 3 MB tmpfs: `queue`'s refresh, then `complete`) ended in a sqlite3
# traceback. Whatever command the database refuses a write to now says so in one line.
def test_a_database_that_refuses_writes_gets_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3
    from collections.abc import Iterator
    from contextlib import contextmanager

    from services.storage.sqlite import SQLiteStore
    from tests.conftest import DATA
    db = str(tmp_path / "r.db")
    SQLiteStore(Path(db)).close()
    assert run(capsys, "consent", "list", "--db", db)[0] == 0

    @contextmanager
    def full(self: SQLiteStore) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        finally:
            self.conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(SQLiteStore, "transaction", full)
    code, out, err = run(capsys, "consent", "import", "--db", db,
                         str(DATA / "consent" / "valid" / "minimal.json"))
    assert code == 1 and len(err) == 1, err
    assert "database or disk is full" in err[0] and "Traceback" not in err[0]
    monkeypatch.undo()
    code, out, _ = run(capsys, "consent", "list", "--db", db, "--json")
    assert code == 0 and '"consent_id"' not in out  # nothing half-stored


# The database refused the intents (a full disk): nothing was sent, every order "skipped
# DATABASE_UNWRITABLE", and `complete` exited 0, as if a script's batch had simply run.
@pytest.mark.loopback
def test_complete_whose_intents_the_database_refused_exits_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from services.completion.journal import IntentJournal
    from services.demo import write_demo_files
    from services.emulator import SeedConfig
    from tests.conftest import LoopbackServer, make_emulator
    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=5))
    write_demo_files(tmp_path, emulator.merchants)
    with LoopbackServer(emulator) as server:
        options = ["--db", str(tmp_path / "r.db"), "--square-base-url", server.base_url,
                   "--credentials", str(tmp_path / "credentials.toml"), "--operator", "eve"]
        assert run(capsys, "consent", "import", str(tmp_path / "consents.json"),
                   *options)[0] == 0
        assert run(capsys, "queue", *options)[0] == 0

        async def refused(self: IntentJournal, run: object, intents: object) -> bool:
            self.broken = "the database refused a write (database or disk is full)"
            return False

        monkeypatch.setattr(IntentJournal, "commit_intents", refused)
        code, out, err = run(capsys, "complete", "--all-merchants", "--yes", "--json",
                             *options)
    import json
    results = json.loads(out)["results"]
    assert results and {r["reason"] for r in results} == {"DATABASE_UNWRITABLE"}
    assert code == 1, err
    assert any("database" in line and "recover" in line for line in err), err


# RFC 3339 allows 9999-12-31T23:59:59-12:00, which is past year 9999 in UTC: a revocation at
# that time was an OverflowError traceback mid-import. Such a time is refused with the field.
@pytest.mark.parametrize(("field", "value"), [
    ("revocation", {"revoked_at": "9999-12-31T23:59:59-12:00", "revoked_by": "x",
                    "reason": "y"}),
    ("expires_at", "9999-12-31T23:59:59-12:00"),
    ("effective_from", "0001-01-01T00:00:00+12:00"),
])
def test_a_consent_time_beyond_utc_is_refused_by_field(
        tmp_path: Path, field: str, value: object, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tests.conftest import DATA
    document = json.loads((DATA / "consent" / "valid" / "minimal.json").read_text())
    document[field] = value
    path = tmp_path / "c.json"
    path.write_text(json.dumps(document))
    db = str(tmp_path / "r.db")
    code, _, err = run(capsys, "consent", "import", "--db", db, str(path))
    assert code == 2 and len(err) == 1, err
    assert field in err[0] and "range" in err[0], err
    code, out, _ = run(capsys, "consent", "list", "--db", db, "--json")
    assert code == 0 and document["consent_id"] not in out


# `consent revoke --reason` longer than the record's 1,000 characters (an e-mail pasted in),
# or `--by` over 200: a pydantic traceback, and the consent stayed active without a word.
@pytest.mark.parametrize(("by", "reason", "says"), [("ana", "r" * 1001, "reason"),
                                                    ("b" * 201, "asked by phone", "by")],
                         ids=["reason", "by"])
def test_revoke_with_an_overlong_reason_or_name_says_so_in_one_line(
        tmp_path: Path, by: str, reason: str, says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tests.conftest import DATA
    path = DATA / "consent" / "valid" / "minimal.json"
    consent_id = json.loads(path.read_text())["consent_id"]
    db = str(tmp_path / "r.db")
    assert run(capsys, "consent", "import", "--db", db, str(path))[0] == 0
    code, _, err = run(capsys, "consent", "revoke", consent_id, "--by", by, "--reason", reason,
                       "--db", db)
    assert code == 2 and len(err) == 1, err
    assert f"--{says}" in err[0] and "at most" in err[0], err
    code, _, err = run(capsys, "consent", "revoke", consent_id, "--by", "ana", "--reason",
                       "asked by phone", "--db", db)
    assert code == 0, err


# `--json` (consent list, queue, complete...) wrote outside text's C1 controls (U+009B is
# CSI) and bidi overrides raw to the terminal; the audit's JSON Lines already escaped them.
@pytest.mark.parametrize("stream", [False, True])
def test_json_output_escapes_what_a_terminal_would_act_on(
        stream: bool, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from console.output import print_json, print_json_stream
    hostile = "Tea\x9b2J\x1b]52;c;x\x07 \u202egnp.exe\u202c \u2066x\u2069\u200f\x7f\u2028."
    if stream:
        print_json_stream("orders", [{"name": hostile}], {"note": hostile})
    else:
        print_json({"name": hostile, "nested": [{"name": hostile}]})
    out = capsys.readouterr().out
    for char in "\x9b\x1b\x07\u202e\u202c\u2066\u2069\u200f\x7f\u2028":
        assert char not in out, repr(char)
    document = json.loads(out)
    assert (document["orders"][0]["name"] if stream else document["nested"][0]["name"]) \
        == hostile  # every character kept exactly


# `--credentials` at a directory (0700) was an IsADirectoryError traceback; at a FIFO the
# command hung on open(). Neither is a credentials file: one line, nothing opened.
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_credentials_that_are_not_a_regular_file_get_one_line(tmp_path: Path, kind: str) -> None:
    from services.credentials import load_credentials
    from services.errors import CredentialsError
    path = tmp_path / "creds"
    if kind == "directory":
        path.mkdir(mode=0o700)
    else:
        os.mkfifo(path, 0o600)
    with pytest.raises(CredentialsError, match="not a regular file"):
        load_credentials(path)


# `complete --merchant A --order <an order of merchant B>` (or a mistyped id) said only
# "Nothing eligible to complete." and exited 0: the operator never learnt the id was wrong.
@pytest.mark.loopback
def test_an_order_id_outside_the_chosen_merchants_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.demo import write_demo_files
    from services.emulator import SeedConfig
    from tests.conftest import LoopbackServer, make_emulator
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=5))
    write_demo_files(tmp_path, emulator.merchants)
    first, second = (m.merchant.id for m in emulator.merchants)
    with LoopbackServer(emulator) as server:
        options = ["--db", str(tmp_path / "r.db"), "--square-base-url", server.base_url,
                   "--credentials", str(tmp_path / "credentials.toml"), "--operator", "eve"]
        assert run(capsys, "consent", "import", str(tmp_path / "consents.json"),
                   *options)[0] == 0
        import json
        code, out, _ = run(capsys, "queue", "--json", "--include-ineligible", *options)
        theirs = next(o["order_id"] for o in json.loads(out)["orders"]
                      if o["merchant_id"] == second)
        for wrong in (theirs, "NO-SUCH-ORDER"):
            code, out, err = run(capsys, "complete", "--merchant", first, "--order", wrong,
                                 "--dry-run", *options)
            assert code == 2, err
            assert any(wrong in line and "not" in line for line in err), err
