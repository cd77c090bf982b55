"""`recon-console demo` paints its first screen within a second (issue 11): the console and
its first screen import none of the heavy services (the store and its PostgreSQL driver,
Square's SDK, the completion engine, the emulator); those load in the demo's workspace
thread while the first screen paints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the merchants screen does not need before its workspace exists.
HEAVY = ("services.workspace", "services.store", "services.storage", "services.completion",
         "services.audit", "services.demo", "services.emulator", "services.reminders",
         "square", "psycopg", "httpx", "console.screens.queue", "console.screens.progress",
         "console.screens.approvals", "console.screens.reminders")


def test_the_console_and_its_first_screen_import_no_heavy_service() -> None:
    code = ("import sys\nimport console.cli, console.app, console.screens.merchants\n"
            f"heavy = {HEAVY!r}\n"
            "print(sorted(m for m in sys.modules\n"
            "             if any(m == h or m.startswith(h + '.') for h in heavy)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
