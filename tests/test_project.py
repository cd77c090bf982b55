"""The project's own promises: CI runs the README's test command; services/ never imports
textual."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import LoopbackServer

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme_commands = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text())
    assert ci in readme_commands
    assert "pytest" in ci


def test_services_never_import_textual() -> None:
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "services").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+textual", path.read_text(), re.MULTILINE)]
    assert offenders == []


def test_ruff_is_clean() -> None:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_mypy_is_clean(tmp_path: Path) -> None:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_import_contracts_hold() -> None:
    """import-linter (as Harlequin does): the boundaries in pyproject's [tool.importlinter]."""
    import subprocess
    import sys
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout


def test_the_emulator_contract_names_every_other_services_module() -> None:
    """A new module under services/ must be added to the emulator's forbidden list."""
    import tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"]
                    if c.get("source_modules") == ["services.emulator"])
    modules = {f"services.{p.stem if p.is_file() else p.name}"
               for p in (ROOT / "services").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__")
               or (p.is_dir() and (p / "__init__.py").exists())}
    assert modules - {"services.emulator"} <= set(contract["forbidden_modules"])


def test_a_sqlite_command_does_not_load_the_postgresql_driver() -> None:
    """psycopg costs every command 150-250 ms of start-up; only a PostgreSQL store needs it
    (services/storage/base.py `database_errors`)."""
    import subprocess
    import sys
    done = subprocess.run(
        [sys.executable, "-c", "import sys, console.cli, console.commands, services.workspace; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg'))"],
        cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# What a `queue` run must not load: the official SDK (~0.4 s of start-up with its models; the
# gateway's requests go over aiohttp and msgspec), httpx (~70 ms; the SDK's client and the
# tests' in-process wire), Rich (only the table output), and the completion engine.
NOT_LOADED_BY_QUEUE = ("square", "httpx", "rich", "services.completion.engine")


@pytest.mark.loopback
def test_a_sqlite_queue_run_loads_neither_the_square_sdk_nor_httpx(
        tmp_path: Path, loopback: LoopbackServer) -> None:
    """A real `queue --json` (SQLite, over loopback to the emulator: a full discovery, then a
    refresh by change) imports only what it uses; the modules it loaded are listed at exit."""
    import json
    import os
    import subprocess
    import sys
    emulator = loopback.emulator
    credentials = tmp_path / "credentials.toml"
    credentials.write_text("".join(f'[merchants.{m.merchant.id}]\naccess_token = '
                                   f'"{emulator.token(i)}"\n'
                                   for i, m in enumerate(emulator.merchants)))
    credentials.chmod(0o600)
    env = dict(os.environ, RECON_DB=str(tmp_path / "recon.db"), RECON_OPERATOR="test",
               RECON_SQUARE_BASE_URL=loopback.base_url, RECON_CREDENTIALS=str(credentials))
    listing = ("import atexit, runpy, sys\n"
               "atexit.register(lambda: print('LOADED', *sorted(sys.modules), file=sys.stderr))\n"
               "sys.argv = ['recon-console', 'queue', '--json', '--include-ineligible']\n"
               "runpy.run_module('console.cli', run_name='__main__', alter_sys=True)\n")
    for _ in ("discovery", "refresh"):
        done = subprocess.run([sys.executable, "-c", listing], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["orders"]  # it really asked Square, over aiohttp
        loaded = set(next(line for line in done.stderr.splitlines()
                          if line.startswith("LOADED ")).split()[1:])
        assert "aiohttp" in loaded
        assert [name for name in NOT_LOADED_BY_QUEUE
                if name in loaded or any(m.startswith(f"{name}.") for m in loaded)] == []


def test_the_https_trust_store_does_not_load_httpx() -> None:
    """Real Square is https: the gateway's TLS context must not cost every command httpx's
    import (services/http_transport.py `trust_store_context`)."""
    import os
    import subprocess
    import sys
    for where in ("certifi", "SSL_CERT_FILE"):
        env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        if where == "SSL_CERT_FILE":
            import certifi
            env["SSL_CERT_FILE"] = certifi.where()
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from services.http_transport import AiohttpWire; "
             "context = AiohttpWire()._tls_context(); "
             "print(len(context.get_ca_certs()) > 0, 'httpx' in sys.modules)"],
            cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["True", "False"], where
