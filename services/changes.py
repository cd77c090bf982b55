"""Live updates across processes: has anything an open console shows changed since it last
looked? The console asks a `ChangeFeed` and reloads only when the answer is yes.

A feed hands out an opaque, growing version. On SQLite it is the `change_counter` row that
triggers bump in every writer's own transaction (services/store.py, m009_presence), and
`wait` polls it: one primary-key read of one row per poll. A PostgreSQL store implements the
same two calls with LISTEN/NOTIFY (the same triggers NOTIFY; `wait` blocks on the socket)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from services.store import Store

__all__ = ["POLL_S", "ChangeFeed", "PolledChangeFeed"]

POLL_S = 0.25  # SQLite: how often `wait` looks (a poll costs ~10 µs; see the report)


class ChangeFeed(Protocol):
    def version(self) -> int:
        """The version now (cheap: callers ask before and after reloading)."""
        ...

    async def wait(self, since: int, timeout: float) -> int:
        """Return as soon as the version differs from `since`, or after `timeout` seconds
        with the version then (equal to `since` when nothing changed)."""
        ...


class PolledChangeFeed:
    """SQLite's feed: polls the change counter every `interval_s` on the store's connection
    (the caller's thread: a WAL read never waits for writers)."""

    def __init__(self, store: Store, interval_s: float = POLL_S) -> None:
        self.store = store
        self.interval_s = interval_s

    def version(self) -> int:
        return self.store.change_version()

    async def wait(self, since: int, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            current = self.version()
            left = deadline - loop.time()
            if current != since or left <= 0:
                return current
            await asyncio.sleep(min(self.interval_s, left))
