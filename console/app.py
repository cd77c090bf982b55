"""Placeholder until the console lands: the demo serves the emulator and says so."""

from __future__ import annotations

from typing import Any


def run_console(settings: Any, read_only: bool = False) -> int:
    print("The console is not built yet; see `recon-console --help` for the commands.")
    return 2


def run_demo(settings: Any, read_only: bool = False, seed: int = 7) -> int:
    from services.emulator import FaultPlan, SeedConfig
    from services.emulator.serve import serve
    print("The console is not built yet: serving the demo Square emulator on "
          "http://127.0.0.1:8765 (Ctrl-C stops it).")
    serve("127.0.0.1", 8765, SeedConfig(seed=seed), FaultPlan())
    return 0
