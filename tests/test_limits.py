"""The engine's limits, alone and fast: concurrency that halves on 429 and grows only while
Square answers fast, the back-off waits, the per-merchant circuit breaker, and how long a batch
may hold the event loop before the console gets to paint."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.completion import limits
from services.completion.limits import AdaptiveLimit, Backoff, CircuitBreaker, LoopBudget
from services.errors import SquareRateLimited, SquareServerError


class FakeMonotonic:
    """`time.monotonic` as seen by `services.completion.limits`, moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: float = 1000.0) -> None:
        self.now = start
        monkeypatch.setattr(limits.time, "monotonic", lambda: self.now)


# ---------------------------------------------------------------- AdaptiveLimit
def test_the_starting_limit_is_the_initial_within_one_and_the_maximum() -> None:
    assert AdaptiveLimit(8).limit == 8  # no initial: start at the maximum
    assert AdaptiveLimit(8, 3).limit == 3
    assert AdaptiveLimit(8, 20).limit == 8  # never above the maximum
    assert AdaptiveLimit(8, 0).limit == 1  # never below one: a batch must make progress
    fresh = AdaptiveLimit(8)
    assert (fresh.in_flight, fresh.maximum, fresh.backing_off) == (0, 8, False)


async def test_never_more_calls_in_flight_than_the_limit_and_every_waiter_gets_a_turn(
        ) -> None:
    limit = AdaptiveLimit(3)
    release = asyncio.Event()
    inside: list[int] = []
    peak = 0

    async def call(index: int) -> None:
        nonlocal peak
        async with limit:
            inside.append(index)
            peak = max(peak, limit.in_flight)
            await release.wait()

    tasks = [asyncio.create_task(call(i)) for i in range(7)]
    for _ in range(20):  # let every task reach its slot or its wait
        await asyncio.sleep(0)
    assert (len(inside), limit.in_flight) == (3, 3)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)  # a lost wake-up would hang here
    assert sorted(inside) == list(range(7))
    assert (peak, limit.in_flight) == (3, 0)


async def test_a_release_lets_exactly_the_free_slots_in() -> None:
    limit = AdaptiveLimit(2)
    gates = [asyncio.Event() for _ in range(5)]
    entered: list[int] = []

    async def call(index: int) -> None:
        async with limit:
            entered.append(index)
            await gates[index].wait()

    tasks = [asyncio.create_task(call(i)) for i in range(5)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert entered == [0, 1]
    gates[0].set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert entered == [0, 1, 2] and limit.in_flight == 2
    for gate in gates:
        gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert limit.in_flight == 0


async def test_a_cancelled_waiter_neither_keeps_nor_loses_a_slot() -> None:
    """A waiter cancelled while it waits leaves the queue; one cancelled after a release
    handed it the slot (before it ran) gives the slot back to the next waiter."""
    limit = AdaptiveLimit(1)
    await limit.__aenter__()
    gone = asyncio.create_task(limit.__aenter__())
    handed = asyncio.create_task(limit.__aenter__())
    last = asyncio.create_task(limit.__aenter__())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    await limit.__aexit__()  # the slot goes to `handed`, the first still waiting
    assert limit.in_flight == 1 and not last.done()
    handed.cancel()  # before it got to run: the slot passes on to `last`
    for task in (gone, handed):
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.wait_for(last, 5)
    assert limit.in_flight == 1
    await limit.__aexit__()
    assert limit.in_flight == 0
    async with limit:
        assert limit.in_flight == 1


def test_a_429_halves_the_limit_down_to_one_and_backs_off_for_the_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeMonotonic(monkeypatch)
    limit = AdaptiveLimit(16, 11)
    limit.rate_limited(5.0)
    assert limit.limit == 5
    assert limit.backing_off
    clock.now += 4.9
    assert limit.backing_off
    clock.now += 0.1  # exactly the wait: over
    assert not limit.backing_off
    limit.rate_limited(30.0)
    limit.rate_limited(1.0)  # a shorter wait does not cut the longer one short
    assert limit.backing_off_until == clock.now + 30.0
    limit.rate_limited(0.0)
    assert limit.limit == 1  # 5 -> 2 -> 1 -> 1 -> never zero


def test_growth_needs_a_full_window_of_fast_answers_since_the_last_429_or_slow_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeMonotonic(monkeypatch)
    limit = AdaptiveLimit(16, 4)
    for _ in range(3):
        limit.succeeded(AdaptiveLimit.FAST_S)  # exactly FAST_S still counts as fast
    assert limit.limit == 4
    limit.succeeded(0.01)
    assert limit.limit == 5
    limit = AdaptiveLimit(16, 4)
    for _ in range(3):
        limit.succeeded(0.01)
    limit.succeeded(AdaptiveLimit.FAST_S + 0.01)  # a slow answer starts the window again
    for _ in range(3):
        limit.succeeded(0.01)
    assert limit.limit == 4
    limit.succeeded()  # the fourth fast answer in a row: one more slot
    assert limit.limit == 5
    for _ in range(4):
        limit.succeeded(0.01)  # the window restarted at the growth: 4 of 5 is not enough
    assert limit.limit == 5
    limit.succeeded(0.01)
    assert limit.limit == 6
    for _ in range(5):
        limit.succeeded(0.01)  # five towards the next window of six...
    limit.rate_limited(1.0)  # ...forgotten on a 429: 6 -> 3
    clock.now += 1.0
    for _ in range(2):
        limit.succeeded(0.01)
    assert limit.limit == 3
    limit.succeeded(0.01)
    assert limit.limit == 4


def test_no_growth_while_backing_off_and_never_past_the_maximum(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeMonotonic(monkeypatch)
    limit = AdaptiveLimit(3, 2)
    limit.rate_limited(10.0)  # 2 -> 1
    for _ in range(5):
        limit.succeeded(0.01)
    assert limit.limit == 1
    clock.now += 10.0
    for _ in range(50):
        limit.succeeded(0.01)
    assert limit.limit == 3


# ---------------------------------------------------------------- Backoff
def test_waits_grow_exponentially_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(0.5, rng=random.Random(7))
    for attempt, full in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0)):
        wait = backoff.delay(attempt)
        assert full / 2 <= wait <= full, (attempt, wait)
    assert all(backoff.delay(attempt) <= 10.0 for attempt in range(6, 12))  # default cap
    assert max(Backoff(0.5, max_s=2.0).delay(9) for _ in range(20)) <= 2.0
    jitter = {Backoff(1.0).delay(3) for _ in range(20)}  # no rng given: still jittered
    assert len(jitter) > 1 and all(2.0 <= wait <= 4.0 for wait in jitter)


