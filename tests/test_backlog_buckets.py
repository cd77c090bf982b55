"""The backlog chart's day counts (issue 11): bisecting sorted creation times gives exactly what
`age_buckets` gives over the orders that existed then, edges included."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from services.workspace import _micros, _sorted_age_buckets, age_buckets


def _text(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def test_sorted_buckets_match_age_buckets_at_every_edge() -> None:
    rng = random.Random(11)
    now = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    for _ in range(200):
        moment = now - timedelta(days=rng.randint(0, 29), microseconds=rng.randint(0, 10**6))
        created = [moment - timedelta(days=d) for d in (0, 1, 3, 7, 14)]  # exactly on edges
        created += [moment - timedelta(microseconds=rng.randint(-3 * 86400 * 10**6,
                                                               40 * 86400 * 10**6))
                    for _ in range(rng.randint(0, 60))]
        orders = [SimpleNamespace(created_at=_text(c)) for c in created]
        micros = sorted(_micros(c) for c in created)
        existing = [o for o, c in zip(orders, created, strict=True) if c <= moment]
        assert _sorted_age_buckets(micros, _micros(moment), True) == \
            age_buckets(existing, moment)  # type: ignore[arg-type]
        # Today's snapshot counts an order from the future (clock skew) as under a day.
        assert _sorted_age_buckets(micros, _micros(moment), False) == \
            age_buckets(orders, moment)  # type: ignore[arg-type]
