"""Attacks on the recalled token owner (issue 11: a token whose SHA-256 Square confirmed at
the last refresh asks for its status, profile, locations and orders at once).

The recall may only save a round trip: it must never make the gateway forget an owner
Square named in this run, nor let anything read early be written or shown when the token's
status is bad."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from services.credentials import MerchantCredentials
from services.emulator import FaultPlan, SeedConfig
from services.errors import TokenMerchantMismatch
from services.settings import ReconSettings
from services.workspace import Workspace
from tests.conftest import Emulator, async_http, make_emulator
from tests.test_token_identity import IDENTITY_CHECK, record_requests

MERCHANTS_ME = "/v2/merchants/me"


def record_searched_locations(emulator: Emulator) -> list[tuple[str, list[str]]]:
    """(bearer token, location ids) of every SearchOrders request."""
    searched: list[tuple[str, list[str]]] = []
    handle = emulator.app._handle

    async def spy(operation: Any, request: Request) -> Any:
        if request.url.path == "/v2/orders/search":
            bearer = request.headers.get("authorization", "")[len("Bearer "):].strip()
            searched.append((bearer, orjson.loads(await request.body())["location_ids"]))
        return await handle(operation, request)

    emulator.app._handle = spy  # type: ignore[method-assign]
    return searched


def settings_for(tmp_path: Path, emulator: Emulator) -> ReconSettings:
    return ReconSettings(db=tmp_path / "recon.db", square_base_url=emulator.base_url,
                         credentials=tmp_path / "none.toml")


def creds(merchant_id: str, token: str) -> dict[str, MerchantCredentials]:
    return {merchant_id: MerchantCredentials(merchant_id=merchant_id,
                                             access_token=SecretStr(token))}


async def confirmed_once(settings: ReconSettings, emulator: Emulator,
                         own: dict[str, MerchantCredentials]) -> None:
    """A good refresh: Square confirms the token and its digest is kept on the row."""
    workspace = Workspace.open(settings, async_http(emulator), credentials=own)
    try:
        assert all(r.refreshed for r in await workspace.refresh())
    finally:
        await workspace.aclose()


async def two_merchants_a_confirmed(tmp_path: Path, **settings: Any
                                    ) -> tuple[Emulator, str, str, str, ReconSettings,
                                               dict[str, MerchantCredentials]]:
    """Two merchants, A's own token confirmed by a good refresh (its digest kept): the
    emulator, A, B, A's token, the settings (`settings` changed) and A's credentials."""
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=2))
    a, b = (m.merchant.id for m in emulator.merchants)
    token = emulator.token(0)
    kept = settings_for(tmp_path, emulator).model_copy(update=settings)
    own = creds(a, token)
    await confirmed_once(kept, emulator, own)
    return emulator, a, b, token, kept, own


def merchants_me_names(emulator: Emulator, token: str, other: str) -> asyncio.Event:
    """merchants/me answers, for `token`, that it is `other`'s (Square's second word
    disagreeing with its token status), and the token status for `token` is answered only
    after that (so the status's answer lands last). The event: merchants/me was answered."""
    handle = emulator.app._handle
    answered = asyncio.Event()

    async def steer(operation: Any, request: Request) -> Any:
        bearer = request.headers.get("authorization", "")[len("Bearer "):].strip()
        if bearer == token and request.url.path == IDENTITY_CHECK:
            try:
                await asyncio.wait_for(answered.wait(), 5)
            except TimeoutError:  # merchants/me never asked beside it: answer anyway
                pass
        response = await handle(operation, request)
        if bearer == token and request.url.path == MERCHANTS_ME and response.status_code == 200:
            body = orjson.loads(response.body)
            body["merchant"]["id"] = other
            answered.set()
            return Response(orjson.dumps(body), media_type="application/json")
        return response

    emulator.app._handle = steer  # type: ignore[method-assign]
    return answered


async def test_a_token_status_answered_after_merchants_me_does_not_undo_its_mismatch(
        tmp_path: Path) -> None:
    """The recalled token's status and merchants/me go out at once. merchants/me says the
    token is another merchant's; the status (arriving after) says it is this one's. The
    refresh shows the mismatch, and the gateway must keep it: a later request with that token
    for this merchant (a batch completed in the same console) is refused before anything is
    sent, as it was when the status was always asked first."""
    emulator, a, b, token, settings, own = await two_merchants_a_confirmed(tmp_path)
    answered = merchants_me_names(emulator, token, b)
    workspace = Workspace.open(settings, async_http(emulator), credentials=own)
    try:
        reports = await workspace.refresh()
        assert answered.is_set()  # merchants/me went out beside the status (the recall)
        assert reports[0].token_health == "merchant_mismatch", reports[0]
        seen = record_requests(emulator)
        with pytest.raises(TokenMerchantMismatch):
            await workspace.gateway.raw(own[a], "GET", "/v2/locations")
    finally:
        await workspace.aclose()
    assert [path for _, path, _ in seen if path != IDENTITY_CHECK] == [], seen


async def test_a_mismatch_merchants_me_named_beside_a_failed_status_is_not_lost(
        tmp_path: Path) -> None:
    """The recalled token's status and merchants/me go out at once; merchants/me says the
    token is another merchant's, and the status request fails (Square unavailable). What
    merchants/me said stands: the merchant shows the mismatch, the digest is forgotten (the
    next refresh asks before anything else) and nothing stored under it stays a candidate."""
    emulator, a, b, token, settings, own = await two_merchants_a_confirmed(tmp_path,
                                                                           read_retries=0)
    answered = merchants_me_names(emulator, token, b)
    steered = emulator.app._handle

    async def status_unavailable(operation: Any, request: Request) -> Any:
        response = await steered(operation, request)
        if request.url.path == IDENTITY_CHECK:
            return Response(b'{"errors":[{"category":"API_ERROR","code":"SERVICE_UNAVAILABLE"}]}',
                            status_code=503, media_type="application/json")
        return response

    emulator.app._handle = status_unavailable  # type: ignore[method-assign]
    workspace = Workspace.open(settings, async_http(emulator), credentials=own)
    try:
        assert workspace.queue(a)
        reports = await workspace.refresh()
        assert answered.is_set()
        assert reports[0].token_health == "merchant_mismatch", reports[0]
        row = workspace.store.merchant(a)
        assert row is not None and row["token_sha256"] is None
        assert row["token_health"] == "merchant_mismatch"
        assert workspace.queue(a) == []
    finally:
        await workspace.aclose()


async def test_a_recalled_owner_gives_way_to_the_token_status(tmp_path: Path) -> None:
    """A digest recalled from the store stands only until Square answers: the token status,
    saying the token is another merchant's, wins over it, in the refresh and in the gateway
    afterwards (a recalled owner is not an answer Square gave this run)."""
    emulator, a, b, _, settings, own = await two_merchants_a_confirmed(tmp_path)
    handle = emulator.app._handle

    async def status_names_b(operation: Any, request: Request) -> Any:
        response = await handle(operation, request)
        if request.url.path == IDENTITY_CHECK and response.status_code == 200:
            body = orjson.loads(response.body)
            body["merchant_id"] = b
            return Response(orjson.dumps(body), media_type="application/json")
        return response

    emulator.app._handle = status_names_b  # type: ignore[method-assign]
    workspace = Workspace.open(settings, async_http(emulator), credentials=own)
    try:
        reports = await workspace.refresh()
        assert reports[0].token_health == "merchant_mismatch", reports[0]
        assert workspace.store.merchant(a)["token_sha256"] is None  # type: ignore[index]
        assert not workspace.gateway.owner_confirmed(own[a])
        seen = record_requests(emulator)
        with pytest.raises(TokenMerchantMismatch):
            await workspace.gateway.raw(own[a], "GET", "/v2/locations")
    finally:
        await workspace.aclose()
    assert seen == [], seen


async def test_a_token_revoked_while_its_orders_are_read_early_writes_none_of_them(
        tmp_path: Path) -> None:
    """A token confirmed at the last refresh: its orders are asked beside its status. Square
    answers the orders, then revokes the token before answering the status. The status
    decides: the health is `revoked`, and nothing of what came back early is written."""
    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=3))
    a = emulator.merchants[0].merchant.id
    token = emulator.token(0)
    settings = settings_for(tmp_path, emulator)
    own = creds(a, token)
    await confirmed_once(settings, emulator, own)
    record = emulator.square.orders_by_merchant[a][0]
    new = emulator.square.create_order(a, {"location_id": record.location_id, "line_items": [
        {"name": "x", "quantity": "1",
         "base_price_money": {"amount": 100, "currency": record.doc["total_money"]["currency"]}}]})
    handle = emulator.app._handle
    orders_read = asyncio.Event()

    async def revoke_after_the_orders(operation: Any, request: Request) -> Any:
        if request.url.path == IDENTITY_CHECK:
            try:
                await asyncio.wait_for(orders_read.wait(), 5)
            except TimeoutError:  # the orders were not asked beside the status
                pass
            emulator.square.revoke_token(token)
        response = await handle(operation, request)
        if request.url.path == "/v2/orders/search":
            orders_read.set()
        return response

    emulator.app._handle = revoke_after_the_orders  # type: ignore[method-assign]
    workspace = Workspace.open(settings, async_http(emulator), credentials=own)
    try:
        before = {o.order_id for o in workspace.queue(a)}
        assert before and new.id not in before
        reports = await workspace.refresh()
        assert orders_read.is_set()  # asked early (the recall), and answered
        assert reports[0].token_health == "revoked" and not reports[0].refreshed, reports[0]
        assert {o.order_id for o in workspace.queue(a)} == before
        row = workspace.store.merchant(a)
        assert row is not None and row["token_health"] == "revoked"
        # The digest stays: Square said whose the token is; a revoked one is refused anyway.
        assert row["token_sha256"] == hashlib.sha256(
            f"{emulator.base_url.rstrip('/')}\n{token}".encode()).hexdigest()
        assert token not in orjson.dumps(row).decode()
    finally:
        await workspace.aclose()


