"""Issue 8, holes 3 and 8: the operator always knows which Square they are talking to, and the
files the console writes are where the operator said and readable by their owner only."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console.cli import main
from services.demo import write_demo_files
from services.emulator import SeedConfig
from services.private_files import PRIVATE_MODE
from services.settings import ReconSettings
from services.store import Store
from tests.conftest import DATA, LoopbackServer, make_emulator

ROOT = Path(__file__).resolve().parents[1]
VALID_CONSENT = DATA / "consent" / "valid" / "minimal.json"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No RECON_* from the caller's shell; the default data dir inside tmp_path, so a database
    made at the default location is seen (and never touches the real home)."""
    for name in list(os.environ):
        if name.startswith("RECON_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return tmp_path / "xdg-data"


@pytest.fixture
def umask_022() -> Iterator[None]:
    """A common, permissive umask: the modes must come from the code, not from the umask."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- hole 3: options, both places
@pytest.mark.loopback
@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_hole3_options_before_subcommand_are_used(tmp_path: Path, clean_env: Path, where: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=5))
    write_demo_files(tmp_path, emulator.merchants)
    db = tmp_path / "mine.db"
    with LoopbackServer(emulator) as server:
        options = ["--db", str(db), "--square-base-url", server.base_url,
                   "--credentials", str(tmp_path / "credentials.toml"), "--operator", "alice"]

        def placed(*command: str) -> list[str]:
            before = options if where in ("before", "both") else []
            after = options if where in ("after", "both") else []
            return [*before, *command, *after]

        code, _, err = run(capsys, *placed("consent", "import", str(tmp_path / "consents.json")))
        assert code == 0, err
        code, out, err = run(capsys, *placed("queue", "--include-ineligible", "--json"))
    assert code == 0, err
    assert err[0] == f"Square: {server.base_url}"
    merchants = {m["merchant_id"] for m in json.loads(out)["merchants"]}
    assert merchants == {m.merchant.id for m in emulator.merchants}
    assert not clean_env.exists(), "a database was made at the default location"
    with sqlite3.connect(db) as conn:
        operators = {row[0] for row in conn.execute("SELECT operator FROM audit")}
    assert operators == {"alice"}


@pytest.mark.parametrize("command", [["consent", "import", str(VALID_CONSENT)],
                                     ["audit", "verify"]])
@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_hole3_options_before_nested_subcommand_are_used(
        tmp_path: Path, clean_env: Path, command: list[str], where: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "nested.db"
    if command[0] == "audit":  # it reads what was recorded: a database that is there
        Store(db).close()
    options = ["--db", str(db), "--operator", "bob", "--credentials", str(tmp_path / "c.toml")]
    argv = {"before": [*options, *command],
            "between": [command[0], *options, *command[1:]],
            "after": [*command, *options]}[where]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert db.exists() and not clean_env.exists()
    assert not any(line.startswith("Square:") for line in err)  # they never talk to Square
    if command[0] == "consent":
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT DISTINCT operator FROM audit").fetchall() == [("bob",)]


@pytest.mark.parametrize("command", [["queue"], ["consent", "import", str(VALID_CONSENT)],
                                     ["audit", "verify"]])
def test_hole3_same_option_with_two_values_is_refused(
        tmp_path: Path, clean_env: Path, command: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    code, out, err = run(capsys, "--db", str(first), *command, "--db", str(second))
    assert code == 2 and out == "" and len(err) == 1
    assert str(first) in err[0] and str(second) in err[0] and "--db" in err[0]
    assert not first.exists() and not second.exists() and not clean_env.exists()
    # The same value in both places is no conflict.
    Store(first).close()
    code, _, err = run(capsys, "--db", str(first), "audit", "verify", "--db", str(first))
    assert code == 0, err


@pytest.mark.parametrize(("argv", "option", "command"), [
    (["--json", "queue"], "--json", "queue"),
    (["--format", "json", "queue"], "--format", "queue"),
    (["--merchant", "M1", "complete", "--dry-run"], "--merchant", "complete"),
    (["--yes", "complete", "--merchant", "M1"], "--yes", "complete"),
    (["--db", "x.db", "--json", "consent", "list"], "--json", "consent")])
def test_a_subcommands_option_before_it_says_where_it_goes(
        argv: list[str], option: str, command: str, clean_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """argparse called these unrecognized, or took `--format`'s value for the subcommand
    ("invalid choice: 'json'"), `--merchant`'s too; a newcomer could not tell what to do."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and len(err) == 1, err
    assert f"{option} is an option of `{command}`" in err[0]
    assert f"recon-console {command} {option}" in err[0]
    assert not clean_env.exists()


def test_hole3_two_values_in_one_place_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "audit", "verify", "--operator", "a", "--operator", "b")
    assert code == 2 and len(err) == 1 and "'a'" in err[0] and "'b'" in err[0]


