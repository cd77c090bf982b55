"""Reading the RFC 3339 times Square and our own files write (`2026-11-26T12:00:00.123Z`).

Python 3.11's `fromisoformat` reads `Z` itself; a time without a zone is refused, because
comparing it with an aware instant would silently assume one."""

from __future__ import annotations

from datetime import datetime

__all__ = ["parse_time"]


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no zone")
    return moment