@pytest.mark.parametrize("kept", ["é" * 64, "", "not a digest", None, 12, b"\x00" * 32],
                         ids=["non-ascii", "empty", "not-hex", "null", "integer", "bytes"])
async def test_a_damaged_kept_digest_recalls_nothing_and_breaks_nothing(kept: object) -> None:
    """What the store holds is compared, never trusted: a damaged or edited value (not hex,
    not ASCII, not text) recalls no owner, and does not stop the refresh with a TypeError."""
    from services.square_gateway import SquareGateway

    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=1))
    a = emulator.merchants[0].merchant.id
    gateway = SquareGateway(emulator.base_url, async_http(emulator))
    try:
        own = creds(a, emulator.token(0))[a]
        gateway.recall_owner(own, kept)
        assert not gateway.owner_confirmed(own)
    finally:
        await gateway.aclose()


@pytest.mark.loopback
def test_tokens_swapped_and_shared_send_only_the_check_over_two_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Discovery shared over two processes (each recalls from the database for itself): after
    a good refresh, the file is edited so that C's and D's tokens are swapped and A's token
    is also filed under B. A (its own token, recalled) refreshes; B, C and D show the
    mismatch, with nothing but the identity check sent with C's and D's tokens, and nothing
    of theirs left in the queue."""
    from console.cli import main
    from services import discovery_processes
    from services.demo import write_demo_files
    from tests.conftest import LoopbackServer
    from tests.test_discovery_processes import count_process_shares
    from tests.test_token_identity import write_credentials

    emulator = make_emulator(SeedConfig(merchants=4, orders_per_location=3))
    a, b, c, d = (m.merchant.id for m in emulator.merchants)
    token_a, token_c, token_d = emulator.token(0), emulator.token(2), emulator.token(3)
    write_demo_files(tmp_path, emulator.merchants)
    monkeypatch.setattr(discovery_processes, "MIN_MERCHANTS_PER_PROCESS", 1)
    monkeypatch.setattr(discovery_processes.os, "cpu_count", lambda: 2)
    shared = count_process_shares(monkeypatch)
    monkeypatch.setenv("RECON_DB", str(tmp_path / "recon.db"))
    monkeypatch.setenv("RECON_DISCOVERY_PROCESSES", "2")
    monkeypatch.setenv("RECON_CREDENTIALS", str(tmp_path / "credentials.toml"))

    def queue(*args: str) -> dict[str, Any]:
        capsys.readouterr()
        main(["queue", "--json", "--include-ineligible", *args])
        out, _ = capsys.readouterr()
        return json.loads(out)

    with LoopbackServer(emulator) as server:
        monkeypatch.setenv("RECON_SQUARE_BASE_URL", server.base_url)
        first = queue()
        assert {o["merchant_id"] for o in first["orders"]} == {a, b, c, d}
        write_credentials(tmp_path / "credentials.toml",
                          {a: token_a, b: token_a, c: token_d, d: token_c})
        seen = record_requests(emulator)
        searched = record_searched_locations(emulator)
        second = queue("--full")
    assert shared == [2, 2]
    health = {m["merchant_id"]: m["token_health"] for m in second["merchants"]}
    assert health == {a: "valid", b: "merchant_mismatch", c: "merchant_mismatch",
                      d: "merchant_mismatch"}, second["merchants"]
    assert {o["merchant_id"] for o in second["orders"]} == {a}
    assert {path for _, path, token in seen if token in (token_c, token_d)} == {IDENTITY_CHECK}
    assert "/v2/orders/search" in {path for _, path, token in seen if token == token_a}
    # A's token, filed under B too, read A's orders only: B's never, not even early.
    b_locations = {loc.id for loc in emulator.square.merchant_locations(b)}
    assert searched and not b_locations & {loc for token, locs in searched if token == token_a
                                           for loc in locs}


async def test_team_consoles_on_postgres_recall_only_what_square_confirmed(
        pg_url: str, tmp_path: Path) -> None:
    """Team mode: Ann's console refreshes with the right tokens (their digests kept in the
    shared database); Bob's has them swapped. Bob's refresh sends nothing but the identity
    check with either token, and forgets the digests; Ann's next one asks before anything
    else, and refreshes. The database holds digests, never a token."""
    import psycopg

    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=3),
                             FaultPlan(latency_ms=10))
    a, b = (m.merchant.id for m in emulator.merchants)
    token_a, token_b = emulator.token(0), emulator.token(1)

    def console(home: str, entries: dict[str, str]) -> Workspace:
        (tmp_path / home).mkdir()
        settings = ReconSettings(db=pg_url, square_base_url=emulator.base_url, operator=home,
                                 credentials=tmp_path / home / "none.toml")
        return Workspace.open(settings, async_http(emulator),
                              credentials={m: creds(m, t)[m] for m, t in entries.items()})

    ann = console("ann", {a: token_a, b: token_b})
    bob = console("bob", {a: token_b, b: token_a})
    try:
        assert all(r.refreshed for r in await ann.refresh())
        assert bob.store.merchant(a)["token_sha256"] == hashlib.sha256(  # type: ignore[index]
            f"{emulator.base_url.rstrip('/')}\n{token_a}".encode()).hexdigest()
        seen = record_requests(emulator)
        reports = await bob.refresh()
        assert {r.merchant_id: r.token_health for r in reports} == {
            a: "merchant_mismatch", b: "merchant_mismatch"}
        assert {path for _, path, _ in seen} == {IDENTITY_CHECK}, seen
        assert ann.store.merchant(a)["token_sha256"] is None  # type: ignore[index]
        assert ann.queue(a) == [] and ann.queue(b) == []
        seen.clear()
        assert all(r.refreshed for r in await ann.refresh())
        # In Ann's process Square named each token's owner at her first refresh: the
        # forgotten digests cost nothing there, and her orders are back.
        assert ann.queue(a) and ann.queue(b)
    finally:
        await ann.aclose()
        await bob.aclose()
    with psycopg.connect(pg_url) as conn:
        for table in ("merchants", "orders", "audit"):
            text = str(conn.execute(f"SELECT * FROM {table}").fetchall())
            assert token_a not in text and token_b not in text


async def test_a_recalled_token_that_lost_orders_read_reads_nothing_into_the_queue(
        tmp_path: Path) -> None:
    """A token confirmed at the last refresh has since lost ORDERS_READ: its orders are asked
    beside its status (and refused), the status decides: `missing_scopes`, not refreshed,
    the queue as it was, and the refusal of the early read is not what the operator sees."""
    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=3),
                             FaultPlan(latency_ms=10))
    a = emulator.merchants[0].merchant.id
    token = emulator.token(0)
    settings = settings_for(tmp_path, emulator)
    own = creds(a, token)
    await confirmed_once(settings, emulator, own)
    held = emulator.square.tokens[token]
    held.scopes = frozenset(held.scopes - {"ORDERS_READ"})
    workspace = Workspace.open(settings, async_http(emulator), credentials=own)
    try:
        before = workspace.queue(a)
        seen = record_requests(emulator)
        reports = await workspace.refresh()
        assert "/v2/orders/search" in {path for _, path, _ in seen}  # early, and refused
        report = reports[0]
        assert report.token_health == "missing_scopes" and not report.refreshed, report
        assert "ORDERS_READ" in (report.error or "")
        assert workspace.queue(a) == before
        row = workspace.store.merchant(a)
        assert row is not None and row["token_health"] == "missing_scopes"
        assert "ORDERS_READ" not in (row["token_scopes"] or "").split(",")
    finally:
        await workspace.aclose()


async def test_a_digest_another_square_confirmed_recalls_nothing(tmp_path: Path) -> None:
    """A database used with one Square (the emulator, the sandbox) and then another: what the
    first confirmed is not taken as the second's word; the token is asked about first."""
    from services.square_gateway import SquareGateway

    emulator = make_emulator(SeedConfig(merchants=1, orders_per_location=2),
                             FaultPlan(latency_ms=20))
    a = emulator.merchants[0].merchant.id
    token = emulator.token(0)
    own = creds(a, token)
    elsewhere = SquareGateway("https://connect.squareup.com", async_http(emulator))
    here = SquareGateway(emulator.base_url, async_http(emulator))
    try:
        elsewhere.recall_owner(own[a], here.confirmation_sha256(own[a]))
        assert not elsewhere.owner_confirmed(own[a])
        here.recall_owner(own[a], here.confirmation_sha256(own[a]))
        assert here.owner_confirmed(own[a])
    finally:
        await elsewhere.aclose()
        await here.aclose()
