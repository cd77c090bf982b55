"""Issue 8, hole 2: a token belongs to the merchant it is filed under.

A token filed under `[merchants.A]` that Square says is B's must complete nothing of either
merchant, show as `merchant_mismatch`, and carry nothing but the identity check itself
(RetrieveTokenStatus) to Square."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from services.credentials import MerchantCredentials
from services.demo import consent_for
from services.emulator import FaultPlan, SeedConfig
from services.errors import SquareAuthError, TokenMerchantMismatch
from services.settings import ReconSettings
from services.square_gateway import RetryPolicy
from services.workspace import Workspace
from tests.conftest import Emulator, LoopbackServer, async_http, make_emulator

ROOT = Path(__file__).resolve().parents[1]
IDENTITY_CHECK = "/oauth2/token/status"


def record_requests(emulator: Emulator) -> list[tuple[str, str, str]]:
    """(method, path, bearer token) of every request the emulator handles, whatever the client
    (in-process or a subprocess over loopback)."""
    seen: list[tuple[str, str, str]] = []
    handle = emulator.app._handle

    async def spy(operation: Any, request: Request) -> Any:
        bearer = request.headers.get("authorization", "")[len("Bearer "):].strip()
        seen.append((request.method, request.url.path, bearer))
        return await handle(operation, request)

    emulator.app._handle = spy  # type: ignore[method-assign]
    return seen


def open_orders(emulator: Emulator, merchant_id: str) -> set[str]:
    return {r.id for r in emulator.square.orders_by_merchant[merchant_id] if r.state == "OPEN"}


def write_credentials(path: Path, entries: dict[str, str]) -> Path:
    path.write_text("".join(f'[merchants.{merchant_id}]\naccess_token = "{token}"\n'
                            for merchant_id, token in entries.items()))
    os.chmod(path, 0o600)
    return path


@pytest.mark.loopback
def test_hole2_token_filed_under_wrong_merchant_completes_nothing(tmp_path: Path) -> None:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=15))
    a, b = (m.merchant.id for m in emulator.merchants)
    token_a, token_b = emulator.token(0), emulator.token(1)
    consents = tmp_path / "consents.json"
    # A consent for A only: B's orders must not be completed under it.
    consents.write_text(json.dumps([consent_for(emulator.merchants[0], datetime.now(UTC))]))
    right = write_credentials(tmp_path / "right.toml", {a: token_a})
    wrong = write_credentials(tmp_path / "wrong.toml", {a: token_b})
    open_before = {a: open_orders(emulator, a), b: open_orders(emulator, b)}
    seen = record_requests(emulator)
    with LoopbackServer(emulator) as server:
        env = dict(os.environ, RECON_DB=str(tmp_path / "recon.db"),
                   RECON_SQUARE_BASE_URL=server.base_url, RECON_READ_RETRIES="1")

        def run(credentials: Path, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "console.cli", *args,
                                   "--credentials", str(credentials)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)

        assert run(right, "consent", "import", str(consents)).returncode == 0
        # With A's own token, A has candidates: they are what the wrong token must not reach.
        first = run(right, "queue", "--json")
        assert first.returncode == 0, first.stderr
        assert any(o["eligible"] for o in json.loads(first.stdout)["orders"]
                   if o["merchant_id"] == a)

        seen.clear()
        queued = run(wrong, "queue", "--json", "--include-ineligible")
        document = json.loads(queued.stdout)
        merchant = {m["merchant_id"]: m for m in document["merchants"]}[a]
        assert merchant["token_health"] == "merchant_mismatch"
        assert merchant["eligible"] == 0 and "credentials file" in merchant["error"]
        assert token_b not in queued.stderr and b not in queued.stderr
        # Nothing of either merchant is queued through that token, cached A orders included.
        assert [o for o in document["orders"] if o["merchant_id"] in (a, b)] == []
        assert queued.returncode == 1
        assert f"not refreshed: {a}" in queued.stderr

        table = run(wrong, "queue", "--include-ineligible")
        assert table.returncode == 1 and "belongs to another merchant" in table.stderr

        completed = run(wrong, "complete", "--merchant", a, "--yes", "--json")
        results = json.loads(completed.stdout)
        assert results["summary"]["completed"] == 0 and results["batch_id"] is None
    # Both merchants' orders are untouched in Square.
    assert {a: open_orders(emulator, a), b: open_orders(emulator, b)} == open_before
    with_b = {(method, path) for method, path, token in seen if token == token_b}
    assert with_b == {("POST", IDENTITY_CHECK)}, with_b


async def test_hole2_gateway_sends_nothing_but_the_identity_check_with_a_misfiled_token(
        tmp_path: Path) -> None:
    """The engine's own calls (batch-retrieve, UpdateOrder) go through the same gate: a preview
    made while A's token was right, run after the file was changed, sends nothing with B's."""
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=15))
    a, b = (m.merchant.id for m in emulator.merchants)
    token_b = emulator.token(1)
    settings = ReconSettings(db=tmp_path / "recon.db", square_base_url=emulator.base_url,
                             credentials=tmp_path / "none.toml", operator="tester")
    consents = tmp_path / "consents.json"
    consents.write_text(json.dumps([consent_for(emulator.merchants[0], datetime.now(UTC))]))
    retry = RetryPolicy(attempts=2, base_delay_s=0.01)
    right = {a: MerchantCredentials(merchant_id=a, access_token=SecretStr(emulator.token(0)))}
    first = Workspace.open(settings, async_http(emulator), credentials=right, retry=retry)
    try:
        first.import_consent_files([consents])
        await first.refresh()
        preview = first.preview([a], record=False)
        assert preview.count > 0
    finally:
        await first.aclose()
    open_before = {a: open_orders(emulator, a), b: open_orders(emulator, b)}
    seen = record_requests(emulator)
    wrong = {a: MerchantCredentials(merchant_id=a, access_token=SecretStr(token_b))}
    second = Workspace.open(settings, async_http(emulator), credentials=wrong, retry=retry)
    try:
        # Straight to the engine, without a refresh: only the gateway stands in the way.
        await second.complete(preview)
        with pytest.raises(TokenMerchantMismatch) as raised:
            await second.gateway.batch_retrieve(wrong[a], [preview.items[0].order_id])
        assert isinstance(raised.value, SquareAuthError)
        assert raised.value.code == "TOKEN_MERCHANT_MISMATCH"
        message = str(raised.value)
        assert a in message and "credentials file" in message
        assert token_b not in message and b not in message
        with pytest.raises(TokenMerchantMismatch):  # the SDK calls too
            await second.gateway.locations(wrong[a])
        # Discovery marks it, drops A's stored orders, and preview holds nothing of A.
        reports = await second.refresh()
        assert reports[0].token_health == "merchant_mismatch" and not reports[0].refreshed
        assert second.queue(a) == [] and second.preview([a], record=False).count == 0
    finally:
        await second.aclose()
    assert {a: open_orders(emulator, a), b: open_orders(emulator, b)} == open_before
    with_b = {(method, path) for method, path, token in seen if token == token_b}
    assert with_b == {("POST", IDENTITY_CHECK)}, with_b
    # Asked once per token per process, however many calls wanted it.
    assert sum(1 for _, path, token in seen if token == token_b and path == IDENTITY_CHECK) == 2


async def test_hole2_merchant_with_mismatched_token_is_held_back(tmp_path: Path) -> None:
    """Orders already stored for a merchant whose token is marked as another's are held back
    from a preview with TOKEN_MERCHANT_MISMATCH."""
    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=15))
    a = emulator.merchants[0].merchant.id
    settings = ReconSettings(db=tmp_path / "recon.db", square_base_url=emulator.base_url,
                             credentials=tmp_path / "none.toml", operator="tester")
    consents = tmp_path / "consents.json"
    consents.write_text(json.dumps([consent_for(emulator.merchants[0], datetime.now(UTC))]))
    right = {a: MerchantCredentials(merchant_id=a, access_token=SecretStr(emulator.token(0)))}
    workspace = Workspace.open(settings, async_http(emulator), credentials=right)
    try:
        workspace.import_consent_files([consents])
        await workspace.refresh()
        assert workspace.preview([a], record=False).count > 0
        workspace.store.upsert_merchant({"merchant_id": a, "token_health": "merchant_mismatch"})
        preview = workspace.preview([a], record=False)
        assert preview.count == 0 and preview.held_back
        assert {reason for _, reason in preview.held_back} == {"TOKEN_MERCHANT_MISMATCH"}
    finally:
        await workspace.aclose()


async def test_hole2_console_shows_token_merchant_mismatch(tmp_path: Path) -> None:
    from textual.widgets import DataTable

    from console.screens.merchants import MerchantsScreen
    from tests.console_harness import app_for, demo, merchants_loaded, wait_until

    environment = demo(tmp_path)
    filed, owner = environment.merchants[0], environment.merchants[1]  # both with consent
    credentials = environment.workspace.credentials()
    credentials[filed.merchant.id] = MerchantCredentials(
        merchant_id=filed.merchant.id, access_token=SecretStr(owner.token.token))
    app = app_for(environment)
    async with app.run_test(size=(160, 45)) as pilot:
        await wait_until(pilot, merchants_loaded(app))
        screen = app.screen
        assert isinstance(screen, MerchantsScreen)
        row = {r.merchant_id: r for r in screen.rows}[filed.merchant.id]
        assert row.token_health == "merchant_mismatch" and row.candidates == 0
        assert "belongs to another merchant" in (row.error or "")
        cells = screen.query_one("#merchants", DataTable).get_row(filed.merchant.id)
        assert str(cells[2]) == "merchant mismatch"
        # The owner's own entry is untouched: its orders stay under its own id.
        assert {r.merchant_id: r for r in screen.rows}[owner.merchant.id].candidates > 0


async def test_hole2_identity_is_asked_once_per_token_under_concurrency(tmp_path: Path) -> None:
    # Latency makes the in-process answers yield, so the calls really overlap.
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=2),
                             FaultPlan(latency_ms=5))
    a = emulator.merchants[0].merchant.id
    seen = record_requests(emulator)
    settings = ReconSettings(db=tmp_path / "recon.db", square_base_url=emulator.base_url,
                             credentials=tmp_path / "none.toml")
    workspace = Workspace.open(settings, async_http(emulator), credentials={})
    own = MerchantCredentials(merchant_id=a, access_token=SecretStr(emulator.token(0)))
    other = MerchantCredentials(merchant_id=a, access_token=SecretStr(emulator.token(1)))
    try:
        calls = [workspace.gateway.raw(creds, "GET", "/v2/locations")
                 for creds in (own, other) for _ in range(20)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await workspace.aclose()
    assert all(isinstance(x, dict) for x in answers[:20])
    assert all(isinstance(x, TokenMerchantMismatch) for x in answers[20:])
    checks = [token for _, path, token in seen if path == IDENTITY_CHECK]
    assert sorted(checks) == sorted([emulator.token(0), emulator.token(1)])
    assert [path for _, path, token in seen if token == emulator.token(1)] == [IDENTITY_CHECK]


def token_status_naming_nobody(emulator: Emulator) -> list[tuple[str, str]]:
    """RetrieveTokenStatus answered without `merchant_id`; (method, path) of every request."""
    import orjson
    from starlette.responses import Response

    seen: list[tuple[str, str]] = []
    handle = emulator.app._handle

    async def strip(operation: Any, request: Request) -> Any:
        seen.append((request.method, request.url.path))
        response = await handle(operation, request)
        if request.url.path == IDENTITY_CHECK and response.status_code == 200:
            body = orjson.loads(response.body)
            assert body.pop("merchant_id")
            return Response(orjson.dumps(body), media_type="application/json")
        return response

    emulator.app._handle = strip  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("wire", ["in-process", "loopback"])
async def test_a_token_status_naming_nobody_is_settled_by_the_sdk_merchants_me(
        wire: str) -> None:
    """The SDK's one remaining call (imported only then, services/square_gateway.py): the
    owner asked of `merchants/me`, over the client handed in or the gateway's own."""
    from services.square_gateway import SquareGateway

    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=1))
    a, b = (m.merchant.id for m in emulator.merchants)
    seen = token_status_naming_nobody(emulator)
    right = MerchantCredentials(merchant_id=a, access_token=SecretStr(emulator.token(0)))
    misfiled = MerchantCredentials(merchant_id=a, access_token=SecretStr(emulator.token(1)))
    with LoopbackServer(emulator) as server:
        gateway = (SquareGateway(emulator.base_url, async_http(emulator))
                   if wire == "in-process" else SquareGateway(server.base_url))
        try:
            await gateway.ensure_identity(right)
            with pytest.raises(TokenMerchantMismatch) as raised:
                await gateway.ensure_identity(misfiled)
            assert f"(…{b[-4:]})" in str(raised.value)  # B's, as merchants/me said
        finally:
            await gateway.aclose()
    assert seen == [("POST", IDENTITY_CHECK), ("GET", "/v2/merchants/me")] * 2


