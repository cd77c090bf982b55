"""Discovery against the emulator, with and without faults: every merchant gets a status, errors
are typed and per merchant, the queue matches what Square holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.demo import consent_for, workspace_on_emulator
from services.emulator import FaultPlan, SeedConfig
from services.errors import SquareUnavailable
from services.square_gateway import RetryPolicy
from services.workspace import Workspace
from tests.conftest import Emulator, make_emulator

FAST_RETRY = RetryPolicy(attempts=6, base_delay_s=0.01, max_delay_s=1.5)


def workspace_for(emulator: Emulator, tmp_path: Path, consent_states: dict[int, str],
                  timeout_s: float = 5.0) -> Workspace:
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, tmp_path / "recon.db",
                                      "tester", timeout_s=timeout_s, retry=FAST_RETRY)
    now = datetime.now(UTC)
    documents = [consent_for(emulator.merchants[i], now, state=state)
                 for i, state in consent_states.items()]
    if documents:
        path = tmp_path / "consents.json"
        path.write_text(json.dumps(documents))
        workspace.import_consent_files([path])
    return workspace


async def test_queue_matches_square(emulator: Emulator, tmp_path: Path) -> None:
    workspace = workspace_for(emulator, tmp_path, {0: "active", 1: "revoked"})
    try:
        reports = await workspace.refresh()
        assert all(r.error is None and r.token_health == "valid" for r in reports)
        for merchant in emulator.merchants:
            merchant_id = merchant.merchant.id
            open_in_square = {r.id for r in emulator.square.orders_by_merchant[merchant_id]
                              if r.state == "OPEN" and emulator.square.locations[
                                  r.location_id].status == "ACTIVE"}
            queued = workspace.queue(merchant_id)
            assert {o.order_id for o in queued} == open_in_square
            assert all(o.eligible or o.reason for o in queued)
        reasons = {o.reason for o in workspace.queue(emulator.merchants[1].merchant.id)}
        assert "CONSENT_REVOKED" in reasons
        assert not any(o.eligible for o in workspace.queue(emulator.merchants[1].merchant.id))
        eligible = [o for o in workspace.queue(emulator.merchants[0].merchant.id) if o.eligible]
        assert eligible and all(o.source == "Square Online" and o.due_amount == 0
                                for o in eligible)
        # Merchants without consent with candidate-looking orders are kept (reminders).
        no_consent = workspace.queue(emulator.merchants[2].merchant.id)
        assert any(o.reason == "NO_CONSENT" for o in no_consent)
        overview = {m.merchant_id: m for m in workspace.overview()}
        assert overview[emulator.merchants[0].merchant.id].consent_status == "active"
        assert overview[emulator.merchants[2].merchant.id].waiting_without_consent > 0
        # The queue JSON of interfaces.md.
        [[text, *_], *_] = workspace.store.queued_orders_json([])
        row = json.loads(text)
        assert set(row) == {"merchant_id", "order_id", "location_id", "version", "state",
                            "source", "total_money", "net_amount_due_money", "created_at",
                            "eligible", "reason", "stale", "fetched_at"}
    finally:
        await workspace.aclose()


async def test_inactive_locations_are_not_searched(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=4, orders_per_location=5))
    searched: list[list[str]] = []
    original = emulator.square.search_orders

    def spy(merchant_id: str, body: dict[str, Any]) -> Any:
        searched.append(body["location_ids"])
        return original(merchant_id, body)

    emulator.square.search_orders = spy  # type: ignore[method-assign]
    workspace = workspace_for(emulator, tmp_path, {})
    try:
        await workspace.refresh()
        merchant = emulator.merchants[3]
        inactive = [loc.id for loc in merchant.locations if loc.status == "INACTIVE"]
        assert inactive and len(searched) == 4
        assert all(loc not in ids for ids in searched for loc in inactive)
        assert not any(o.location_id in inactive for o in workspace.queue(merchant.merchant.id))
    finally:
        await workspace.aclose()


async def test_token_problems_are_per_merchant(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=5, orders_per_location=10))
    square = emulator.square
    now = datetime.now(UTC)
    square.tokens[emulator.token(0)].expires_at = now - timedelta(minutes=1)
    square.revoke_token(emulator.token(1))
    square.tokens[emulator.token(2)].scopes = frozenset({"ORDERS_READ", "PAYMENTS_READ",
                                                         "MERCHANT_PROFILE_READ"})
    square.tokens[emulator.token(3)].expires_at = now + timedelta(days=3)
    workspace = workspace_for(emulator, tmp_path, {i: "active" for i in range(5)})
    try:
        reports = {r.merchant_id: r for r in await workspace.refresh()}
        health = [reports[m.merchant.id].token_health for m in emulator.merchants]
        assert health == ["expired", "revoked", "missing_scopes", "expiring", "valid"]
        assert "re-authorize" in (reports[emulator.merchants[0].merchant.id].error or "")
        assert "ORDERS_WRITE" in (reports[emulator.merchants[2].merchant.id].error or "")
        # The merchant without ORDERS_WRITE still shows its queue; the healthy ones too.
        assert workspace.queue(emulator.merchants[2].merchant.id)
        assert workspace.queue(emulator.merchants[4].merchant.id)
        assert workspace.queue(emulator.merchants[0].merchant.id) == []
        stored = {m["merchant_id"]: m for m in workspace.store.merchants()}
        assert stored[emulator.merchants[1].merchant.id]["token_health"] == "revoked"
    finally:
        await workspace.aclose()


@pytest.mark.parametrize("plan", [
    FaultPlan(rate_limit_rps=3, seed=1),
    FaultPlan(server_error_rate=0.3, seed=2),
    FaultPlan(hang_rate=0.15, hang_seconds=3, seed=3),
    FaultPlan(latency_ms=5, jitter_ms=10, server_error_rate=0.1, seed=4),
], ids=["429-storm", "5xx", "hung", "latency+5xx"])
async def test_discovery_finishes_under_faults(tmp_path: Path, plan: FaultPlan) -> None:
    emulator = make_emulator(SeedConfig(merchants=4, orders_per_location=30), plan)
    workspace = workspace_for(emulator, tmp_path, {0: "active", 1: "active"}, timeout_s=0.4)
    try:
        reports = await workspace.refresh()
        assert len(reports) == 4
        for report in reports:
            assert report.token_health != "unknown" or report.error
        finished = [r for r in reports if r.error is None]
        # Bounded retries get through these rates; each queue is complete when no error.
        assert finished
        for report in finished:
            merchant_id = report.merchant_id
            expected = {r.id for r in emulator.square.orders_by_merchant[merchant_id]
                        if r.state == "OPEN" and emulator.square.locations[
                            r.location_id].status == "ACTIVE"}
            assert {o.order_id for o in workspace.queue(merchant_id)} == expected
    finally:
        await workspace.aclose()


async def test_square_down_is_one_sentence_per_merchant(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=5),
                             FaultPlan(server_error_rate=1.0))
    workspace = workspace_for(emulator, tmp_path, {}, timeout_s=0.5)
    try:
        reports = await workspace.refresh()
        for report in reports:
            assert report.error and "\n" not in report.error
            assert "try again" in report.error
    finally:
        await workspace.aclose()


async def test_unreachable_square_is_typed(tmp_path: Path) -> None:
    from services.settings import ReconSettings
    settings = ReconSettings(db=tmp_path / "r.db", square_base_url="http://127.0.0.1:9",
                             credentials=tmp_path / "c.toml", read_retries=0)
    workspace = Workspace.open(settings, credentials={})
    try:
        from services.credentials import MerchantCredentials
        creds = MerchantCredentials(merchant_id="M", access_token="emu-token-x")  # type: ignore[arg-type]
        with pytest.raises(SquareUnavailable) as error:
            await workspace.gateway.raw(creds, "GET", "/v2/locations")
        assert "Cannot reach Square" in str(error.value)
        assert "emu-token-x" not in str(error.value)
    finally:
        await workspace.aclose()
