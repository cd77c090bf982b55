"""A large discovery shared over two processes (services/discovery_processes.py) gives the same
queue, the same merchant reports and the same exit code as one process, a failing merchant
included, whichever process it fell to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from console.cli import main
from services import discovery_processes
from services.demo import write_demo_files
from services.emulator import SeedConfig
from tests.conftest import LoopbackServer, make_emulator


def _queue(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db: Path,
           processes: int) -> tuple[int, dict[str, Any]]:
    monkeypatch.setenv("RECON_DB", str(db))
    monkeypatch.setenv("RECON_DISCOVERY_PROCESSES", str(processes))
    capsys.readouterr()
    code = main(["queue", "--json", "--include-ineligible"])
    out, _ = capsys.readouterr()
    return code, json.loads(out)


@pytest.mark.loopback
def test_two_processes_discover_what_one_does(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    emulator = make_emulator(SeedConfig(merchants=6, locations_per_merchant=2,
                                        orders_per_location=8))
    write_demo_files(tmp_path, emulator.merchants)
    # One merchant's token is revoked: its failure must be reported the same from either side.
    emulator.square.revoke_token(emulator.token(3))
    monkeypatch.setattr(discovery_processes, "MIN_MERCHANTS_PER_PROCESS", 2)
    shared: list[int] = []
    real = discovery_processes.discover_in_processes

    async def spy(*args: Any, **kwargs: Any) -> Any:
        shared.append(args[5])
        return await real(*args, **kwargs)
    monkeypatch.setattr("services.workspace.discover_in_processes", spy)
    with LoopbackServer(emulator) as server:
        monkeypatch.setenv("RECON_SQUARE_BASE_URL", server.base_url)
        monkeypatch.setenv("RECON_CREDENTIALS", str(tmp_path / "credentials.toml"))
        results = {}
        for processes in (1, 2):
            db = tmp_path / f"p{processes}.db"
            monkeypatch.setenv("RECON_DB", str(db))
            assert main(["consent", "import", str(tmp_path / "consents.json")]) == 0
            results[processes] = _queue(capsys, monkeypatch, db, processes)
    assert shared == [2]  # the second run was shared out, the first was not
    (code_one, one), (code_two, two) = results[1], results[2]
    assert code_one == code_two == 1  # the revoked merchant is a failure either way

    def comparable(document: dict[str, Any]) -> dict[str, Any]:
        return {"orders": [{k: v for k, v in o.items() if k != "fetched_at"}
                           for o in document["orders"]],
                "merchants": document["merchants"]}
    assert comparable(one) == comparable(two)
    # The oracle is Square's own state: every OPEN order at an ACTIVE location of every
    # merchant but the revoked one.
    revoked = emulator.merchants[3].merchant.id
    active = {loc.id for m in emulator.merchants
              for loc in emulator.square.merchant_locations(m.merchant.id)
              if loc.status == "ACTIVE"}
    assert {o["order_id"] for o in two["orders"]} == {
        r.id for r in emulator.square.orders.values()
        if r.state == "OPEN" and r.merchant_id != revoked and r.location_id in active}
    assert [m["merchant_id"] for m in two["merchants"]] == sorted(
        m.merchant.id for m in emulator.merchants)
    assert sum(m["error"] is not None for m in two["merchants"]) == 1
