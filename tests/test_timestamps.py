"""Square's RFC 3339 times are read one way, and a time without a zone is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.timestamps import parse_time


def test_z_and_offsets_are_instants() -> None:
    assert parse_time("2026-11-27T08:30:00.123Z") == datetime(2026, 11, 27, 8, 30, 0, 123000,
                                                              tzinfo=UTC)
    assert parse_time("2026-11-27T10:30+02:00") == datetime(
        2026, 11, 27, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    assert parse_time("2026-11-27T10:30+02:00") == parse_time("2026-11-27T08:30Z")


def test_a_time_without_a_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="no zone"):
        parse_time("2026-11-27T10:30:00")