def record_request_spans(emulator: Emulator) -> list[tuple[str, str]]:
    """("start" | "end", path) of every request, in the order the emulator began and
    finished handling them."""
    spans: list[tuple[str, str]] = []
    handle = emulator.app._handle

    async def spy(operation: Any, request: Request) -> Any:
        spans.append(("start", request.url.path))
        try:
            return await handle(operation, request)
        finally:
            spans.append(("end", request.url.path))

    emulator.app._handle = spy  # type: ignore[method-assign]
    return spans


async def test_a_token_square_confirmed_before_asks_for_orders_beside_its_status(
        tmp_path: Path) -> None:
    """Issue 11: a refresh with the token Square confirmed at the last one (its SHA-256 kept
    on the merchant's row, never the token) asks for the token's status, the profile, the
    locations and the orders at once: one round trip, not two."""
    import hashlib

    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=3),
                             FaultPlan(latency_ms=40))
    a = emulator.merchants[0].merchant.id
    token = emulator.token(0)
    settings = ReconSettings(db=tmp_path / "recon.db", square_base_url=emulator.base_url,
                             credentials=tmp_path / "none.toml")
    own = {a: MerchantCredentials(merchant_id=a, access_token=SecretStr(token))}
    handle = emulator.app._handle
    for run in range(2):  # each refresh in its own workspace: nothing carried over in memory
        emulator.app._handle = handle  # type: ignore[method-assign]
        spans = record_request_spans(emulator)
        workspace = Workspace.open(settings, async_http(emulator), credentials=own)
        try:
            reports = await workspace.refresh()
            assert reports[0].refreshed, reports[0].error
            stored = workspace.store.merchant(a)
        finally:
            await workspace.aclose()
        assert stored is not None
        # Of the token and the Square that confirmed it, never the token itself.
        assert stored["token_sha256"] == hashlib.sha256(
            f"{emulator.base_url.rstrip('/')}\n{token}".encode()).hexdigest()
        check_over = spans.index(("end", IDENTITY_CHECK))
        asked_orders = spans.index(("start", "/v2/orders/search"))
        if run == 0:  # never confirmed before: nothing else goes out until the check is over
            assert spans[:check_over + 1] == [("start", IDENTITY_CHECK), ("end", IDENTITY_CHECK)]
        else:
            assert asked_orders < check_over, spans
    assert token.encode() not in (tmp_path / "recon.db").read_bytes()


