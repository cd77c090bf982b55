"""A recognisable token is planted, every path that can fail is walked, and no output holds it:
not the database (WAL included), the audit, exports, logs, stdout/stderr, or error text."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.credentials import load_credentials
from services.demo import consent_for
from services.emulator import FaultPlan, SeedConfig
from tests.conftest import LoopbackServer, make_emulator

ROOT = Path(__file__).resolve().parents[1]
CANARY = "emu-token-CANARY-9f8e7d6c5b4a39281706"


@pytest.mark.loopback
def test_planted_token_never_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=20),
                             FaultPlan(server_error_rate=0.2, lost_response_rate=0.2, seed=3))
    square = emulator.square
    planted = emulator.merchants[0]
    token = square.tokens.pop(planted.token.token)
    token.token = CANARY
    square.tokens[CANARY] = token
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(
        f'[merchants.{planted.merchant.id}]\naccess_token = "{CANARY}"\nsync_time = "04:00"\n'
        f'[merchants.{emulator.merchants[1].merchant.id}]\n'
        f'access_token = "{emulator.token(1)}"\n')
    os.chmod(credentials, 0o600)
    consents = tmp_path / "consents.json"
    now = datetime.now(UTC)
    consents.write_text(json.dumps([consent_for(m, now) for m in emulator.merchants]))
    outputs: list[str] = []
    with LoopbackServer(emulator) as server:
        env = dict(os.environ, RECON_DB=str(tmp_path / "recon.db"),
                   RECON_SQUARE_BASE_URL=server.base_url, RECON_CREDENTIALS=str(credentials))

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([sys.executable, "-m", "console.cli", *args], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=120)
            outputs.extend([done.stdout, done.stderr])
            return done

        run("consent", "import", str(consents))
        run("queue", "--include-ineligible", "--json")
        run("complete", "--all-merchants", "--max-orders", "6", "--yes", "--json")
        square.revoke_token(CANARY)  # auth failures must not echo the token either
        run("queue", "--json")
        run("complete", "--all-merchants", "--yes", "--json")
        run("recover", "--json")
        run("audit", "export", "--format", "csv")
        run("audit", "export", "--format", "jsonl")
        run("audit", "verify", "--json")
        run("consent", "list", "--json")
        # A malformed credentials file: the error must not quote the token line.
        broken = tmp_path / "broken.toml"
        broken.write_text(f'[merchants.X]\naccess_token = "{CANARY}\n')
        os.chmod(broken, 0o600)
        outputs.append(run("queue", "--credentials", str(broken)).stderr)
        wrong = tmp_path / "wrong.toml"
        wrong.write_text(f'[merchants.X]\naccess_token = ["{CANARY}"]\n')
        os.chmod(wrong, 0o600)
        outputs.append(run("queue", "--credentials", str(wrong)).stderr)
    loaded = load_credentials(credentials)
    outputs += [repr(loaded), str(loaded), json.dumps({k: v.model_dump(mode="json")
                                                       for k, v in loaded.items()})]
    outputs.append(caplog.text)
    assert any("completed" in text for text in outputs), "the run did nothing"
    for text in outputs:
        assert CANARY not in text
    for path in tmp_path.iterdir():
        if path.name.startswith("recon.db"):
            assert CANARY.encode() not in path.read_bytes(), path.name



def _plant_plugin(tmp_path: Path, group: str, entry: str, source: str) -> dict[str, str]:
    """A package installed beside us with an entry point in `group`, whose module writes
    `SPY_MARKER` when it is imported; the environment of a process that finds it."""
    packages = tmp_path / "site"
    (packages / "spyplugin-1.0.dist-info").mkdir(parents=True)
    (packages / "spyplugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: spyplugin\nVersion: 1.0\n")
    (packages / "spyplugin-1.0.dist-info" / "entry_points.txt").write_text(
        f"[{group}]\nspy = {entry}\n")
    (packages / "spyplugin.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['SPY_MARKER']).write_text('loaded')\n" + source)
    env = {key: value for key, value in os.environ.items()
           if key != "PYDANTIC_DISABLE_PLUGINS"}
    env.update(PYTHONPATH=os.pathsep.join([str(packages), str(ROOT)]),
               SPY_MARKER=str(tmp_path / "plugin-loaded"),
               RECON_DB=str(tmp_path / "recon.db"), RECON_OPERATOR="tester")
    return env


def _run_with_plugin(tmp_path: Path, env: dict[str, str], argv: list[str], marker: str
                     ) -> Path:
    """Run `argv` beside the planted plugin, which marks its import at `tmp_path/marker`;
    that path."""
    done = subprocess.run(argv, env=dict(env, SPY_MARKER=str(tmp_path / marker)), cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tmp_path / marker


def _console_loads_plugin(tmp_path: Path, env: dict[str, str]) -> bool:
    consents = sorted((ROOT / "examples" / "consents").glob("*.json"))
    return _run_with_plugin(tmp_path, env, [sys.executable, "-m", "console.cli", "consent",
                                            "import", str(consents[0])],
                            "plugin-loaded").exists()


def test_no_pydantic_plugin_sees_what_the_console_validates(tmp_path: Path) -> None:
    """A pydantic plugin installed beside us (any package with a `pydantic` entry point) is
    handed every value a model validates, settings and Square's answers with tokens
    included: the console loads none. The control run proves the planted plugin loads
    wherever pydantic is left to look."""
    env = _plant_plugin(tmp_path, "pydantic", "spyplugin:plugin", (
        "class _Spy:\n"
        "    def new_schema_validator(self, *args, **kwargs):\n"
        "        return None, None, None\n"
        "plugin = _Spy()\n"))
    control = _run_with_plugin(tmp_path, env, [sys.executable, "-c", "import pydantic\n"
                                               "class Probe(pydantic.BaseModel):\n    x: int\n"],
                               "control")
    assert control.exists(), "the control: pydantic did not load the plugin"
    assert not _console_loads_plugin(tmp_path, env), "the console loaded a pydantic plugin"


def test_no_sqlite_utils_plugin_is_handed_the_database(tmp_path: Path) -> None:
    """A sqlite-utils plugin's `prepare_connection` is given every connection sqlite-utils
    wraps: it could read the queue, consents and audit, or register SQL functions that the
    console's own queries would then call. The console's connections are handed to none.
    The control proves the planted plugin is found by a plain `Database`."""
    env = _plant_plugin(tmp_path, "sqlite_utils", "spyplugin", (
        "import sqlite_utils\n"
        "@sqlite_utils.hookimpl\n"
        "def prepare_connection(conn):\n"
        "    pathlib.Path(os.environ['SPY_MARKER'] + '-connection').write_text('handed')\n"))
    _run_with_plugin(tmp_path, env, [sys.executable, "-c", "import sqlite3, sqlite_utils\n"
                                     "sqlite_utils.Database(sqlite3.connect(':memory:'))\n"],
                     "control")
    assert (tmp_path / "control-connection").exists(), \
        "the control: sqlite-utils did not hand the plugin a connection"
    assert not _console_loads_plugin(tmp_path, env), "the console loaded a sqlite-utils plugin"
