"""`--db` / `RECON_DB` as a postgresql:// URL: never with a password in it (the process list shows
it), the password from the credentials file or libpq's own files, and never in any output."""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pydantic import ValidationError

from console.cli import main
from services import database_url
from services.database_url import check_database_url, connect_kwargs, display_url
from services.errors import CredentialsError
from services.postgres_cluster import LocalCluster, PostgresUnavailable, start_cluster
from services.settings import ReconSettings
from tests import pg_support

SECRET = "hunter2-Zq9"
WITH_PASSWORDS = [f"postgresql://recon:{SECRET}@db.example.com/recon",
                  f"postgres://recon:{SECRET}@/recon?host=/tmp",
                  f"postgresql://recon@db.example.com/recon?password={SECRET}",
                  f"postgresql://recon@db.example.com/recon?sslmode=require&password={SECRET}"]


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("RECON_", "PG")) and name != pg_support.REQUIRE_ENV:
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    database_url._passwords.clear()


def credentials_file(tmp_path: Path, password: str, mode: int = 0o600) -> Path:
    path = tmp_path / "credentials.toml"
    path.write_text(f'[merchants.M1]\naccess_token = "tok"\n\n[database]\npassword = '
                    f'"{password}"\n')
    path.chmod(mode)
    return path


@pytest.mark.parametrize("url", WITH_PASSWORDS)
@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_url_with_a_password_is_refused_without_repeating_it(
        url: str, where: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["consent", "list"]
    if where == "flag":
        argv += ["--db", url]
    else:
        monkeypatch.setenv("RECON_DB", url)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and "holds a password" in err and "[database] password" in err
    assert SECRET not in out + err


@pytest.mark.parametrize("url", WITH_PASSWORDS)
def test_settings_errors_never_carry_the_url(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ReconSettings(db=url)
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert "holds a password" in shown and SECRET not in shown


@pytest.mark.parametrize(("url", "problem"), [
    ("mysql://u@h/d", "must be postgresql://"),
    ("postgresql://recon@db.example.com", "names no database"),
    ("postgresql://a b%zz", "not one libpq can read"),
])
def test_other_bad_urls_are_one_line_each(url: str, problem: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["consent", "list", "--db", url]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1


def test_a_url_stays_a_url_and_a_path_stays_a_path(tmp_path: Path) -> None:
    url = "postgresql://recon@/recon?host=/tmp/x&port=5432"
    assert ReconSettings(db=url).db == url  # Path() would have folded `//` into `/`
    assert ReconSettings(db=str(tmp_path / "r.db")).db == tmp_path / "r.db"
    assert check_database_url("postgresql:///?service=team") == "postgresql:///?service=team"


def test_display_url_cuts_any_password() -> None:
    for url in WITH_PASSWORDS:
        shown = display_url(url)
        assert SECRET not in shown and "recon" in shown
    assert display_url("postgresql://recon@db/recon?sslmode=require") == (
        "postgresql://recon@db/recon?sslmode=require")


def test_the_password_comes_from_the_credentials_file(tmp_path: Path) -> None:
    path = credentials_file(tmp_path, SECRET)
    url = "postgresql://recon@db.example.com/recon"
    assert connect_kwargs(url) == {}
    database_url.provide_password(url, path)
    assert connect_kwargs(url) == {"password": SECRET}
    assert SECRET not in repr(database_url._passwords)  # held as a SecretStr


def test_a_group_readable_credentials_file_is_refused_for_the_password(tmp_path: Path) -> None:
    path = credentials_file(tmp_path, SECRET, mode=0o640)
    with pytest.raises(CredentialsError, match="chmod 600") as caught:
        database_url.provide_password("postgresql://recon@db/recon", path)
    assert SECRET not in str(caught.value)


# ---------------------------------------------------------------- against a real server
@pytest.fixture(scope="module")
def password_cluster() -> Iterator[LocalCluster]:
    """A cluster that asks for a password on its socket (scram-sha-256), as a real one does."""
    try:
        cluster = start_cluster(for_tests=False)
    except PostgresUnavailable as error:
        pg_support.postgres_unavailable(str(error))
    try:
        yield cluster
    finally:
        cluster.stop()


def test_credentials_password_logs_in_and_a_wrong_one_is_not_shown(
        password_cluster: LocalCluster, tmp_path: Path) -> None:
    url = password_cluster.url()
    assert password_cluster.password
    database_url.provide_password(url, credentials_file(tmp_path, password_cluster.password))
    with psycopg.connect(url, **connect_kwargs(url)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("recon",)

    database_url.provide_password(url, credentials_file(tmp_path, SECRET))
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(url, **connect_kwargs(url))
    shown = "".join(traceback.format_exception(caught.value))
    assert "password authentication failed" in shown and SECRET not in shown


def test_libpq_pgpass_file_is_used_when_the_credentials_file_has_none(
        password_cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = password_cluster.url()
    database_url.provide_password(url, tmp_path / "no-such-credentials.toml")
    assert connect_kwargs(url) == {}
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, **connect_kwargs(url))
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:recon:{password_cluster.password}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with psycopg.connect(url, **connect_kwargs(url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_same_option_twice_never_echoes_a_password(
        capsys: pytest.CaptureFixture[str]) -> None:
    first, second = WITH_PASSWORDS[0], WITH_PASSWORDS[2]
    for argv in (["consent", "list", "--db", first, "--db", second],   # twice after
                 ["--db", first, "consent", "list", "--db", second]):  # before and after
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert "given twice" in err and SECRET not in out + err


def test_the_command_line_says_which_database(pg_url: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["consent", "list", "--db", pg_url, "--credentials",
                 str(tmp_path / "none.toml"), "--json"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.splitlines()[0] == f"Database: {pg_url}"


def test_the_console_logs_in_with_the_credentials_file_password(
        password_cluster: LocalCluster, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert password_cluster.password
    url = password_cluster.url()
    good = credentials_file(tmp_path, password_cluster.password)
    assert main(["consent", "list", "--db", url, "--credentials", str(good), "--json"]) == 0
    out, err = capsys.readouterr()
    assert password_cluster.password not in out + err

    bad = credentials_file(tmp_path, SECRET)
    assert main(["consent", "list", "--db", url, "--credentials", str(bad), "--json"]) == 2
    out, err = capsys.readouterr()
    assert "password authentication failed" in err and err.count("\n") == 2  # Database + error
    assert SECRET not in out + err


def test_a_team_database_gets_a_checkpoint_folder_named_after_it(tmp_path: Path) -> None:
    from services.checkpoints import default_checkpoint_dir
    url = "postgresql://recon@/recon?host=/tmp/recon-pg-x&port=5432"
    folder = default_checkpoint_dir(tmp_path / "credentials.toml", url)
    assert folder.parent == tmp_path / "checkpoints"
    assert folder.name.startswith("recon-") and "&" not in folder.name and "?" not in folder.name
    other = default_checkpoint_dir(tmp_path / "credentials.toml", url.replace("/recon?", "/b?"))
    assert other != folder


def test_the_password_never_reaches_the_drivers_logs(
        password_cluster: LocalCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The pool logs every failed reconnection (a changed password, a restarted server): the
    lines name the socket and the user, never the password."""
    from services.storage.postgres import PostgresStore
    assert password_cluster.password
    url = password_cluster.url()
    database_url.provide_password(url, credentials_file(tmp_path, password_cluster.password))
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="psycopg")  # psycopg sets its own WARNING level
    store = PostgresStore(url)
    try:
        store.consents()
        with psycopg.connect(url, autocommit=True, **connect_kwargs(url)) as admin:
            admin.execute(psycopg.sql.SQL("ALTER ROLE recon PASSWORD {}").format(
                psycopg.sql.Literal(SECRET)))
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE pid <> pg_backend_pid() AND datname = current_database()")
        store.pool.check()  # finds its connections dead, reconnects with the old password
        deadline = time.monotonic() + 20
        while not any("error connecting" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the pool never logged its failed reconnect"
            time.sleep(0.05)
    finally:
        store.pool.close(timeout=1)
        with psycopg.connect(url, autocommit=True, password=SECRET) as admin:
            admin.execute(psycopg.sql.SQL("ALTER ROLE recon PASSWORD {}").format(
                psycopg.sql.Literal(password_cluster.password)))
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "password authentication failed" in logged
    assert password_cluster.password not in logged


def test_demo_team_without_postgresql_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    from services import postgres_cluster
    monkeypatch.setenv("RECON_PG_BINDIR", str(tmp_path))  # holds no initdb
    monkeypatch.setattr(postgres_cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres_cluster.glob, "glob", lambda pattern: [])
    assert main(["demo", "--team"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no PostgreSQL server binaries")
    assert "apt-get install postgresql" in err[-1]
