"""Merchant leases: one holder sends for a merchant at a time, across processes and operators
sharing a database. A lease is taken (in one transaction) before a merchant's batch or recovery
starts, heart-beaten while it runs, and released at its end. A holder that stops
heart-beating (killed, hung, machine gone) loses it when it expires; a holder on this host
whose process is gone loses it at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from datetime import datetime, timedelta

from services.heartbeat import beat_forever
from services.processes import HOST, pid_alive
from services.store import Lease, Store, database_errors, now_utc, utc_text
from services.timestamps import parse_time

__all__ = ["LeaseKeeper", "holder_gone"]

def holder_gone(lease: Lease, now: datetime | None = None) -> bool:
    """Expired, or held by a process of this host that no longer exists."""
    expires = parse_time(lease.expires_at)
    if expires <= (now or now_utc()):
        return True
    return lease.host == HOST and not pid_alive(lease.pid)


class LeaseKeeper:
    """The leases one engine holds. Use `async with` to heart-beat them while work runs."""

    def __init__(self, store: Store, operator: str, *, ttl_s: float = 30.0,
                 heartbeat_s: float = 5.0) -> None:
        self.store = store
        self.operator = operator
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self._deadline: dict[str, float] = {}  # merchant -> monotonic time our lease ends
        self._task: asyncio.Task[None] | None = None
        self._releasing: list[str] = []  # waiting for `release_soon`'s commit
        self._released = asyncio.Event()

    def take(self, merchant_id: str) -> Lease | None:
        """None when the lease is ours now; otherwise the live lease of whoever holds it."""
        return self.take_all([merchant_id])[merchant_id]

    def take_all(self, merchant_ids: list[str]) -> dict[str, Lease | None]:
        """`take` for each merchant, in one transaction (one durable commit, not one each)."""
        began = time.monotonic()  # before the expiry's clock is read: ours no longer than it
        now = now_utc()
        started, expires = utc_text(now), utc_text(now + timedelta(seconds=self.ttl_s))
        mine = [Lease(merchant_id, self.operator, HOST, os.getpid(), started, started, expires,
                      self.token) for merchant_id in merchant_ids]
        in_force = self.store.take_leases(mine, lambda lease: holder_gone(lease, now))
        holders: dict[str, Lease | None] = {}
        for merchant_id, current in zip(merchant_ids, in_force, strict=True):
            if current.token != self.token:
                holders[merchant_id] = current
            else:
                self._deadline[merchant_id] = began + self.ttl_s
                holders[merchant_id] = None
        return holders

    def holds(self, merchant_id: str) -> bool:
        """Ours and not past its expiry as we last wrote it: nobody else can have it."""
        return self._deadline.get(merchant_id, 0.0) > time.monotonic()

    def release(self, merchant_id: str) -> None:
        self.release_all([merchant_id])

    def release_all(self, merchant_ids: list[str]) -> None:
        """Those of them we hold, in one transaction."""
        mine = [m for m in merchant_ids if self._deadline.pop(m, None) is not None]
        if not mine:
            return
        with contextlib.suppress(*database_errors()):  # unreleased, they simply expire
            self.store.release_leases(mine, self.token)

    async def release_soon(self, merchant_id: str) -> None:
        """`release`, together with the merchants whose work ends in the same turn of the
        loop (a batch's merchants end together): one durable commit for them, not one each
        on the event loop. Returns once it is released."""
        self._releasing.append(merchant_id)
        if len(self._releasing) > 1:
            await self._released.wait()  # the first of this turn's releases it
            return
        released = self._released = asyncio.Event()
        try:
            await asyncio.sleep(0)  # the others ending now run first and join
        finally:
            merchant_ids, self._releasing = self._releasing, []
            try:
                self.release_all(merchant_ids)
            finally:
                released.set()

    def beat(self) -> None:
        self._answered(self._beat_through(self.store))

    def _beat_through(self, store: Store) -> tuple[set[str], float] | None:
        """Extend our leases in `store` (on a heartbeat thread, or the loop): which are still
        ours, and when the beat began; None when there was nothing to beat or the database
        refused (tried again next beat; `holds` turns false if it never succeeds)."""
        if not self._deadline:
            return None
        began = time.monotonic()  # before the expiry's clock is read: ours no longer than it
        now = now_utc()
        try:
            kept = store.heartbeat_leases(
                self.token, utc_text(now), utc_text(now + timedelta(seconds=self.ttl_s)))
        except database_errors():
            return None
        return kept, began

    def _answered(self, answer: tuple[set[str], float] | None) -> None:
        if answer is not None:
            self._kept(*answer)

    def _kept(self, kept: set[str], began: float) -> None:
        """A beat's answer (begun at `began`): our leases end `ttl_s` after it. One taken
        since it began and missing from the answer is as that take said. One taken since it
        began and in the answer ends with the beat, even if its take said later: the beat's
        UPDATE may have landed after the take and written the beat's earlier expiry over it
        (whichever came last, the row ends no sooner)."""
        for merchant_id, deadline in list(self._deadline.items()):
            if merchant_id in kept:
                self._deadline[merchant_id] = began + self.ttl_s
            elif deadline <= began + self.ttl_s:
                del self._deadline[merchant_id]  # taken over after it expired: not ours

    async def _beat_forever(self) -> None:
        # The beat's commit off the event loop (services/heartbeat); its answer is applied
        # on the loop, where `holds` is asked. A lease released meanwhile stays released:
        # the answer only updates the leases still held.
        await beat_forever(self.store, self.heartbeat_s, self._beat_through, self._answered)

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.create_task(self._beat_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.release_all(list(self._deadline))
