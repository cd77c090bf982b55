"""Start-up cost of real commands (issue 11): the CPU a short command spends importing and
setting up, next to the same commands from a baseline checkout (git `main` by default, in a
temporary worktree) and `python -c pass`, all measured in the same run.

The commands run against a tiny loopback emulator (2 merchants, 20 orders) and a database that
already holds its queue, so they do almost no work and their cost is start-up:
- `queue --json`: a refresh by change (every merchant asked what changed; nothing did);
- `complete --all-merchants --dry-run --json`: the same refresh, then the preview;
- `audit verify --json` and `consent list --json`: the database only.

Each figure is the median of `--runs` runs, the runs of both trees interleaved so both see the
same machine; the CPU (user + system, from `wait4`) is what to judge by on a shared machine.
`over pass` is a command's CPU less that of `python -c pass` (the interpreter's own start), and
the last column that figure as a share of the baseline's. In each round `queue --json` also
runs once under `-X importtime`: the summed self time of every module it imported (a wall
time, so it moves with the load; the CPU columns are the figures to judge by).

Both trees are byte-compiled first, as an installed package is: with PYTHONDONTWRITEBYTECODE
set (as in some sandboxes) every run would otherwise compile the project's sources again.

    .venv/bin/python -m bench.startup [--runs 5] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._support import ROOT, compile_bytecode, loopback_emulator

COMMANDS: dict[str, list[str]] = {
    "queue --json": ["queue", "--json"],
    "complete --dry-run": ["complete", "--all-merchants", "--dry-run", "--json"],
    "audit verify": ["audit", "verify", "--json"],
    "consent list": ["consent", "list", "--json"],
}


def timed(argv: list[str], code: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one process, start to exit; a failure stops the bench."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=code, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{code}: {' '.join(argv[1:])} exited "
                         f"{os.waitstatus_to_exitcode(status)}: {stderr[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def import_seconds(code: Path, env: dict[str, str], command: list[str]) -> tuple[float, int]:
    """The summed self time of every import `-X importtime` reports, and how many modules."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "console.cli", *command],
                          cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=True)
    selves = [int(line.split(":", 1)[1].split("|")[0]) for line in done.stderr.splitlines()
              if line.startswith("import time:") and line.split("|")[0].split(":")[1].strip()
              .isdigit()]
    return sum(selves) / 1e6, len(selves)


def prepare(code: Path, manifest: dict[str, Any], name: str) -> dict[str, str]:
    """This tree's own database, the consents imported and the queue read once (not timed)."""
    from bench.completion import FOUR_EYES_OUT_OF_REACH, write_consents

    directory = Path(manifest["directory"]) / name
    directory.mkdir()
    consents = write_consents(manifest, directory / "consents.json")
    env = {**os.environ, **FOUR_EYES_OUT_OF_REACH,
           "RECON_SQUARE_BASE_URL": manifest["base_url"],
           "RECON_CREDENTIALS": str(Path(manifest["directory"]) / "credentials.toml"),
           "RECON_DB": str(directory / "recon.db"), "RECON_OPERATOR": "bench",
           "RECON_CHECKPOINT_DIR": str(directory / "checkpoints"), "PYTHONPATH": str(code)}
    for command in (["consent", "import", str(consents)], ["queue", "--json"]):
        timed([sys.executable, "-m", "console.cli", *command], code, env)
    return env


def main() -> None:
    from bench.completion import baseline_checkout

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-ref", default="main",
                        help="git ref of the baseline, run from a temporary worktree")
    parser.add_argument("--commands", default=",".join(COMMANDS),
                        help=f"which, comma-separated (default: all: {', '.join(COMMANDS)})")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.commands.split(",")]
    unknown = [name for name in chosen if name not in COMMANDS]
    if unknown:
        parser.error(f"--commands: unknown {unknown}; choose from {list(COMMANDS)}")
    baseline = baseline_checkout(args.baseline_ref)
    trees = {"this tree": ROOT, args.baseline_ref: baseline}
    for code in trees.values():
        compile_bytecode(code)
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    imports: dict[str, list[tuple[float, int]]] = {tree: [] for tree in trees}
    try:
        with loopback_emulator("--merchants", "2", "--orders-per-location", "5") as manifest:
            envs = {tree: prepare(code, manifest, f"tree{index}")
                    for index, (tree, code) in enumerate(trees.items())}
            for _ in range(args.runs):
                figures.setdefault(("python -c pass", ""), []).append(
                    timed([sys.executable, "-c", "pass"], ROOT, dict(os.environ)))
                for name in chosen:
                    for tree, code in trees.items():
                        figures.setdefault((name, tree), []).append(timed(
                            [sys.executable, "-m", "console.cli", *COMMANDS[name]], code,
                            envs[tree]))
                for tree, code in trees.items():
                    imports[tree].append(import_seconds(code, envs[tree],
                                                        COMMANDS["queue --json"]))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(baseline)], check=False)

    def median(key: tuple[str, str], index: int) -> float:
        return statistics.median(run[index] for run in figures[key])

    bare = median(("python -c pass", ""), 1)
    print(f"start-up: {args.runs} runs each, interleaved, medians; tiny loopback emulator; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'command':<20} {'tree':<10} {'wall s':>7} {'CPU s':>7} {'over pass':>10} "
          f"{'x baseline':>10}")
    print(f"{'python -c pass':<20} {'':<10} {median(('python -c pass', ''), 0):7.3f} "
          f"{bare:7.3f}")
    for name in chosen:
        base_over = median((name, args.baseline_ref), 1) - bare
        for tree in trees:
            over = median((name, tree), 1) - bare
            print(f"{name:<20} {tree:<10} {median((name, tree), 0):7.3f} "
                  f"{median((name, tree), 1):7.3f} {over:10.3f} "
                  f"{over / base_over if base_over > 0 else float('nan'):10.2f}")
    base = statistics.median(seconds for seconds, _ in imports[args.baseline_ref])
    for tree, runs in imports.items():
        seconds = statistics.median(seconds for seconds, _ in runs)
        print(f"queue --json imports (-X importtime)  {tree:<10} {seconds:6.3f} s, "
              f"{runs[0][1]} modules ({seconds / base:.2f} x baseline)")


if __name__ == "__main__":
    main()
