"""Who is online: every open console and every running batch command registers an operator
session and heart-beats it. A session whose last heartbeat is older than the expiry is
offline, however it ended (quit, killed, machine gone); a clean end removes it at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from services.heartbeat import beat_forever
from services.processes import HOST
from services.store import OperatorSession, Store, database_errors, now_utc, utc_text

__all__ = ["EXPIRY_S", "HEARTBEAT_S", "Presence", "online"]

HEARTBEAT_S = 5.0
# Four missed heartbeats: a console busy for a few seconds (a 50,000-order reload) stays on.
EXPIRY_S = 20.0
FORGET_AFTER = timedelta(days=1)


def online(store: Store, *, now: datetime | None = None, expiry_s: float = EXPIRY_S
           ) -> list[OperatorSession]:
    """The sessions heard from within the expiry, by operator."""
    moment = now or now_utc()
    return store.sessions(utc_text(moment - timedelta(seconds=expiry_s)))


class Presence:
    """This process's session. `start` registers it and, when an event loop runs, heart-beats
    it every `heartbeat_s` until `stop`."""

    def __init__(self, store: Store, operator: str, kind: str, *,
                 heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        now = utc_text(clock())
        self.session = OperatorSession(uuid.uuid4().hex, operator, HOST, os.getpid(), kind,
                                       now, now)
        self._task: asyncio.Task[None] | None = None
        # A beat (on its own thread) and `stop` take turns: a beat still out when the session
        # is ended would find it gone and register it again, online for the whole expiry.
        self._turn = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        self._stopped = False
        with contextlib.suppress(*database_errors()):  # a busy database: the next beat registers
            self._register()
        with contextlib.suppress(RuntimeError):  # no running loop: the caller beats
            self._task = asyncio.get_running_loop().create_task(self._beat_forever())

    def _register(self, store: Store | None = None) -> None:
        now = self.clock()
        self.session = self.session._replace(last_seen=utc_text(now))
        (store or self.store).register_session(self.session, utc_text(now - FORGET_AFTER))

    def beat(self, store: Store | None = None) -> None:
        """Heart-beat (through `store`, else the process's own); a session forgotten
        meanwhile is registered again. A busy database skips a beat (the expiry allows for
        several)."""
        store = store or self.store
        with self._turn, contextlib.suppress(*database_errors()):
            if self._stopped:
                return
            if not store.touch_session(self.session.session_id, utc_text(self.clock())):
                self._register(store)

    async def _beat_forever(self) -> None:
        # Off the event loop, on a connection of its own (services/heartbeat says why).
        await beat_forever(self.store, self.heartbeat_s, self.beat, lambda _: None)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        with self._turn:  # after a beat still out; none after this
            self._stopped = True
            with contextlib.suppress(*database_errors()):  # not removed, it simply expires
                self.store.end_session(self.session.session_id)
