"""Issue 8, hole 4 (queue): an unreachable Square is an error, not a quiet success.

`queue` exits 1 when a merchant could not be refreshed, names it on stderr, keeps its cached
orders, and marks them `"stale": true` with the `fetched_at` of the last good read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.emulator import SeedConfig
from tests.conftest import LoopbackServer, make_emulator

ROOT = Path(__file__).resolve().parents[1]


def by_merchant(document: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for order in document["orders"]:
        grouped.setdefault(order["merchant_id"], []).append(order)
    return grouped


@pytest.mark.loopback
def test_hole4_queue_exits_1_and_marks_stale_when_square_unreachable(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=10))
    first_id, second_id = (m.merchant.id for m in emulator.merchants)
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(f'[merchants.{first_id}]\naccess_token = "{emulator.token(0)}"\n'
                           f'[merchants.{second_id}]\naccess_token = "{emulator.token(1)}"\n')
    os.chmod(credentials, 0o600)
    server = LoopbackServer(emulator)
    env = dict(os.environ, RECON_DB=str(tmp_path / "recon.db"), RECON_READ_RETRIES="1",
               RECON_SQUARE_BASE_URL=server.base_url, RECON_CREDENTIALS=str(credentials))

    def queue(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "console.cli", "queue",
                               "--include-ineligible", *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    with server:
        fresh = queue("--json")
        assert fresh.returncode == 0, fresh.stderr
        first = by_merchant(json.loads(fresh.stdout))
        assert set(first) == {first_id, second_id}
        assert all(o["stale"] is False and o["fetched_at"] for orders in first.values()
                   for o in orders)
        fetched_first = {m: {o["fetched_at"] for o in orders} for m, orders in first.items()}
        assert all(len(times) == 1 for times in fetched_first.values())

        # One merchant refused (its token revoked), the other refreshed.
        emulator.square.revoke_token(emulator.token(0))
        partly = queue("--json")
        assert partly.returncode == 1
        lines = [line for line in partly.stderr.splitlines() if line.startswith("not refreshed")]
        assert len(lines) == 1 and first_id in lines[0] and "stale" in lines[0]
        second = by_merchant(json.loads(partly.stdout))
        assert {o["order_id"] for o in second[first_id]} == \
            {o["order_id"] for o in first[first_id]}
        assert all(o["stale"] is True and o["fetched_at"] in fetched_first[first_id]
                   for o in second[first_id])
        assert all(o["stale"] is False and o["fetched_at"] not in fetched_first[second_id]
                   for o in second[second_id])
        merchants = {m["merchant_id"]: m for m in json.loads(partly.stdout)["merchants"]}
        assert merchants[first_id]["stale"] and not merchants[second_id]["stale"]

    # Square gone altogether: nothing listens on that port any more.
    down = queue("--json")
    assert down.returncode == 1
    lines = [line for line in down.stderr.splitlines() if line.startswith("not refreshed")]
    assert len(lines) == 2 and {first_id, second_id} == {
        m for m in (first_id, second_id) for line in lines if m in line}
    assert "Cannot reach Square" in down.stderr
    third = by_merchant(json.loads(down.stdout))
    assert {m: {o["order_id"] for o in orders} for m, orders in third.items()} == \
        {m: {o["order_id"] for o in orders} for m, orders in second.items()}
    assert all(o["stale"] is True for orders in third.values() for o in orders)
    assert {o["fetched_at"] for o in third[first_id]} == fetched_first[first_id]
    assert {o["fetched_at"] for o in third[second_id]} == \
        {o["fetched_at"] for o in second[second_id]}

    table = queue()
    assert table.returncode == 1
    assert "stale" in table.stdout and "could not be refreshed" in table.stderr
