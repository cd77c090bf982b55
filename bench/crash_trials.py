"""Crash trials in bulk: `recon-console complete` against the loopback emulator, killed with
SIGKILL in the middle of its batch, then `recover`, then the invariants judged from the
emulator's state and the independent oracle (tests/crash_harness.py says what "mid-batch"
requires and which invariants).

    .venv/bin/python -m bench.crash_trials [--trials 1000] [--processes 2] [--max-seconds S]

Each of the `--trials` slots runs until one kill lands mid-batch (up to 4 seeds); a trial whose
kill was not mid-batch is counted apart as retried, never as a kill. Violations are counted
over every trial, retried ones included, and must be 0. Slots are shared among `--processes`
worker processes. `--max-seconds` stops starting new slots after that long, and the report
says how many ran."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(first: int, last: int, shard: int, shards: int, stop_at: float) -> None:
    """Run slots first..last-1 that fall to this shard; one JSON line per trial."""
    from tests.crash_harness import run_mid_batch_trial

    for n, slot in enumerate(range(first + shard, last, shards)):
        if n and n % 25 == 0:
            print(f"shard {shard}: {n} slots done", file=sys.stderr, flush=True)
        if time.time() > stop_at:
            print(json.dumps({"stopped": slot}), flush=True)
            return
        try:
            result, retried = run_mid_batch_trial(slot)
        except Exception as error:  # a harness failure is reported, not hidden
            print(json.dumps({"slot": slot, "error": repr(error)}), flush=True)
            continue
        for trial in [*retried, result]:
            print(json.dumps({"slot": slot, "kill": trial is result and trial.mid_batch,
                              **dataclasses.asdict(trial)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=1000, help="mid-batch kills to make")
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    last = args.first_seed + args.trials
    if args.shard is not None:
        worker(args.first_seed, last, args.shard, args.processes, args.stop_at or float("inf"))
        return
    start = time.time()
    stop_at = start + args.max_seconds if args.max_seconds else float("inf")
    out = Path(tempfile.mkdtemp(prefix="crash-trials-"))
    files = [out / f"shard-{shard}.jsonl" for shard in range(args.processes)]
    workers = []
    for shard, path in enumerate(files):
        with path.open("w") as handle:  # a file each: no pipe to fill while another is read
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "bench.crash_trials", "--trials", str(args.trials),
                 "--first-seed", str(args.first_seed), "--processes", str(args.processes),
                 "--shard", str(shard), "--stop-at", str(stop_at)], cwd=ROOT, stdout=handle))
    for process in workers:
        process.wait()
    kills = retried = completed = recovered = completed_before = recorded_before = 0
    violations: list[str] = []
    errors: list[str] = []
    missed: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    open_at_kill = 0
    slots: set[int] = set()
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "stopped" in row:
                continue
            if "error" in row:
                errors.append(f"slot {row['slot']}: {row['error']}")
                continue
            violations += [f"seed {row['seed']}: {v}" for v in row["violations"]]
            if not row["kill"]:
                retried += 1
                missed[row["why_not"] or "?"] += 1
                continue
            slots.add(row["slot"])
            kills += 1
            modes[row["kill_mode"]] += 1
            open_at_kill += row["open_at_kill"] > 0
            completed += row["completed"]
            completed_before += row["completed_before_recover"]
            recorded_before += row["recorded_before_recover"]
            recovered += row["settled_by_recover"]
    elapsed = time.time() - start
    print(f"{kills} mid-batch kills of {args.trials} asked, in {elapsed:.0f} s on "
          f"{args.processes} processes ({', '.join(f'{m}: {n}' for m, n in modes.items())}); "
          f"{open_at_kill} with intents open at the kill")
    print(f"orders completed in Square by the runs: {completed} "
          f"({completed_before} before the kill, {recorded_before} of them with a durable "
          f"outcome); intents settled by recover: {recovered}")
    print(f"trials retried (kill not mid-batch, counted apart): {retried} "
          f"({', '.join(f'{why}: {n}' for why, n in missed.items()) or 'none'})")
    print(f"per-trial records: {out}")
    print(f"invariant violations: {len(violations)}; harness errors: {len(errors)}")
    for line in (violations + errors)[:20]:
        print(f"  {line}")
    if kills < args.trials:
        print(f"NOT all trials ran: {args.trials - kills} slots not run or without a "
              "mid-batch kill")
    if violations or errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