async def test_swapped_tokens_send_nothing_but_the_check_after_a_good_refresh(
        tmp_path: Path) -> None:
    """Each merchant's token was confirmed (and its digest kept); then the file is edited so
    each token is under the other merchant. The kept digests are not these tokens': every
    request with them waits for, and stops at, the identity check. (Latency, so that
    requests started beside the check would reach the emulator before its answer.)"""
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=5),
                             FaultPlan(latency_ms=20))
    a, b = (m.merchant.id for m in emulator.merchants)
    token_a, token_b = emulator.token(0), emulator.token(1)
    settings = ReconSettings(db=tmp_path / "recon.db", square_base_url=emulator.base_url,
                             credentials=tmp_path / "none.toml")

    def creds(entries: dict[str, str]) -> dict[str, MerchantCredentials]:
        return {m: MerchantCredentials(merchant_id=m, access_token=SecretStr(t))
                for m, t in entries.items()}

    workspace = Workspace.open(settings, async_http(emulator),
                               credentials=creds({a: token_a, b: token_b}))
    try:
        assert all(r.refreshed for r in await workspace.refresh())
    finally:
        await workspace.aclose()
    seen = record_requests(emulator)
    swapped = Workspace.open(settings, async_http(emulator),
                             credentials=creds({a: token_b, b: token_a}))
    try:
        reports = await swapped.refresh()
        assert {r.merchant_id: r.token_health for r in reports} == {
            a: "merchant_mismatch", b: "merchant_mismatch"}
        assert swapped.store.merchant(a)["token_sha256"] is None  # type: ignore[index]
        assert swapped.queue(a) == [] and swapped.queue(b) == []
    finally:
        await swapped.aclose()
    assert {path for _, path, _ in seen} == {IDENTITY_CHECK}, seen
