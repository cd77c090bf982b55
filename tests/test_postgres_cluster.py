"""The throwaway PostgreSQL cluster (services/postgres_cluster.py) and the test fixtures on it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psycopg
import pytest

from services import postgres_cluster
from services.postgres_cluster import LocalCluster, PostgresUnavailable, find_bindir
from tests import pg_support


def test_cluster_listens_on_its_private_socket_only(pg_cluster: LocalCluster) -> None:
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)  # no TCP at all
        assert conn.execute("SHOW unix_socket_directories").fetchone() == (
            str(pg_cluster.socket_dir),)
    mode = pg_cluster.directory.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o700  # trust auth, but only its owner gets in
    if os.geteuid() == 0:  # initdb refuses root: the cluster runs as `postgres`
        assert mode.st_uid == pg_cluster.owner.pw_uid != 0  # type: ignore[union-attr]


def test_each_test_gets_a_fresh_database(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE scratch (x int)")
        name = conn.execute("SELECT current_database()").fetchone()
    assert name is not None and name[0] != pg_support.TEMPLATE
    assert "password" not in pg_url and ":" not in pg_url.split("@")[0].removeprefix(
        "postgresql://")


def test_a_database_is_dropped_after_its_test(pg_cluster: LocalCluster) -> None:
    with pg_support.fresh_database(pg_cluster) as url:
        name = url.split("/")[3].split("?")[0]
        held = psycopg.connect(url)  # left open: the drop must not wait for it
    held.close()
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            [name]).fetchone() is None


def test_stop_removes_the_server_and_its_directory() -> None:
    try:
        cluster = postgres_cluster.start_cluster(for_tests=True)
    except PostgresUnavailable as error:
        pg_support.postgres_unavailable(str(error))
    url = cluster.url()
    cluster.stop()
    assert not cluster.directory.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)


def test_missing_binaries_are_one_line_saying_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECON_PG_BINDIR", str(tmp_path))  # holds no initdb
    monkeypatch.setattr(postgres_cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres_cluster.glob, "glob", lambda pattern: [])
    with pytest.raises(PostgresUnavailable) as caught:
        find_bindir()
    message = str(caught.value)
    assert "\n" not in message
    assert "apt-get install postgresql" in message and "RECON_PG_BINDIR" in message


def test_root_without_a_postgres_user_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_cluster.os, "geteuid", lambda: 0)

    def no_such_user(name: str) -> None:
        raise KeyError(name)
    monkeypatch.setattr(postgres_cluster.pwd, "getpwnam", no_such_user)
    with pytest.raises(PostgresUnavailable, match="refuses root"):
        postgres_cluster._run_as()


def test_unavailable_postgres_skips_on_a_laptop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pg_support.REQUIRE_ENV, raising=False)
    with pytest.raises(BaseException, match="PostgreSQL unavailable: no initdb") as caught:
        pg_support.postgres_unavailable("no initdb")
    assert caught.type is pytest.skip.Exception


def test_unavailable_postgres_fails_when_ci_requires_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pg_support.REQUIRE_ENV, "1")
    # Caught as BaseException: a skip escaping here would hide the very regression it tests.
    with pytest.raises(BaseException, match="RECON_REQUIRE_POSTGRES=1: no initdb") as caught:
        pg_support.postgres_unavailable("no initdb")
    assert caught.type is pytest.fail.Exception


def test_ci_requires_postgres_and_installs_it_when_missing() -> None:
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "export RECON_REQUIRE_POSTGRES=1" in ci
    assert "apt-get install" in ci and "postgresql" in ci