def test_a_retry_after_is_honoured_up_to_the_cap() -> None:
    backoff = Backoff(0.5, max_s=10.0, rng=random.Random(1))
    throttled = SquareRateLimited(status=429, code="RATE_LIMITED", detail="slow down",
                                  retry_after=3.0)
    assert backoff.rate_limit_wait(1, throttled) == 3.0
    assert backoff.delay(1, throttled) == 3.0
    two_minutes = SquareRateLimited(status=429, code="RATE_LIMITED", detail="",
                                    retry_after=120.0)
    assert backoff.rate_limit_wait(1, two_minutes) == 10.0
    assert Backoff(0.2).rate_limit_wait(1, two_minutes) == 10.0  # the engine's cap
    without = SquareRateLimited(status=429, code="RATE_LIMITED", detail="")
    assert 1.0 <= backoff.rate_limit_wait(3, without) <= 2.0  # no Retry-After: back off


# ---------------------------------------------------------------- CircuitBreaker
def test_the_breaker_opens_after_threshold_consecutive_failures_of_one_merchant() -> None:
    breaker = CircuitBreaker(3)
    down = SquareServerError(status=503, code="SERVICE_UNAVAILABLE", detail="down")
    breaker.failed("M1", down)
    breaker.failed("M1", down)
    breaker.failed("M2", down)
    assert breaker.open == {}
    breaker.answered("M1")  # any answer resets the count
    breaker.failed("M1", down)
    breaker.failed("M1", down)
    assert breaker.open == {}
    breaker.failed("M1", down)
    assert list(breaker.open) == ["M1"]
    assert breaker.open["M1"] == ("Stopped sending to this merchant after 3 consecutive "
                                  f"failures: {down}")
    breaker.failed("M1", SquareServerError(status=500, code="INTERNAL", detail="later"))
    assert "after 3 consecutive" in breaker.open["M1"]  # the first reason is kept
    breaker.failed("M2", down)
    breaker.failed("M2", down)
    assert set(breaker.open) == {"M1", "M2"}


def test_a_trip_keeps_the_first_reason_and_a_threshold_of_one_opens_at_once() -> None:
    breaker = CircuitBreaker(1)
    breaker.trip("M1", "re-read failed")
    breaker.trip("M1", "something else")
    breaker.failed("M1", SquareServerError(status=500, code="INTERNAL", detail="x"))
    assert breaker.open == {"M1": "re-read failed"}
    breaker.failed("M2", SquareServerError(status=500, code="INTERNAL", detail="x"))
    assert "after 1 consecutive" in breaker.open["M2"]


# ---------------------------------------------------------------- LoopBudget
@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses `LoopBudget` asks for; each lets the loop turn once, without a real wait."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float) -> None:
        asked.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(limits.asyncio, "sleep", recorded_sleep)
    return asked


async def test_the_budget_yields_to_others_past_its_time_in_one_loop_turn(
        monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> None:
    clock = FakeMonotonic(monkeypatch, start=0.0)
    budget = LoopBudget()  # the defaults the engine uses: 20 ms, then a 2 ms pause
    others: list[str] = []
    asyncio.get_running_loop().call_soon(others.append, "painted")

    await budget.turn()  # the first turn starts the clock and returns at once
    clock.now = 0.019
    await budget.turn()  # within the budget: no yield, so nothing else ran
    assert (others, sleeps) == ([], [])
    clock.now = 0.02  # 20 ms held: the console must get its turn
    await budget.turn()
    assert (others, sleeps) == (["painted"], [0.002])
    clock.now = 0.039
    await budget.turn()  # the pause let the loop turn: the count started again at 0.02
    assert sleeps == [0.002]
    clock.now = 0.04
    await budget.turn()
    assert sleeps == [0.002, 0.002]


async def test_a_budget_of_its_own_pauses_for_its_own_time(
        monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> None:
    clock = FakeMonotonic(monkeypatch, start=0.0)
    budget = LoopBudget(budget_s=0.5, pause_s=0.25)
    await budget.turn()
    clock.now = 0.49
    await budget.turn()
    assert sleeps == []
    clock.now = 0.5
    await budget.turn()
    assert sleeps == [0.25]