@pytest.mark.parametrize(("argv", "option"), [
    (["--read-only", "queue"], "--read-only"),
    (["--read-only", "consent", "import", str(VALID_CONSENT)], "--read-only"),
    (["--db", "x.db", "demo"], "--db"),
    (["demo", "--square-base-url", "https://example.com"], "--square-base-url"),
    (["--operator", "x", "emulator", "serve", "--port", "-1"], "--operator"),
])
def test_hole3_option_a_command_has_no_use_for_is_refused(
        argv: list[str], option: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from console.app import ReconApp
    monkeypatch.setattr(ReconApp, "run", lambda self: None)  # were it accepted: no UI here
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err) == 1 and option in err[0]


# ---------------------------------------------------------------- hole 3: the target, shown
@pytest.mark.parametrize("target", [["--environment", "production"],
                                    ["--environment", "sandbox"],
                                    ["--square-base-url", "http://127.0.0.1:9"], []])
@pytest.mark.parametrize("command", [["queue"], ["complete", "--all-merchants", "--yes"],
                                     ["recover"]])
def test_hole3_target_printed_on_stderr_first(
        tmp_path: Path, target: list[str], command: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    # No credentials file: each stops before sending anything, after naming its target.
    _, _, err = run(capsys, *command, "--db", str(tmp_path / "r.db"),
                    "--credentials", str(tmp_path / "none.toml"), *target)
    expected = target[1] if target else "production"
    assert err[0] == f"Square: {expected}"


def test_hole3_console_and_demo_show_their_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from console.app import ReconApp
    headers: list[str] = []

    def fake_run(self: ReconApp, *args: Any, **kwargs: Any) -> None:
        headers.append(self.sub_title)

    monkeypatch.setattr(ReconApp, "run", fake_run)
    code, _, err = run(capsys, "--environment", "sandbox", "--db", str(tmp_path / "r.db"))
    assert code == 0 and err[0] == "Square: sandbox"
    assert "Square: sandbox" in headers[-1]
    code, _, err = run(capsys, "--db", str(tmp_path / "r.db"), "--read-only",
                       "--square-base-url", "http://[::1]:8765")
    assert code == 0 and err[0] == "Square: http://[::1]:8765"
    assert "Square: http://[::1]:8765" in headers[-1] and "READ-ONLY" in headers[-1]
    code, _, err = run(capsys, "demo")
    assert code == 0 and err[0].startswith("Square: local emulator")
    assert "Square: local emulator" in headers[-1]


@pytest.mark.parametrize("url", ["http://example.com", "http://10.0.0.1:8765",
                                 "http://127.0.0.1.example.com", "http://localhost.example.com",
                                 "ftp://127.0.0.1", "https://", "connect.squareup.com"])
def test_hole3_base_url_must_be_https_or_loopback(
        tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "queue", "--db", str(tmp_path / "r.db"), "--square-base-url", url)
    assert code == 2 and len(err) == 1 and "https" in err[0] and "loopback" in err[0]
    monkeypatch.setenv("RECON_SQUARE_BASE_URL", url)
    code, _, err = run(capsys, "queue", "--db", str(tmp_path / "r.db"))
    assert code == 2 and len(err) == 1 and "loopback" in err[0]
    assert not (tmp_path / "r.db").exists()


@pytest.mark.parametrize("url", ["https://connect.squareup.com", "http://127.0.0.1:8765",
                                 "http://127.9.9.9", "http://[::1]:1", "http://localhost:8765",
                                 "http://LOCALHOST"])
def test_hole3_https_and_loopback_base_urls_are_accepted(url: str) -> None:
    assert ReconSettings(square_base_url=url).target == url


@pytest.mark.parametrize(("env", "flags"), [
    ({"RECON_SQUARE_BASE_URL": "http://127.0.0.1:9"}, ["--environment", "production"]),
    ({"RECON_SQUARE_BASE_URL": "http://127.0.0.1:9", "RECON_SQUARE_ENVIRONMENT": "sandbox"}, []),
    ({}, ["--square-base-url", "http://127.0.0.1:9", "--environment", "sandbox"]),
    ({"RECON_SQUARE_ENVIRONMENT": "sandbox"}, ["--square-base-url", "http://127.0.0.1:9"]),
])
def test_hole3_base_url_with_environment_is_a_usage_error(
        tmp_path: Path, env: dict[str, str], flags: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(capsys, *flags, "queue", "--db", str(tmp_path / "r.db"))
    assert code == 2 and len(err) == 1
    assert "http://127.0.0.1:9" in err[0] and "environment" in err[0]


# ---------------------------------------------------------------- hole 8: where the database is
@pytest.mark.parametrize("command", [["queue"], ["consent", "list"], ["audit", "verify"]])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_hole8_db_in_missing_directory_is_refused(
        tmp_path: Path, clean_env: Path, command: list[str], how: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "no-such-dir" / "recon.db"
    if how == "env":
        monkeypatch.setenv("RECON_DB", str(db))
    argv = [*command, "--db", str(db)] if how == "flag" else command
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and len(err) == 1
    assert "does not exist" in err[0] and str(db.parent) in err[0]
    assert not db.parent.exists() and not clean_env.exists()


def test_hole8_db_that_is_a_directory_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "audit", "verify", "--db", str(tmp_path))
    assert code == 2 and len(err) == 1 and "is a directory" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "export"],
                                     ["audit", "checkpoint"], ["consent", "list"],
                                     ["remind", "history"], ["approve", "B1"]])
