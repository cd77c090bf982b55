"""The countdown to a merchant's daily sync across DST changes. Expected instants are worked out
by hand from each zone's published rules (not computed with zoneinfo), so they judge the code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.workspace import _next_sync


@pytest.mark.parametrize(("zone", "now_utc", "sync", "next_sync_utc"), [
    # New York: 2026-03-08 02:00 EST -> 03:00 EDT; the 03:00 sync is 07:00Z.
    ("America/New_York", datetime(2026, 3, 7, 17, 0), "03:00", datetime(2026, 3, 8, 7, 0)),
    # New York: 2026-11-01 02:00 EDT -> 01:00 EST; the 03:00 sync is 08:00Z.
    ("America/New_York", datetime(2026, 10, 31, 16, 0), "03:00", datetime(2026, 11, 1, 8, 0)),
    # London: 2026-03-29 01:00 GMT -> 02:00 BST; the 03:00 sync is 02:00Z.
    ("Europe/London", datetime(2026, 3, 28, 12, 0), "03:00", datetime(2026, 3, 29, 2, 0)),
    # London: 2026-10-25 02:00 BST -> 01:00 GMT; the 03:00 sync is 03:00Z.
    ("Europe/London", datetime(2026, 10, 24, 11, 0), "03:00", datetime(2026, 10, 25, 3, 0)),
    # Sydney: 2026-04-05 03:00 AEDT -> 02:00 AEST; the 06:00 sync is 20:00Z the day before.
    ("Australia/Sydney", datetime(2026, 4, 4, 1, 0), "06:00", datetime(2026, 4, 4, 20, 0)),
    # Sydney: 2026-10-04 02:00 AEST -> 03:00 AEDT; the 06:00 sync is 19:00Z the day before.
    ("Australia/Sydney", datetime(2026, 10, 3, 2, 0), "06:00", datetime(2026, 10, 3, 19, 0)),
    # An ordinary day, later the same day.
    ("Europe/London", datetime(2026, 7, 1, 1, 0), "03:00", datetime(2026, 7, 1, 2, 0)),
])
def test_next_sync_is_exact_across_dst(zone: str, now_utc: datetime, sync: str,
                                       next_sync_utc: datetime) -> None:
    now = now_utc.replace(tzinfo=UTC)
    assert _next_sync(sync, zone, now) == next_sync_utc.replace(tzinfo=UTC) - now


def test_next_sync_right_at_the_sync_time_is_tomorrow() -> None:
    now = datetime(2026, 7, 1, 2, 0, tzinfo=UTC)  # 03:00 BST exactly
    assert _next_sync("03:00", "Europe/London", now) == timedelta(days=1)


def test_next_sync_unknown_zone_or_no_time() -> None:
    now = datetime(2026, 7, 1, tzinfo=UTC)
    assert _next_sync(None, "Europe/London", now) is None
    assert _next_sync("03:00", "Not/AZone", now) is None
