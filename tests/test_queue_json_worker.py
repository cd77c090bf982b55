"""`queue --json` builds its document in a worker thread (a second SQLite connection) while the
refresh runs, a merchant at a time as each is written (console/commands.py:
`_QueueJsonMeanwhile`, issue 11). The document must be the one the store gives once the
command is over, byte for byte: in particular, a merchant's orders read only after its
refresh is written, whatever order the merchants finish in."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.refresh import change_orders
from console.output import print_json_objects
from services.demo import consent_for
from services.emulator import SeedConfig
from services.store import SQLiteStore
from tests.conftest import LoopbackServer, make_emulator

ROOT = Path(__file__).resolve().parents[1]


def document_from_store(db: Path, stdout: bytes, eligible_only: bool = False,
                        merchant_ids: list[str] | None = None) -> bytes:
    """What `print_json_objects` writes for the store's orders as they are now, with the
    command's own `merchants` part."""
    merchants = json.loads(stdout)["merchants"]
    refreshed = sorted(m["merchant_id"] for m in merchants if not m["stale"])
    store = SQLiteStore(db)
    buffer = io.BytesIO()
    real = sys.stdout
    sys.stdout = io.TextIOWrapper(buffer, encoding="utf-8")
    try:
        print_json_objects("orders", store.queued_orders_json(
            refreshed, eligible_only=eligible_only, merchant_ids=merchant_ids),
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


@pytest.mark.loopback
def test_queue_json_built_meanwhile_with_stale_and_unlisted_merchants(tmp_path: Path) -> None:
    """Eight merchants, two at a time (the worker reads while others are still written): one
    whose token Square now refuses (its orders stale), one whose credentials are gone (its
    orders stay, stale, never refreshed), the rest changed in Square; then the same with
    two `--merchant`s and without `--include-ineligible`. Each time the store's document."""
    emulator = make_emulator(SeedConfig(merchants=8, orders_per_location=5,
                                        kinds=(("online_paid_open", 1),)))
    ids = [m.merchant.id for m in emulator.merchants]
    credentials = tmp_path / "credentials.toml"
    consents = tmp_path / "consents.json"  # merchants 6 and 7: none (NO_CONSENT, ineligible)
    consents.write_text(json.dumps([consent_for(m, datetime.now(UTC))
                                    for m in emulator.merchants[:6]]))

    def write_credentials(indices: list[int]) -> None:
        credentials.write_text("".join(
            f'[merchants.{ids[i]}]\naccess_token = "{emulator.token(i)}"\n' for i in indices))
        os.chmod(credentials, 0o600)
    write_credentials(list(range(8)))
    db = tmp_path / "recon.db"
    with LoopbackServer(emulator) as server:
        env = dict(os.environ, RECON_DB=str(db), RECON_SQUARE_BASE_URL=server.base_url,
                   RECON_CREDENTIALS=str(credentials), RECON_MAX_CONCURRENT_MERCHANTS="2")

        def queue(*extra: str, code: int = 0) -> bytes:
            done = subprocess.run([sys.executable, "-m", "console.cli", "queue", "--json",
                                   *extra], cwd=ROOT, env=env, capture_output=True,
                                  timeout=120)
            assert done.returncode == code, done.stderr
            return done.stdout

        subprocess.run([sys.executable, "-m", "console.cli", "consent", "import",
                        str(consents)], cwd=ROOT, env=env, capture_output=True, check=True)
        first = queue("--include-ineligible")
        assert first == document_from_store(db, first)
        queued = json.loads(first)["orders"]
        assert {o["eligible"] for o in queued} == {True, False}
        manifest = {"base_url": server.base_url,
                    "merchants": [{"merchant_id": ids[i], "access_token": emulator.token(i)}
                                  for i in range(8)]}
        completed, edited = asyncio.run(change_orders(
            manifest, [o for o in queued if o["merchant_id"] not in (ids[2], ids[5])], 0.2,
            random.Random(5)))
        assert completed and edited
        emulator.square.revoke_token(emulator.token(2))
        write_credentials([0, 1, 2, 3, 4, 6, 7])  # ids[5]: no credentials any more
        second = queue("--include-ineligible", code=1)  # ids[2] not refreshed: exit 1
        second_expected = document_from_store(db, second)
        third = queue("--merchant", ids[4], "--merchant", ids[3])
        third_expected = document_from_store(db, third, eligible_only=True,
                                             merchant_ids=[ids[4], ids[3]])
    document = json.loads(second)
    stale = {o["merchant_id"] for o in document["orders"] if o["stale"]}
    assert stale == {ids[2], ids[5]}
    assert {m["merchant_id"] for m in document["merchants"]} == set(ids) - {ids[5]}
    versions = {o["order_id"]: o["version"] for o in document["orders"]}
    assert not completed & set(versions)
    assert all(versions[order_id] == version for order_id, version in edited.items())
    assert second == second_expected
    orders = json.loads(third)["orders"]
    assert {o["merchant_id"] for o in orders} == {ids[3], ids[4]}
    assert all(o["eligible"] and not o["stale"] for o in orders)
    assert third == third_expected


def test_reports_for_other_merchants_than_expected_build_the_document_after(
        tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """The worker expects the merchants with credentials to be refreshed; reports for others
    (here M2, whose orders it took for untouched, so stale) make it give up, and the command
    builds the document after the refresh, from the store as it then is."""
    from argparse import Namespace
    from types import SimpleNamespace

    from console.commands import _print_queue_document, _QueueJsonMeanwhile
    from tests.test_queue_output import hostile_rows

    store = SQLiteStore(tmp_path / "recon.db")
    with store.transaction():
        store.write_orders(hostile_rows(nul=True))
    merchants = store.merchants_with_orders()
    args = Namespace(json=True, merchant=None, include_ineligible=True, full=False)

    def report(merchant_id: str) -> SimpleNamespace:
        return SimpleNamespace(merchant_id=merchant_id, refreshed=True, business_name=None,
                               token_health="valid", error=None, orders=0, eligible=0)

    for expected in ({"M1": None}, {m: None for m in merchants}):
        workspace = SimpleNamespace(store=store, credentials=lambda e=expected: e,
                                    refresh_in_processes=lambda *_, **__: False)
        document = _QueueJsonMeanwhile(workspace, args)  # type: ignore[arg-type]
        reports = [report(m) for m in merchants]
        document.merchant_written(reports[0])
        document.all_written(reports)
        built = document.written_out()
        assert built is (len(expected) == len(merchants))
        meanwhile = capsysbinary.readouterr().out
        _print_queue_document(store, reports, args)
        after = capsysbinary.readouterr().out
        assert meanwhile == (after if built else b"")
    store.close()


def test_a_failed_refresh_stops_the_worker_and_prints_nothing(tmp_path: Path) -> None:
    """`queue --json --merchant` of a merchant without credentials: the refresh refuses (exit
    2), the worker waiting for merchants is stopped (the command exits) and nothing is
    printed on stdout."""
    credentials = tmp_path / "credentials.toml"
    credentials.write_text('[merchants.M1]\naccess_token = "EAAAl-test"\n')
    os.chmod(credentials, 0o600)
    env = dict(os.environ, RECON_DB=str(tmp_path / "recon.db"),
               RECON_SQUARE_BASE_URL="http://127.0.0.1:9", RECON_CREDENTIALS=str(credentials))
    done = subprocess.run([sys.executable, "-m", "console.cli", "queue", "--json",
                           "--merchant", "M2"], cwd=ROOT, env=env, capture_output=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert b"Unknown merchant M2" in done.stderr
    assert done.stdout == b""
