"""`queue --json` writes its document from a worker thread (a second SQLite connection) while the
backlog history is recorded (console/commands.py: `_queue_json_meanwhile`, issue 11). The
document must be the one the store gives once the command is over, byte for byte: in
particular, read only after every merchant's refresh is written."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.refresh import change_orders
from console.output import print_json_objects
from services.emulator import SeedConfig
from services.store import SQLiteStore
from tests.conftest import LoopbackServer, make_emulator

ROOT = Path(__file__).resolve().parents[1]


def document_from_store(db: Path, stdout: bytes) -> bytes:
    """What `print_json_objects` writes for the store's orders as they are now, with the
    command's own `merchants` part."""
    merchants = json.loads(stdout)["merchants"]
    refreshed = sorted(m["merchant_id"] for m in merchants if not m["stale"])
    store = SQLiteStore(db)
    buffer = io.BytesIO()
    real = sys.stdout
    sys.stdout = io.TextIOWrapper(buffer, encoding="utf-8")
    try:
        print_json_objects("orders", store.queued_orders_json(refreshed),
                           {"merchants": merchants})
        sys.stdout.flush()
        return buffer.getvalue()
    finally:
        sys.stdout = real
        store.close()


@pytest.mark.loopback
def test_queue_json_read_meanwhile_is_the_store_after_the_refresh(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=6,
                                        kinds=(("online_paid_open", 1),)))
    credentials = tmp_path / "credentials.toml"
    credentials.write_text("".join(
        f'[merchants.{m.merchant.id}]\naccess_token = "{emulator.token(i)}"\n'
        for i, m in enumerate(emulator.merchants)))
    os.chmod(credentials, 0o600)
    db = tmp_path / "recon.db"
    with LoopbackServer(emulator) as server:
        env = dict(os.environ, RECON_DB=str(db), RECON_SQUARE_BASE_URL=server.base_url,
                   RECON_CREDENTIALS=str(credentials))

        def queue() -> bytes:
            done = subprocess.run([sys.executable, "-m", "console.cli", "queue", "--json",
                                   "--include-ineligible"],
                                  cwd=ROOT, env=env, capture_output=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stdout

        first = queue()
        assert first == document_from_store(db, first)
        manifest = {"base_url": server.base_url,
                    "merchants": [{"merchant_id": m.merchant.id,
                                   "access_token": emulator.token(i)}
                                  for i, m in enumerate(emulator.merchants)]}
        queued = json.loads(first)["orders"]
        completed, edited = asyncio.run(change_orders(manifest, queued, 0.2,
                                                      random.Random(3)))
        assert completed and edited
        second = queue()  # a refresh by change: every change written before the read
    versions = {o["order_id"]: o["version"] for o in json.loads(second)["orders"]}
    assert not completed & set(versions)
    assert all(versions[order_id] == version for order_id, version in edited.items())
    assert second == document_from_store(db, second)
