"""The throwaway PostgreSQL cluster (services/postgres_cluster.py) and the test fixtures on it."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
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


# ---------------------------------------------------------------------- a killed owner's cluster
_KEEP_A_CLUSTER = """
import sys, time
from services.postgres_cluster import start_cluster
cluster = start_cluster(for_tests=True)
print(cluster.directory, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may not reap the stopped postmaster)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def await_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_next_start_reaps_a_cluster_whose_owner_was_killed(
        pg_cluster: LocalCluster, tmp_path: Path) -> None:
    """SIGKILL leaves the cluster running in /tmp/recon-pg-*; the next start stops its
    postmaster and deletes it. A live owner's cluster (this session's) and a directory that
    is not ours (no owner file) are left alone."""
    child = subprocess.Popen([sys.executable, "-c", _KEEP_A_CLUSTER], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None
        stale = Path(child.stdout.readline().strip())
        postmaster = int((stale / "data" / "postmaster.pid").read_text().split()[0])
    finally:
        child.kill()
        child.wait()
    assert stale.is_dir() and running(postmaster)  # what a SIGKILL leaves
    not_ours = Path(tempfile.mkdtemp(prefix=postgres_cluster.PREFIX))
    (not_ours / "data").mkdir()
    try:
        fresh = postgres_cluster.start_cluster(for_tests=True)
        fresh.stop()
        assert not stale.exists()
        assert await_gone(postmaster)
        assert pg_cluster.directory.is_dir()  # its owner (this process) is alive
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert not_ours.is_dir()
    finally:
        shutil.rmtree(not_ours, ignore_errors=True)


def test_an_owner_file_of_a_live_process_or_another_user_keeps_the_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in [("mine-live", os.getpid()), ("mine-dead", dead.pid)]:
        (tmp_path / f"recon-pg-{name}").mkdir()
        (tmp_path / f"recon-pg-{name}" / postgres_cluster.OWNER_FILE).write_text(f"{pid}\n")
    reused = tmp_path / "recon-pg-reused"  # the pid lives on, but in another process
    reused.mkdir()
    (reused / postgres_cluster.OWNER_FILE).write_text(f"{os.getpid()} 1\n")
    linked = tmp_path / "recon-pg-link"
    linked.symlink_to(tmp_path / "recon-pg-mine-dead")
    reaped = postgres_cluster.reap_stale()
    assert sorted(p.name for p in reaped) == ["recon-pg-mine-dead", "recon-pg-reused"]
    assert (tmp_path / "recon-pg-mine-live").is_dir()
    if os.geteuid() == 0:  # a file of another user's is not our mark
        other = tmp_path / "recon-pg-other"
        other.mkdir()
        (other / postgres_cluster.OWNER_FILE).write_text(f"{dead.pid}\n")
        os.chown(other / postgres_cluster.OWNER_FILE, 65534, 65534)
        assert postgres_cluster.reap_stale() == [] and other.is_dir()


@pytest.mark.parametrize(("signal_number", "code"), [(signal.SIGTERM, 143),
                                                      (signal.SIGHUP, 129)])
def test_demo_team_deletes_its_cluster_on_sigterm_and_sighup(signal_number: int,
                                                              code: int) -> None:
    script = (
        "import sys, time\n"
        "import console.app as app\n"
        "from services.settings import ReconSettings\n"
        "def console(settings, read_only=False):\n"
        "    print('READY', settings.db, flush=True)\n"
        "    time.sleep(600)\n"
        "app.run_console = console\n"
        "sys.exit(app.run_team_demo(ReconSettings(operator='Ana')))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECON_")}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None
        line = ""
        while not line.startswith("READY"):
            line = child.stdout.readline()
            if not line:
                err = child.stderr.read() if child.stderr else ""
                if "PostgreSQL" in err:
                    pg_support.postgres_unavailable(err.strip().splitlines()[-1])
                pytest.fail(f"the demo did not start: {err}")
        directory = Path(line.split("host=")[1].split("&")[0])
        postmaster = int((directory / "data" / "postmaster.pid").read_text().split()[0])
        child.send_signal(signal_number)
        assert child.wait(60) == code
    finally:
        child.kill()
        child.wait()
    assert not directory.exists() and await_gone(postmaster)