def test_a_reading_command_refuses_a_database_that_is_not_there(
        tmp_path: Path, clean_env: Path, command: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --db in a folder that exists: `audit verify` used to make a new, empty
    database there and say "Audit chain verified: 0 entries", exit 0."""
    db = tmp_path / "recon-typo.db"
    code, out, err = run(capsys, *command, "--db", str(db))
    assert code == 2 and out == "" and err[-1].startswith("error: no database at"), err
    assert len([line for line in err if not line.startswith("Square:")]) == 1
    assert str(db) in err[-1] and "--db" in err[-1]
    assert list(tmp_path.iterdir()) == []  # nothing made
    made = tmp_path / "recon.db"
    assert run(capsys, "consent", "import", str(VALID_CONSENT),
               "--db", str(made))[0] == 0  # a recording command makes it
    code, _, err = run(capsys, "audit", "verify", "--db", str(made))
    assert code == 0 and "verified" in err[0], err


def test_hole8_store_never_makes_a_directory_elsewhere(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        Store(tmp_path / "typo" / "recon.db")
    assert not (tmp_path / "typo").exists()


def test_hole8_default_location_is_created_owner_only(
        clean_env: Path, umask_022: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "audit", "verify")
    assert code == 0, err
    db = clean_env / "recon-console" / "recon.db"
    assert mode(db) == PRIVATE_MODE and mode(db.parent) == 0o700


# ---------------------------------------------------------------- hole 8: owner-only files
def test_hole8_database_wal_and_shm_are_owner_only(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "recon.db"
    store = Store(db)
    try:
        store.db["probe"].insert({"x": 1})  # a write, so the WAL holds something
        files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        assert {path.name: mode(path) for path in files} == {
            path.name: PRIVATE_MODE for path in files}
    finally:
        store.close()


def test_hole8_export_and_checkpoint_are_owner_only(
        tmp_path: Path, umask_022: None, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "recon.db")
    assert run(capsys, "consent", "import", str(VALID_CONSENT), "--db", db)[0] == 0
    export, checkpoint = tmp_path / "audit.csv", tmp_path / "checkpoint.json"
    export.write_text("old")
    export.chmod(0o644)  # an existing, readable file is tightened when overwritten
    code, _, err = run(capsys, "audit", "export", "--format", "csv", "--output", str(export),
                       "--db", db)
    assert code == 0, err
    code, _, err = run(capsys, "audit", "checkpoint", "--output", str(checkpoint), "--db", db)
    assert code == 0, err
    assert "consent" in export.read_text() and json.loads(checkpoint.read_text())["size"] >= 1
    assert mode(export) == PRIVATE_MODE and mode(checkpoint) == PRIVATE_MODE
    assert mode(Path(db)) == PRIVATE_MODE


def test_hole8_unwritable_output_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Store(tmp_path / "r.db").close()
    code, _, err = run(capsys, "audit", "export", "--format", "csv", "--db",
                       str(tmp_path / "r.db"), "--output", str(tmp_path / "no" / "out.csv"))
    assert code == 2 and len(err) == 1 and "cannot write" in err[0]


# ---------------------------------------------------------------- hole 8: the schema ships
def test_hole8_shipped_schema_is_the_published_one() -> None:
    from services.consent import SCHEMA_RESOURCE
    assert SCHEMA_RESOURCE.read_bytes() == (ROOT / "consent.schema.json").read_bytes()


def test_hole8_installed_wheel_imports_a_consent(tmp_path: Path) -> None:
    """`pip install` of the built wheel (not editable), run from outside the repository.
    About 15 s: one wheel build and one venv without pip."""
    source = tmp_path / "src"  # a copy: the build never writes into the working tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("console", "services"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "-w", str(dist)], check=True,
                   capture_output=True, timeout=120)
    wheel = next(dist.glob("recon_console-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=120)
    # Dependencies from this environment's site-packages, after the venv's own: a plain path
    # line, so this environment's editable install (a .pth hook there) is not taken along.
    site_packages = next((env_dir / "lib").glob("python3*/site-packages"))
    here = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages / "deps-from-test-env.pth").write_text("\n".join(here) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RECON_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([str(python), "-c", "import services.consent as c; print(c.__file__)"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(env_dir)), where.stdout + where.stderr
    done = subprocess.run([str(env_dir / "bin" / "recon-console"), "consent", "import",
                           str(VALID_CONSENT), "--db", str(outside / "recon.db"),
                           "--credentials", str(outside / "none.toml")],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f" in done.stderr


def test_complete_and_recover_send_on_uvloop_where_it_is_installed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sending commands run their loop on uvloop (~65 us less client CPU per request,
    issue 11), and on the stdlib loop where uvloop is missing (Windows)."""
    import asyncio

    from console.commands import _run_sending

    async def loop_module() -> int:
        return 1 if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else 0

    assert _run_sending(loop_module()) == 1
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert _run_sending(loop_module()) == 0


@pytest.mark.parametrize(("argv", "said"), [
    # argparse said "one of the arguments --merchant --all-merchants --batch is required".
    (["complete", "--merchnat", "M1", "--dry-run"],
     "recon-console complete: no option --merchnat (did you mean --merchant?)"),
    # argparse said "recon-console: unrecognized arguments: --formt json": no command.
    (["queue", "--formt", "json"],
     "recon-console queue: no option --formt (did you mean --format?)"),
    (["complete", "--merchant", "M1", "--dry-runn"],
     "recon-console complete: no option --dry-runn (did you mean --dry-run?)"),
    (["consent", "revoke", "C1", "--by", "ann", "--reasn", "moved"],
     "recon-console consent revoke: no option --reasn (did you mean --reason?)"),
    (["queue", "--zzz"], "recon-console queue: no option --zzz;"),
])
def test_a_mistyped_option_is_named_with_its_command_and_the_likely_one(
        argv: list[str], said: str, clean_env: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(said), err[0]
    assert not clean_env.exists()  # refused before anything was opened


def test_an_abbreviated_option_and_a_bad_value_keep_argparse_s_own_answer(
        clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "queue", "--format", "yaml")
    assert code == 2 and "invalid choice: 'yaml'" in err[0], err
    code, _, err = run(capsys, "queue", "--form", "yaml")  # --form: argparse's abbreviation
    assert code == 2 and "invalid choice: 'yaml'" in err[0], err
