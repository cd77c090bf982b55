"""A heartbeat held on its thread, for tests of what happens while it is out."""

from __future__ import annotations

import threading
from typing import Any

from services.store import Store


def hold_beats(store: Store, method: str) -> tuple[threading.Event, threading.Event, list[str]]:
    """Connections `store.writer()` makes from now on hold each `method` call (a beat): it
    sets `out` and waits for `answer` before running. `events` records "beat done" and
    "closed" (the connection's close), in order."""
    out, answer = threading.Event(), threading.Event()
    events: list[str] = []
    writer = store.writer

    def held_writer() -> Store:
        own = writer()
        assert own is not None
        beat, close = getattr(own, method), own.close

        def held(*args: Any) -> Any:
            out.set()
            assert answer.wait(5)
            try:
                return beat(*args)
            finally:
                events.append("beat done")

        def closing() -> None:
            events.append("closed")
            close()
        setattr(own, method, held)
        own.close = closing  # type: ignore[method-assign]
        return own

    store.writer = held_writer  # type: ignore[method-assign]
    return out, answer, events
