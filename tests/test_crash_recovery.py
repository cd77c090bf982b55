"""`complete` in a subprocess against the loopback emulator, killed with SIGKILL at random
moments, then `recover`: the invariants hold and no intent is left open."""

from __future__ import annotations

import pytest

from tests.crash_harness import run_trial

TRIALS = 20


@pytest.mark.loopback
@pytest.mark.parametrize("seed", range(TRIALS))
def test_sigkill_at_a_random_moment_then_recover(seed: int) -> None:
    result = run_trial(seed)
    assert result.exit_code == -9 or result.exit_code in (0, 1)
    assert result.completed >= result.completed_before_recover
