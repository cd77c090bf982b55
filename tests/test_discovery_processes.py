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


def count_process_shares(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of processes each discovery shared out over, as it was shared (none for a
    discovery in one process)."""
    shared: list[int] = []
    real = discovery_processes.discover_in_processes

    async def spy(*args: Any, **kwargs: Any) -> Any:
        shared.append(args[5])
        return await real(*args, **kwargs)
    monkeypatch.setattr("services.workspace.discover_in_processes", spy)
    return shared


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
    shared = count_process_shares(monkeypatch)
    # `queue --json` builds its document during the refresh, but not beside a discovery
    # shared out over processes (both cores busy discovering: it made that one ~1 s slower).
    from console import commands
    built_meanwhile: list[int] = []
    real_build = commands._QueueJsonMeanwhile._build

    def build_spy(self: Any, refreshed: set[str]) -> None:
        built_meanwhile.append(len(shared))
        real_build(self, refreshed)
    monkeypatch.setattr(commands._QueueJsonMeanwhile, "_build", build_spy)
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
        # A refresh by change reads little: not worth a second interpreter.
        code, again = _queue(capsys, monkeypatch, tmp_path / "p2.db", 2)
        assert shared == [2] and code == 1
        assert built_meanwhile == [0, 1]  # the first run's and this one's, not the shared one
        assert {o["order_id"] for o in again["orders"]} == {
            o["order_id"] for o in results[2][1]["orders"]}
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


def _dies_without_a_word(answer: Any, *args: Any) -> None:
    """A second process killed before it could answer (run in the spawned interpreter)."""
    import os
    os._exit(9)


def _refuses(answer: Any, *args: Any) -> None:
    from services.errors import ConfigurationError
    answer.send(("error", ConfigurationError("the credentials file changed meanwhile")))


@pytest.mark.loopback
def test_a_second_process_that_dies_costs_time_not_merchants(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    emulator = make_emulator(SeedConfig(merchants=4, locations_per_merchant=1,
                                        orders_per_location=5))
    write_demo_files(tmp_path, emulator.merchants)
    monkeypatch.setattr(discovery_processes, "MIN_MERCHANTS_PER_PROCESS", 2)
    with LoopbackServer(emulator) as server:
        monkeypatch.setenv("RECON_SQUARE_BASE_URL", server.base_url)
        monkeypatch.setenv("RECON_CREDENTIALS", str(tmp_path / "credentials.toml"))
        documents = {}
        for name, child in (("one", None), ("died", _dies_without_a_word)):
            db = tmp_path / f"{name}.db"
            monkeypatch.setenv("RECON_DB", str(db))
            assert main(["consent", "import", str(tmp_path / "consents.json")]) == 0
            if child is not None:
                monkeypatch.setattr(discovery_processes, "_child", child)
            code, documents[name] = _queue(capsys, monkeypatch, db, 1 if child is None else 2)
            assert code == 0
        # Its merchants were discovered here instead: the same queue as one process's.
        assert sorted(o["order_id"] for o in documents["died"]["orders"]) == sorted(
            o["order_id"] for o in documents["one"]["orders"])
        assert len(documents["died"]["merchants"]) == 4

        monkeypatch.setattr(discovery_processes, "_child", _refuses)
        monkeypatch.setenv("RECON_DB", str(tmp_path / "refused.db"))
        assert main(["consent", "import", str(tmp_path / "consents.json")]) == 0
        capsys.readouterr()
        assert main(["queue", "--json"]) == 2  # its error is this command's: a usage error
        out, err = capsys.readouterr()
        assert out == "" and "the credentials file changed meanwhile" in err
        assert "Traceback" not in err


def _takes_two_then_dies(answer: Any, settings: Any, ids: list[str], now: Any, full: bool,
                         concurrency: int, taken: Any, number: int, marker: str = "") -> None:
    """A second process that took the second and fourth merchants, then was killed."""
    import os
    from pathlib import Path

    for index in (1, 3):
        assert discovery_processes._claimer(taken, number)(index)
    Path(ids[0]).with_name("taken").write_text("")
    os._exit(9)


def test_merchants_a_dead_process_had_taken_are_discovered_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every merchant is discovered exactly once by whoever took it first, and those a second
    process had taken when it died are discovered here after all."""
    import asyncio
    import time

    ids = [str(tmp_path / f"M{n}") for n in range(5)]  # names the child can write beside
    monkeypatch.setattr(discovery_processes, "_child", _takes_two_then_dies)
    calls: list[tuple[list[str], bool]] = []

    async def here(merchants: list[str], concurrency: int, claim: Any) -> list[Any]:
        if claim is not None:  # let the child take its two first
            deadline = time.monotonic() + 60
            while not (tmp_path / "taken").exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        calls.append((merchants, claim is not None))
        return [m for index, m in enumerate(merchants) if claim is None or claim(index)]

    reports = asyncio.run(discovery_processes.discover_in_processes(
        None, ids, None, False, 4, 2, here))  # type: ignore[arg-type]
    assert calls == [(ids, True), ([ids[1], ids[3]], False)]
    assert sorted(map(str, reports)) == ids and len(reports) == len(ids)


def _dies_holding_the_claims(answer: Any, settings: Any, ids: list[str], now: Any,
                             full: bool, concurrency: int, taken: Any, number: int) -> None:
    """A second process killed (out of memory, say) while it held the claims' lock, having
    just taken the second merchant."""
    import os
    from pathlib import Path

    assert taken.get_lock().acquire(timeout=60)
    taken.get_obj()[1] = number
    Path(ids[0]).with_name("taken").write_text("")
    os._exit(9)


def test_a_process_that_dies_holding_the_claims_lock_costs_time_not_merchants(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No lock of multiprocessing is released when the process holding it dies: waited for
    as it was, this process hung for ever on its next claim. A claim holds it for a few
    microseconds, so one held for seconds is a dead holder's: the merchants are then taken
    without it (at worst one discovered twice, never one left out)."""
    import asyncio
    import threading
    import time

    monkeypatch.setattr(discovery_processes, "CLAIM_WAIT_S", 0.2)
    ids = [str(tmp_path / f"M{n}") for n in range(5)]
    monkeypatch.setattr(discovery_processes, "_child", _dies_holding_the_claims)
    calls: list[tuple[list[str], bool]] = []

    async def here(merchants: list[str], concurrency: int, claim: Any) -> list[Any]:
        if claim is not None:  # once the child holds the lock (and has died)
            deadline = time.monotonic() + 60
            while not (tmp_path / "taken").exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        calls.append((merchants, claim is not None))
        return [m for index, m in enumerate(merchants) if claim is None or claim(index)]

    reports: list[Any] = []
    # In a thread: without the fix it never returns (a daemon thread, left blocked).
    thread = threading.Thread(target=lambda: reports.extend(asyncio.run(
        discovery_processes.discover_in_processes(
            None, ids, None, False, 4, 2, here))), daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "a claim waited for ever for a dead process's lock"
    assert calls == [(ids, True), ([ids[1]], False)]
    assert sorted(map(str, reports)) == ids and len(reports) == len(ids)
