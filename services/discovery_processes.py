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
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.discovery import MerchantDiscovery
    from services.settings import ReconSettings

__all__ = ["MIN_MERCHANTS_PER_PROCESS", "discover_in_processes", "processes_for"]

# Below this many merchants a second interpreter's start-up (~0.5 s of CPU) costs more
# than it saves.
MIN_MERCHANTS_PER_PROCESS = 40


def processes_for(merchants: int, wanted: int) -> int:
    """How many processes a discovery of `merchants` merchants uses (at most `wanted`, at
    most the machine's cores)."""
    return max(1, min(wanted, os.cpu_count() or 1, merchants // MIN_MERCHANTS_PER_PROCESS))


def _discover_share(settings: ReconSettings, merchant_ids: list[str], now: datetime,
                    full: bool, concurrency: int) -> list[MerchantDiscovery]:
    """In the second process: one share of the merchants, as `Workspace.refresh` does."""
    from services.discovery import discover
    from services.workspace import Workspace

    async def run() -> list[MerchantDiscovery]:
        workspace = Workspace.open(settings)
        try:
            return await discover(workspace.gateway, workspace.store, workspace.credentials(),
                                  workspace.consents_by_merchant(), now,
                                  concurrency=concurrency, merchant_ids=merchant_ids,
                                  full=full)
        finally:
            await workspace.aclose()
    return asyncio.run(run())


async def discover_in_processes(
        settings: ReconSettings, merchant_ids: Sequence[str], now: datetime, full: bool,
        concurrency: int, processes: int,
        here: Callable[[list[str], int], Awaitable[list[MerchantDiscovery]]]
) -> list[MerchantDiscovery]:
    """Every merchant's report, in the order of `merchant_ids`: this process discovers its
    share with `here(ids, concurrency)`, the others theirs in fresh processes, at once. The
    merchants are dealt out in turn, so large and small ones spread alike; the concurrency
    (merchants at once, toward Square) is shared out, not multiplied."""
    shares = [list(merchant_ids[index::processes]) for index in range(processes)]
    each = max(1, concurrency // processes)
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(processes - 1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        others = [loop.run_in_executor(pool, _discover_share, settings, share, now, full, each)
                  for share in shares[1:]]
        mine = await here(shares[0], each)
        results = [mine, *await asyncio.gather(*others)]
    by_id = {report.merchant_id: report for result in results for report in result}
    return [by_id[merchant_id] for merchant_id in merchant_ids]
