"""The gateway's default wire (aiohttp, services/http_transport.py) against the emulator over
loopback: the same requests and answers as over httpx, and Square's errors, deadlines and an
unreachable host mapped to the same typed errors."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from services.credentials import MerchantCredentials
from services.discovery import OPEN_ORDERS_QUERY
from services.emulator import FaultPlan
from services.errors import (
    SquareAuthError,
    SquareNotFound,
    SquareRateLimited,
    SquareServerError,
    SquareUnavailable,
)
from services.http_transport import AiohttpWire, trust_store_context
from services.square_gateway import SQUARE_VERSION, RetryPolicy, SquareGateway
from tests.conftest import Emulator, LoopbackServer, async_http

pytestmark = pytest.mark.loopback
ONCE = RetryPolicy(attempts=1)


def creds(emulator: Emulator, index: int = 0) -> MerchantCredentials:
    return MerchantCredentials(merchant_id=emulator.merchants[index].merchant.id,
                               access_token=SecretStr(emulator.token(index)))


def spy_headers(emulator: Emulator) -> list[dict[str, str]]:
    seen: list[dict[str, str]] = []
    handle = emulator.app._handle

    async def spy(operation: Any, request: Request) -> Any:
        seen.append(dict(request.headers))
        return await handle(operation, request)

    emulator.app._handle = spy  # type: ignore[method-assign]
    return seen


async def read_all(gateway: SquareGateway, merchant: MerchantCredentials
                   ) -> list[tuple[str, int | None, str]]:
    locations = [loc.id for loc in await gateway.locations(merchant)]
    found = []
    async for page in gateway.search_orders(merchant, locations, OPEN_ORDERS_QUERY, limit=7):
        found += [(o.id, o.version, o.state) for o in page]
    return found


async def test_same_requests_and_answers_as_over_httpx(emulator: Emulator,
                                                       loopback: LoopbackServer) -> None:
    merchant = creds(emulator)
    headers = spy_headers(emulator)
    gateway = SquareGateway(loopback.base_url, retry=ONCE)
    assert isinstance(gateway._wire, AiohttpWire)
    try:
        over_aiohttp = await read_all(gateway, merchant)
        batch = await gateway.batch_retrieve(merchant, [o[0] for o in over_aiohttp[:5]])
    finally:
        await gateway.aclose()
    in_process = SquareGateway(emulator.base_url, async_http(emulator), retry=ONCE)
    try:
        assert await read_all(in_process, merchant) == over_aiohttp
    finally:
        await in_process.aclose()
    assert len(over_aiohttp) > 7  # several pages, every cursor followed
    assert [o.id for o in batch] == [o[0] for o in over_aiohttp[:5]]
    first = headers[0]
    assert first["authorization"] == f"Bearer {emulator.token(0)}"
    assert first["square-version"] == SQUARE_VERSION
    searches = [h for h in headers if h.get("content-type")]
    assert searches and all(h["content-type"] == "application/json" for h in searches)


async def test_square_errors_keep_their_types(emulator: Emulator,
                                              loopback: LoopbackServer) -> None:
    gateway = SquareGateway(loopback.base_url, retry=ONCE)
    merchant = creds(emulator)
    try:
        with pytest.raises(SquareAuthError):
            await gateway.token_status(MerchantCredentials(
                merchant_id=merchant.merchant_id, access_token=SecretStr("no-such-token")))
        with pytest.raises(SquareNotFound):
            await gateway.update_order(merchant, "NO-SUCH-ORDER", {
                "idempotency_key": "k1", "order": {"location_id": "L", "version": 1}})
        emulator.app.set_faults(FaultPlan(server_error_rate=1.0))
        with pytest.raises(SquareServerError):
            await gateway.send(merchant, "GET", "/v2/locations")
        emulator.app.set_faults(FaultPlan(rate_limit_rps=1))
        await gateway.send(merchant, "GET", "/v2/locations")  # the bucket's one request
        with pytest.raises(SquareRateLimited) as limited:
            await gateway.send(merchant, "GET", "/v2/locations")
        assert limited.value.retry_after is not None and limited.value.retry_after >= 1
    finally:
        await gateway.aclose()


async def test_a_hanging_square_is_bounded_by_the_deadline(emulator: Emulator,
                                                           loopback: LoopbackServer) -> None:
    merchant = creds(emulator)
    gateway = SquareGateway(loopback.base_url, retry=ONCE, timeout_s=0.3)
    try:
        await gateway.token_status(merchant)
        emulator.app.set_faults(FaultPlan(hang_rate=1.0, hang_seconds=3))
        with pytest.raises(SquareUnavailable, match=r"did not answer within 0\.3 s"):
            await gateway.send(merchant, "GET", "/v2/locations")
    finally:
        emulator.app.set_faults(FaultPlan())
        await gateway.aclose()


async def test_nothing_listening_is_square_unavailable(emulator: Emulator) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = SquareGateway(f"http://127.0.0.1:{port}", retry=ONCE)
    try:
        with pytest.raises(SquareUnavailable, match="Cannot reach Square at"):
            await gateway.token_status(creds(emulator))
    finally:
        await gateway.aclose()


@pytest.mark.parametrize("where", ["certifi", "SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_https_trusts_exactly_what_httpx_trusts(
        where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our https context is made without importing httpx (start-up cost), from the same trust
    store as `httpx.create_ssl_context()`: certifi's bundle, or the one the environment names."""
    import ssl

    import certifi
    import httpx

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    bundle = Path(certifi.where()).read_text()
    one = bundle[bundle.index("-----BEGIN CERTIFICATE-----"):
                 bundle.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    if where == "SSL_CERT_FILE":
        (tmp_path / "one.pem").write_text(one + "\n")
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "one.pem"))
    elif where == "SSL_CERT_DIR":
        monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    ours, theirs = trust_store_context(), httpx.create_ssl_context()
    assert ours.get_ca_certs() == theirs.get_ca_certs()
    assert len(ours.get_ca_certs()) == {"certifi": bundle.count("BEGIN CERTIFICATE"),
                                        "SSL_CERT_FILE": 1, "SSL_CERT_DIR": 0}[where]
    assert ours.cert_store_stats() == theirs.cert_store_stats()
    assert (ours.verify_mode, ours.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert (ours.minimum_version, ours.options) == (theirs.minimum_version, theirs.options)
    assert AiohttpWire()._tls_context().get_ca_certs() == theirs.get_ca_certs()


def test_the_environment_proxy_is_chosen_per_scheme_and_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once per origin (not parsed per request), as httpx would choose it: the scheme's
    proxy, none for a host in NO_PROXY."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://proxy.test:3128")
    monkeypatch.setenv("no_proxy", "inside.test")
    wire = AiohttpWire()
    for _ in range(2):  # the second time from what the first one found
        assert wire._proxy("http://square.test/v2/orders/O1") == "http://proxy.test:3128"
        assert wire._proxy("http://inside.test:8080/v2/orders/O1") is None
        assert wire._proxy("https://square.test/v2/orders/O1") is None
        assert wire._proxy("http://square.test:8080") == "http://proxy.test:3128"
