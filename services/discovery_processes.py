"""A large discovery split over two processes (issue 11).

Discovery is CPU-bound in one Python process (decoding, classifying and storing 100,000
orders), and threads do not help: the GIL. Square's answers are read by merchant, each
merchant's rows are written in a transaction of its own, and SQLite in WAL mode (or
PostgreSQL) takes writers from several processes, so a second process can take a share of
the merchants: a fresh interpreter (`spawn`: nothing of this process's event loop, sockets
or database connections is inherited) that opens the same settings, reads its credentials
and consents from the same files and database, classifies at the same moment, and gives
back its merchants' reports. The merchants' order of the reports stays as one process
gives it.

The merchants are not dealt out beforehand: every process walks the same list and takes the
next merchant nobody has taken yet (`_claimer`, a byte per merchant in shared memory), so
the second process, which starts ~0.5 s later (a fresh interpreter's imports), simply takes
fewer, and both finish together instead of this one waiting for the other's last merchants.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import multiprocessing.process
    from multiprocessing.connection import Connection
    from multiprocessing.sharedctypes import SynchronizedArray

    from services.discovery import MerchantDiscovery
    from services.settings import ReconSettings

__all__ = ["CLAIM_WAIT_S", "MIN_MERCHANTS_PER_PROCESS", "discover_in_processes", "processes_for"]

# Below this many merchants a second interpreter's start-up (~0.5 s of CPU) costs more
# than it saves.
MIN_MERCHANTS_PER_PROCESS = 40


def processes_for(merchants: int, wanted: int) -> int:
    """How many processes a discovery of `merchants` merchants uses (at most `wanted`, at
    most the machine's cores)."""
    return max(1, min(wanted, os.cpu_count() or 1, merchants // MIN_MERCHANTS_PER_PROCESS))


# A claim holds the lock for microseconds: one held this long is a dead process's (killed,
# out of memory), and no lock of multiprocessing is released when its holder dies.
CLAIM_WAIT_S = 2.0


def _claimer(taken: SynchronizedArray[int], number: int) -> Callable[[int], bool]:
    """`discover`'s claim for process `number` (1: the console's own): merchant `index` is
    its own if nobody took it before. A lock held by a dead process is given up on: the
    merchants are then taken without it, so at worst one is discovered twice (its rows are
    replaced in one transaction), never one left out."""
    lock, raw = taken.get_lock(), taken.get_obj()  # raw: no lock of its own per item
    broken = False

    def claim(index: int) -> bool:
        nonlocal broken
        held = not broken and lock.acquire(timeout=CLAIM_WAIT_S)
        broken = not held
        try:
            if raw[index]:
                return False
            raw[index] = number
            return True
        finally:
            if held:
                lock.release()
    return claim


def _discover_share(settings: ReconSettings, merchant_ids: list[str], now: datetime,
                    full: bool, concurrency: int, taken: SynchronizedArray[int], number: int
                    ) -> list[MerchantDiscovery]:
    """The merchants this process takes (`_claimer`), as `Workspace.refresh` does."""
    from services.discovery import discover
    from services.workspace import Workspace

    async def run() -> list[MerchantDiscovery]:
        workspace = Workspace.open(settings)
        try:
            return await discover(workspace.gateway, workspace.store, workspace.credentials(),
                                  workspace.consents_by_merchant(), now,
                                  concurrency=concurrency, merchant_ids=merchant_ids,
                                  full=full, claim=_claimer(taken, number))
        finally:
            await workspace.aclose()
    return asyncio.run(run())


def _child(answer: Connection, *args: Any) -> None:
    """The second process: Ctrl-C is the console's to handle (it ends this process), and
    whatever happens is sent back, an error included, never printed here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        answer.send(("done", _discover_share(*args)))
    except Exception as error:
        try:  # as raised (a ConfigurationError stays one: exit 2), if it survives pickling
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        answer.send(("error", error))
    finally:
        answer.close()


async def discover_in_processes(
        settings: ReconSettings, merchant_ids: Sequence[str], now: datetime, full: bool,
        concurrency: int, processes: int,
        here: Callable[[list[str], int, Callable[[int], bool] | None],
                       Awaitable[list[MerchantDiscovery]]]
) -> list[MerchantDiscovery]:
    """Every merchant's report: this process discovers those it takes with `here(ids,
    concurrency, claim)`, the others theirs in fresh processes, at once (see the module's
    note); the concurrency (merchants at once, toward Square) is shared out, not multiplied.
    A second process that dies without an answer (killed, out of memory) costs time, not
    merchants: those it had taken are discovered here (again, for those it had written: a
    merchant's rows are replaced in one transaction). One cancelled (Ctrl-C) or failing here
    is ended: discovery only reads Square, and each merchant's rows are written in one
    transaction, so nothing is left half-written."""
    import multiprocessing  # here: ~20 ms of start-up that only a large discovery needs

    ids = list(merchant_ids)
    each = max(1, concurrency // processes)
    context = multiprocessing.get_context("spawn")  # nothing of this loop or its sockets
    # Which process took each merchant: 0 nobody yet, 1 this one, 2... the others.
    taken = context.Array("b", len(ids))
    children: list[tuple[multiprocessing.process.BaseProcess, Connection, int]] = []
    try:
        for number in range(2, processes + 1):
            receiving, sending = context.Pipe(duplex=False)
            started = context.Process(target=_child, daemon=True,
                                      args=(sending, settings, ids, now, full, each, taken,
                                            number))
            started.start()
            sending.close()
            children.append((started, receiving, number))
        results = [await here(ids, each, _claimer(taken, 1))]
        for _, receiving, number in children:
            try:
                kind, value = await asyncio.to_thread(receiving.recv)
            except EOFError:  # it died without a word
                results.append(await here([m for index, m in enumerate(ids)  # (`_claimer`)
                                           if taken.get_obj()[index] == number], each, None))
                continue
            if kind == "error":
                raise value
            results.append(value)
    finally:
        for child, receiving, _ in children:
            if child.is_alive():
                child.terminate()
            child.join()
            receiving.close()
    return [report for result in results for report in result]
