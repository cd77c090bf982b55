"""Hundreds of crash trials: `recon-console complete` against the loopback emulator, killed with
SIGKILL at a random moment, then `recover`, then the invariants (tests/crash_harness.py).

    .venv/bin/python -m bench.crash_trials [--trials 200]
"""

from __future__ import annotations

import argparse
import time

from tests.crash_harness import run_trial


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args()
    start = time.perf_counter()
    mid_batch = completed = recovered = failures = 0
    for seed in range(args.first_seed, args.first_seed + args.trials):
        try:
            result = run_trial(seed)
        except AssertionError as error:
            failures += 1
            print(f"seed {seed}: INVARIANT BROKEN: {error}")
            continue
        completed += result.completed
        recovered += result.recovered
        if result.recovered or 0 < result.completed_before_recover < result.approved:
            mid_batch += 1
    print(f"{args.trials} trials in {time.perf_counter() - start:.0f} s: {failures} broke an "
          f"invariant; {mid_batch} were killed mid-batch; {completed} orders completed in all, "
          f"{recovered} intents settled by recover")


if __name__ == "__main__":
    main()
