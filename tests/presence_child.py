"""Another operator's process for the presence tests: registers an operator session on the
database (heart-beaten every 0.2 s), optionally takes a merchant's lease (heart-beaten too),
prints "ready", and waits to be killed.

    python -m tests.presence_child DB OPERATOR [MERCHANT_ID]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from services.completion.leases import LeaseKeeper
from services.presence import Presence
from services.store import Store


async def main(db: Path, operator: str, merchant_id: str | None) -> None:
    store = Store(db)
    Presence(store, operator, "console", heartbeat_s=0.2).start()
    keeper = LeaseKeeper(store, operator, ttl_s=60.0, heartbeat_s=0.5)
    if merchant_id is not None and keeper.take(merchant_id) is not None:
        raise SystemExit(f"{merchant_id} is leased already")
    async with keeper:
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
