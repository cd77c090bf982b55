"""Limits and back-off: how many calls may be in flight, how long to wait before the next try,
and when to stop sending to a merchant that keeps failing."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque

from services.errors import SquareRateLimited
from services.square_gateway import RetryPolicy

__all__ = ["AdaptiveLimit", "Backoff", "CircuitBreaker", "LoopBudget"]


class AdaptiveLimit:
    """Concurrency that halves on 429 and grows by one after a window of successes, up to
    `maximum`, from `initial` (default: the maximum). Only fast answers count towards
    growing: a Square that slows down under our load does not get more of it."""

    FAST_S = 1.0  # an answer slower than this does not count as a reason to grow

    def __init__(self, maximum: int, initial: int | None = None) -> None:
        self.maximum = maximum
        self.limit = max(1, min(maximum, initial if initial is not None else maximum))
        self.in_flight = 0
        self._successes = 0
        # First come, first served. A release hands its slot to the first waiter (counted in
        # `in_flight` before it runs), so a woken waiter never re-checks, and a free slot
        # costs no lock when nobody waits: two limits per UpdateOrder, 5,000 a batch.
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.backing_off_until = 0.0

    async def __aenter__(self) -> AdaptiveLimit:
        if not self._waiters and self.in_flight < self.limit:
            self.in_flight += 1
            return self
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1  # handed a slot, but cancelled before using it
                self._admit()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        self._admit()

    def _admit(self) -> None:
        """Let in exactly as many waiters as there are free slots (none while over a halved
        limit)."""
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled one is skipped here
                self.in_flight += 1
                waiter.set_result(None)

    def rate_limited(self, wait_s: float) -> None:
        self.limit = max(1, self.limit // 2)
        self._successes = 0
        self.backing_off_until = max(self.backing_off_until, time.monotonic() + wait_s)

    def succeeded(self, latency_s: float = 0.0) -> None:
        if latency_s > self.FAST_S or self.backing_off:
            self._successes = 0
            return
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self.limit += 1
            self._successes = 0

    @property
    def backing_off(self) -> bool:
        return time.monotonic() < self.backing_off_until


class Backoff:
    """The engine's waits, on the gateway's one formula (exponential with jitter, capped;
    Retry-After when Square gives one), so reads and writes back off alike."""

    def __init__(self, base_s: float, max_s: float = 10.0, rng: random.Random | None = None
                 ) -> None:
        self.policy = RetryPolicy(base_delay_s=base_s, max_delay_s=max_s,
                                  rng=rng or random.Random())

    def delay(self, attempt: int, error: BaseException | None = None) -> float:
        return self.policy.delay(attempt, error)

    def rate_limit_wait(self, waits: int, error: SquareRateLimited) -> float:
        return self.policy.delay(waits, error)


class CircuitBreaker:
    """Per merchant: after `threshold` consecutive transport or 5xx failures, stop sending to
    it (the rest of its orders are skipped as SQUARE_UNREACHABLE) instead of trying every
    order against a Square that is not answering. Any answer from Square resets the count."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._failures: dict[str, int] = {}
        self.open: dict[str, str] = {}  # merchant -> why it was given up on

    def failed(self, merchant_id: str, error: BaseException) -> None:
        count = self._failures.get(merchant_id, 0) + 1
        self._failures[merchant_id] = count
        if count >= self.threshold and merchant_id not in self.open:
            self.open[merchant_id] = (f"Stopped sending to this merchant after {count} "
                                      f"consecutive failures: {error}")

    def answered(self, merchant_id: str) -> None:
        self._failures[merchant_id] = 0

    def trip(self, merchant_id: str, why: str) -> None:
        self.open.setdefault(merchant_id, why)


class LoopBudget:
    """How long the batch may hold the event loop before it lets others run. An in-process
    Square answers without ever suspending, so one turn of the loop could otherwise run
    dozens of whole calls, and the console could neither paint nor take the cancel key.
    Past `budget_s` in one turn, a sender waits `pause_s` (a timer, not the ready queue, so
    everything else that is ready runs first)."""

    def __init__(self, budget_s: float = 0.02, pause_s: float = 0.002) -> None:
        self.budget_s = budget_s
        self.pause_s = pause_s
        self._since: float | None = None  # when the engine first ran in this loop turn

    async def turn(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            if self._since is None:
                self._since = now
                loop.call_soon(self._next_turn)  # runs in the loop's next turn
                return
            if now - self._since < self.budget_s:
                return
            await asyncio.sleep(self.pause_s)

    def _next_turn(self) -> None:
        self._since = None
