"""A throwaway local PostgreSQL cluster in a temporary directory (tests, benchmarks, `demo --team`).

The machine's own server binaries (`initdb`, `pg_ctl`, `postgres`) run it: no TCP at all, only a
unix socket inside the cluster's private directory (0700), so nobody else on the machine can even
reach it. `initdb` refuses to run as root, so under root (tests and CI run as root here) the
cluster runs as the `postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from services.errors import ConfigurationError
from services.processes import pid_alive

__all__ = ["INSTALL_HINT", "LocalCluster", "PostgresUnavailable", "claim_directory",
           "find_bindir", "local_cluster", "reap_stale"]

INSTALL_HINT = ("install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`; "
                "macOS: `brew install postgresql`), or set RECON_PG_BINDIR to the directory "
                "holding initdb and pg_ctl")
NEEDED = ("initdb", "pg_ctl", "postgres")
# The cluster's bootstrap superuser: the console connects as it (a throwaway cluster has no
# other users to keep apart).
SUPERUSER = "recon"
PORT = 5432  # only names the socket file (.s.PGSQL.5432) in our private directory
PREFIX = "recon-pg-"
# In every throwaway directory: which process made it. A SIGKILLed process cannot clean up, so
# the next start deletes the directories whose maker is gone; one without it is never touched.
OWNER_FILE = "recon-owner"


class PostgresUnavailable(ConfigurationError):
    """No server binaries, no unprivileged user to run them as, or the cluster would not start."""


def _has_server(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in NEEDED)


def find_bindir() -> Path:
    """Where initdb/pg_ctl/postgres live: RECON_PG_BINDIR, `pg_config --bindir`, the newest
    /usr/lib/postgresql/*/bin (Debian keeps them off PATH), then PATH."""
    candidates: list[Path] = []
    if os.environ.get("RECON_PG_BINDIR"):
        candidates.append(Path(os.environ["RECON_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(Path(subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True,
                timeout=10).stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path)) or (0,)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version,
                                           reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if _has_server(candidate):
            return candidate
    raise PostgresUnavailable(f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) found: "
                              f"{INSTALL_HINT}")


def _run_as() -> pwd.struct_passwd | None:
    """None: run as ourselves. Under root: the `postgres` system user (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root, and there is no `postgres` system user to "
                                  "run the cluster as (initdb refuses root): "
                                  f"{INSTALL_HINT}") from None


@dataclass
class LocalCluster:
    """A running cluster. `url(name)` is a libpq URL for database `name` over the socket."""

    directory: Path
    bindir: Path
    owner: pwd.struct_passwd | None
    # Test clusters trust the socket (it sits in a 0700 directory) and skip fsync; the demo's
    # asks for a password, as a real one does, and keeps fsync.
    for_tests: bool
    password: str | None = field(default=None, repr=False)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory

    def url(self, database: str = "postgres") -> str:
        """No password in it: it travels in process lists and logs."""
        return (f"postgresql://{SUPERUSER}@/{quote(database, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='/')}&port={PORT}")

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        if self.owner is not None:
            kwargs.update(user=self.owner.pw_uid, group=self.owner.pw_gid, extra_groups=[])
            env["HOME"] = str(self.directory)
        try:
            return subprocess.run([str(self.bindir / command[0]), *command[1:]],
                                  capture_output=True, text=True, cwd=self.directory, env=env,
                                  timeout=timeout, check=True, **kwargs)  # type: ignore[call-overload]
        except subprocess.CalledProcessError as error:
            detail = (error.stderr or error.stdout or "").strip().splitlines()
            raise PostgresUnavailable(f"{command[0]} failed: "
                                      f"{detail[-1] if detail else error.returncode}") from None
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PostgresUnavailable(f"{command[0]} could not run: {error}") from None

    def _chown(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)

    def start(self) -> None:
        auth = ["--auth-local=trust"] if self.for_tests else ["--auth-local=scram-sha-256"]
        init = ["initdb", "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8",
                "--locale=C", "--auth-host=reject", *auth]
        if self.for_tests:
            init.append("--no-sync")
        pwfile = self.directory / "pwfile"
        if self.password is not None:
            with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(self.password + "\n")
            self._chown(pwfile)
            init.append(f"--pwfile={pwfile}")
        try:
            self._run(*init)
        finally:
            pwfile.unlink(missing_ok=True)
        options = [f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}'",
                   f"-c port={PORT} -c max_connections=200"]
        if self.for_tests:
            options.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
                  "-l", str(self.directory / "server.log"), "-o", " ".join(options))

    def stop(self) -> None:
        """Stop the server (immediately: it is thrown away) and delete everything."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data),
                          timeout=60)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _started(pid: int) -> str:
    """When process `pid` started (Linux: /proc), so a reused pid is not taken for the maker;
    "" where that is unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    if not pid_alive(pid):
        return False
    now = _started(pid)
    return not (started and now and now != started)


def claim_directory(directory: Path) -> None:
    """Mark a fresh throwaway directory as this process's (see `reap_stale`)."""
    pid = os.getpid()
    with open(os.open(directory / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
              "w") as out:
        out.write(f"{pid} {_started(pid)}\n")


def _maker_gone(directory: Path) -> bool:
    """True only for a directory of ours (its owner file is a plain file of this user's)
    whose maker process is dead."""
    marker = directory / OWNER_FILE
    try:
        info = marker.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return False
        pid, _, started = marker.read_text().strip().partition(" ")
        return not _alive(int(pid), started)
    except (OSError, ValueError):
        return False


def _postmaster_running(data: Path) -> bool:
    try:
        return pid_alive(int((data / "postmaster.pid").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return False


def reap_stale(prefix: str = PREFIX) -> list[Path]:
    """Delete the throwaway directories `prefix*` under the temp dir that a dead process of
    ours left (SIGKILL, a power cut), stopping the postmaster still running in one first.
    A server that will not stop keeps its directory. Returns what was deleted."""
    reaped = []
    for directory in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if directory.is_symlink() or not directory.is_dir() or not _maker_gone(directory):
            continue
        cluster = LocalCluster(directory, Path(), None, for_tests=True)
        if (cluster.data / "postmaster.pid").exists():
            try:
                cluster.bindir, cluster.owner = find_bindir(), _run_as()
                cluster._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D",
                             str(cluster.data), timeout=60)
            except PostgresUnavailable:
                if _postmaster_running(cluster.data):
                    continue
        shutil.rmtree(directory, ignore_errors=True)
        reaped.append(directory)
    return reaped


def start_cluster(*, for_tests: bool) -> LocalCluster:
    """initdb + start in a fresh private temp directory; PostgresUnavailable says why not.
    Clusters left by killed processes go first."""
    bindir = find_bindir()
    owner = _run_as()
    reap_stale()
    # Directly under the system temp dir: the socket path must stay under ~100 bytes, and the
    # `postgres` user must be able to reach it (pytest's tmp dirs are root's own, 0700).
    directory = Path(tempfile.mkdtemp(prefix=PREFIX))
    cluster = LocalCluster(directory, bindir, owner, for_tests,
                           password=None if for_tests else secrets.token_urlsafe(24))
    try:
        claim_directory(directory)
        cluster._chown(directory)
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def local_cluster(*, for_tests: bool = False) -> Iterator[LocalCluster]:
    cluster = start_cluster(for_tests=for_tests)
    try:
        yield cluster
    finally:
        cluster.stop()
