"""Start the emulator over loopback in its own process (so client and server do not share a GIL)
and wait for its manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def compile_bytecode(tree: Path = ROOT) -> None:
    """Bytecode for the project's own modules, as an installed copy has them (`pip install .`
    compiles them; an editable install does not). Where PYTHONDONTWRITEBYTECODE is set (this
    machine's environment) every process otherwise compiles its ~35 modules of ours again:
    ~90 ms of each start, a cost no installed console pays. Called by a benchmark's own
    process before it starts ours (`loopback_emulator` does), not at import: a timed child
    that imports the benchmark (a baseline loop) would pay the walk."""
    import compileall

    for package in ("console", "services"):
        compileall.compile_dir(tree / package, quiet=1)


def scratch_dir(prefix: str) -> Path:
    """A temporary directory deleted when the benchmark's process exits: each run's databases
    (~200 MB for a discovery) were left in /tmp, and over many runs filled the disk (a full
    disk then failed an unrelated test run)."""
    import atexit
    import shutil

    directory = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


@contextmanager
def loopback_emulator(*args: str, timeout: float = 300) -> Iterator[dict[str, Any]]:
    compile_bytecode()  # the emulator and every process timed beside it are ours
    directory = scratch_dir("bench-emu-")
    manifest = directory / "manifest.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "emulator", "serve", "--port", "0",
         "--manifest", str(manifest), "--write-demo-files", str(directory), *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not manifest.exists():
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode() if process.stderr else "")
            if time.monotonic() > deadline:
                raise RuntimeError("emulator did not start")
            time.sleep(0.05)
        document = json.loads(manifest.read_text())
        document["directory"] = str(directory)
        document["pid"] = process.pid
        yield document
    finally:
        process.terminate()
        process.wait(10)


def rss_mb(pid: int | None = None) -> float:
    """Current resident memory of a process, in MB (Linux)."""
    path = f"/proc/{pid or os.getpid()}/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
