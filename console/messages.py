"""Service errors -> the one sentence an operator reads. The only place that maps them."""

from __future__ import annotations

from services.errors import ReconError


def describe(error: BaseException) -> str:
    if isinstance(error, ReconError):
        return str(error).splitlines()[0]
    return (f"Unexpected {type(error).__name__}: the action stopped and nothing further was "
            "sent; check the audit view and retry.")
