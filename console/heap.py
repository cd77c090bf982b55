"""Letting go of a large queue without stalling the UI thread.

Freeing 100,000 queue rows (a row, its line, its order and their strings: about two million
objects) takes ~50 ms, in one piece: the last reference to a tuple of rows frees them all in one
C call that holds the GIL. Where that happened (a reload swapping the rows, a popped queue
screen collected by the cyclic collector) every key waited it out. `release_gradually` hands the
references to a thread that drops them a slice at a time, letting the GIL go between slices.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Collection

__all__ = ["SLICE", "release_gradually"]

# Items freed between two GIL hand-overs: ~0.5 ms of work for queue rows.
SLICE = 1_000
# How long the thread waits for the caller to let go of the collections (a caller drops them
# when it returns); past that, someone else keeps them and freeing is theirs.
WAIT_S = 1.0


def release_gradually(*collections: Collection[object]) -> threading.Thread | None:
    """Free these collections' items (a dict's values) from a daemon thread, `SLICE` at a
    time, once the caller has dropped its references to the collections. Items referred to
    elsewhere only lose a reference. Returns the thread; None when they are too small to
    matter (freed by the caller as usual)."""
    if sum(len(c) for c in collections) <= SLICE:
        return None
    thread = threading.Thread(target=_drain, args=(list(collections),), name="release",
                              daemon=True)
    thread.start()
    return thread


def _drain(held: list[Collection[object]]) -> None:
    # Until only `held` refers to each collection (getrefcount also counts `held`'s item,
    # the loop's variable and its own argument): had the caller dropped one after this
    # thread took its items apart, the caller would have freed them all at once.
    deadline = time.monotonic() + WAIT_S
    while (any(sys.getrefcount(c) > 3 for c in held)
           and time.monotonic() < deadline):
        time.sleep(0.001)
    pieces: list[object] = []
    for collection in held:
        pieces.extend(collection.values() if isinstance(collection, dict) else collection)
    held.clear()  # the collections go: their items are all still in `pieces`
    while pieces:
        del pieces[-SLICE:]
        time.sleep(0.001)  # lets the GIL go: a key pressed now is handled before the next slice
