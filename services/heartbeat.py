"""Heartbeats off the event loop: a beat's commit waits for the disk, and for another
process's write lock (up to the busy timeout), and in the console the event loop is the UI
thread (one such commit on it was a 56 ms stall in bench/console_queue.py). Presence and
merchant leases both beat this way (`beat_forever`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from services.store import Store

__all__ = ["HEARTBEATS", "beat_forever", "close_after"]

T = TypeVar("T")

# Heartbeats' own threads, apart from the loop's default pool: that one also runs the
# console's reads and the PostgreSQL change feed's waits, and a beat queued behind them
# would let a lease lapse (its batch stops) or an operator show offline. Two: presence and
# a batch's leases each have one.
HEARTBEATS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="heartbeat")


def close_after(write: asyncio.Future[Any] | None, beater: Store) -> None:
    """Close a beat's own connection once its last beat is done, not under it: cancelled
    again while waiting for that beat (a batch cancelled, then the console quitting), the
    task ends with the beat still out on its thread."""
    if write is None or write.done():
        beater.close()
        return

    def closing(done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()  # its error is nobody's now: not "never retrieved"
        beater.close()
    write.add_done_callback(closing)


async def beat_forever(store: Store, every_s: float, beat: Callable[[Store], T],
                       answered: Callable[[T], None]) -> None:
    """Every `every_s`, `beat` through a connection of its own (`Store.writer`) on a
    heartbeat thread, then `answered` with what it returned, back on the loop. An in-memory
    database has no second connection: there `beat` runs on the loop, through `store`.
    Runs until cancelled; a beat still out is waited for, and its connection closed after."""
    beater = store.writer()
    out: asyncio.Future[T] | None = None
    try:
        while True:
            await asyncio.sleep(every_s)
            if beater is None:
                answered(beat(store))
                continue
            out = asyncio.get_running_loop().run_in_executor(HEARTBEATS, beat, beater)
            try:
                answer = await asyncio.shield(out)
            except asyncio.CancelledError:
                await asyncio.wait([out])  # its connection is closed only after it
                raise
            answered(answer)
    finally:
        if beater is not None and beater is not store:
            close_after(out, beater)
