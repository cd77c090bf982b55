"""Shared fixtures: a seeded emulator in-process and over loopback, and SDK clients on both."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from services.emulator import EmulatorApp, FaultPlan, SeedConfig, build_app, seed_square
from services.emulator.seed import SeededMerchant

DATA = Path(__file__).parent / "data"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@dataclass
class Emulator:
    app: EmulatorApp
    merchants: list[SeededMerchant]
    # In-process (ASGI transport): never dialled; a loopback name, as settings require of http.
    base_url: str = "http://localhost"
    exchanges: list[dict[str, Any]] = field(default_factory=list)

    @property
    def square(self) -> Any:
        return self.app.square

    def token(self, index: int = 0) -> str:
        return self.merchants[index].token.token

    def record(self, request: httpx.Request, response: httpx.Response) -> None:
        """Keep what went over the wire, for validation against Square's OpenAPI."""
        self.exchanges.append({"method": request.method, "path": request.url.path,
                               "request": request.content, "status": response.status_code,
                               "response": response.content})


def make_emulator(config: SeedConfig | None = None, faults: FaultPlan | None = None, *,
                  strict: bool = False, steering: bool = False) -> Emulator:
    square, merchants = seed_square(config or SeedConfig(merchants=3, orders_per_location=40))
    return Emulator(build_app(square, faults, strict=strict, steering=steering), merchants)


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> Path:
    """Crash logs go to the user state directory (platformdirs): a test's stay in its own."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture(autouse=True)
def four_eyes_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests written before four-eyes (issue 14) complete seeded batches far above its
    default thresholds (10,000.00 a currency); they test other things, so their thresholds are
    out of reach. tests/test_four_eyes.py sets its own, explicitly, and tests the defaults."""
    monkeypatch.setenv("RECON_FOUR_EYES_ORDERS", "1000000000")
    monkeypatch.setenv("RECON_FOUR_EYES_AMOUNT", "1000000000000")


@pytest.fixture
def emulator() -> Emulator:
    return make_emulator()


def async_http(emulator: Emulator, timeout: float = 5.0) -> httpx.AsyncClient:
    async def hook(response: httpx.Response) -> None:
        await response.aread()
        emulator.record(response.request, response)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app.asgi()),
                             base_url=emulator.base_url, timeout=timeout,
                             event_hooks={"response": [hook]})


def sync_http(emulator: Emulator) -> httpx.Client:
    def hook(response: httpx.Response) -> None:
        response.read()
        emulator.record(response.request, response)
    client = TestClient(emulator.app.asgi(), base_url=emulator.base_url,
                        raise_server_exceptions=False)
    client.event_hooks = {"response": [hook]}
    return client


class LoopbackServer:
    """The emulator served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # NODELAY
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(emulator.app.asgi(), log_level="error",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("emulator did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def loopback(emulator: Emulator) -> Iterator[LoopbackServer]:
    with LoopbackServer(emulator) as server:
        yield server


def consent_document(merchant_id: str, **changes: Any) -> dict[str, Any]:
    base = json.loads((DATA / "consent" / "valid" / "full.json").read_text())
    base["merchant_id"] = merchant_id
    base.update(changes)
    return base


@pytest.fixture(autouse=True)
def no_emulator_internal_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if any emulator built during it hit an unexpected exception. The emulator
    answers those with a 500, which the product retries as a Square outage, so an emulator bug
    would otherwise pass unseen. Injected faults are SquareErrors and do not count."""
    built: list[EmulatorApp] = []
    original = EmulatorApp.__post_init__

    def register(self: EmulatorApp) -> None:
        original(self)
        built.append(self)

    monkeypatch.setattr(EmulatorApp, "__post_init__", register)
    yield
    errors = [error for app in built for error in app.internal_errors]
    assert not errors, f"{len(errors)} emulator internal error(s); the first:\n{errors[0]}"
