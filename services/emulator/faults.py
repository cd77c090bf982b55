"""Injectable misbehaviour: latency, rate limits, 5xx, hung requests, lost responses, version bumps.

Each fault is a switch on `FaultPlan`; all randomness comes from one seeded generator so a test
that turns a fault on sees the same sequence every run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["FaultPlan", "TokenRateLimiter"]


class FaultPlan(BaseModel):
    """What the emulator does wrong, and how often. All rates are fractions of requests."""

    latency_ms: float = Field(0.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    rate_limit_rps: float | None = Field(None, gt=0)
    server_error_rate: float = Field(0.0, ge=0, le=1)
    hang_rate: float = Field(0.0, ge=0, le=1)
    hang_seconds: float = Field(30.0, ge=0)
    lost_response_rate: float = Field(0.0, ge=0, le=1)
    lost_response_mode: Literal["error", "hang"] = "error"
    version_bump_rate: float = Field(0.0, ge=0, le=1)
    noop_update_rate: float = Field(0.0, ge=0, le=1)
    # Operation names (e.g. "UpdateOrder") the random faults apply to; empty means all.
    operations: list[str] = Field(default_factory=list)
    seed: int = 0

    def applies_to(self, operation: str) -> bool:
        return not self.operations or operation in self.operations


@dataclass
class TokenRateLimiter:
    """A token bucket per access token: `rps` requests a second, bursts up to `rps`."""

    rps: float
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    clock: object = time.monotonic

    def retry_after(self, token: str) -> int | None:
        """None if the request may go now; otherwise whole seconds to wait (at least 1)."""
        now = self.clock()  # type: ignore[operator]
        level, last = self.buckets.get(token, (self.rps, now))
        level = min(self.rps, level + (now - last) * self.rps)
        if level >= 1:
            self.buckets[token] = (level - 1, now)
            return None
        self.buckets[token] = (level, now)
        return max(1, math.ceil((1 - level) / self.rps))

