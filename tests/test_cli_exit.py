"""`recon-console`'s exit (console/cli.py `run`): main's exit code, and what the command made
frozen before the interpreter's exit, whose final full collections then skip it (~0.1-0.2 s
of CPU a command, issue 11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import atexit, gc, os
import console.cli
console.cli.main = lambda argv=None: 7
atexit.register(lambda: os.write(2, f"frozen {gc.get_freeze_count()}".encode()))
console.cli.run()
"""


def test_run_exits_with_mains_code_and_everything_frozen() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True,
                          timeout=60)
    assert done.returncode == 7, done.stderr
    frozen = int(done.stderr.decode().rsplit("frozen ", 1)[1])
    assert frozen > 10_000, frozen  # every module's objects, not a handful


def test_the_installed_program_is_run() -> None:
    """pyproject's `recon-console` is `run` (with `main`, nothing would be frozen)."""
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["recon-console"] == "console.cli:run"
