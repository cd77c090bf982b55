"""`python -m bench._peak MODULE ARGS...` runs `python -m MODULE ARGS...` in this process and,
at exit, writes the process's own peak resident memory to stderr (`bench-peak-rss-kb N`).

Why not `ru_maxrss` from wait4: a child spawned with vfork (Python's subprocess on Linux) takes
its parent's peak RSS with it through exec, so a bench parent holding a 100,000-order document
made every child look that large (the same figure for ours and the baseline). VmHWM after exec
belongs to the new program alone."""

from __future__ import annotations

import atexit
import os
import resource
import runpy
import sys
from pathlib import Path

MARK = "bench-peak-rss-kb"


def _report() -> None:
    # Plus the largest child's peak (a discovery's second process, reaped by now): both may
    # be at their peaks at once, so the sum bounds what the command held.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            os.write(2, f"\n{MARK} {int(line.split()[1]) + children}\n".encode())


if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = sys.argv[1:]
    atexit.register(_report)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
