"""The child side of a crash trial started from a fork server (tests/crash_harness.py): the fork
server has imported the console already, so each trial skips the interpreter's start-up and
imports (most of a trial's time) and runs exactly `recon-console ARGS` in a process of its own."""

from __future__ import annotations

import os
import sys

import console.commands  # noqa: F401  (imported lazily by the CLI: the fork server loads it)
import services.settings  # noqa: F401
from console.cli import main


def run_cli(env: dict[str, str], argv: list[str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.exit(main(argv))
