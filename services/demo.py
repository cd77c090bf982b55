"""The demo: an in-process emulator with seeded merchants, demo consents in every state, tokens in
every health, and a fresh temporary database. Also what tests use to get a ready workspace.
"""

from __future__ import annotations

import json
import random
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from services.credentials import MerchantCredentials
from services.emulator import (
    EmulatedSquare,
    EmulatorApp,
    FaultPlan,
    SeedConfig,
    build_app,
    seed_square,
)
from services.emulator.seed import SeededMerchant, make_order
from services.private_files import open_private
from services.reminders.local_server import LocalSmtpServer
from services.settings import ReconSettings
from services.square_gateway import RetryPolicy
from services.workspace import Workspace

__all__ = ["DemoEnvironment", "build_demo", "consent_for", "start_demo_mail",
           "workspace_on_emulator"]

# In-process (ASGI transport): nothing is sent over a network; a loopback name passes the
# https-or-loopback rule of the settings.
EMULATOR_BASE_URL = "http://localhost"
NOTICE_SHA256 = "3f0a9d4c1b7e2a6f5d8c9b0e1a2f3d4c5b6a7e8f9d0c1b2a3e4f5d6c7b8a9e0f"


def consent_for(merchant: SeededMerchant, now: datetime, *, state: str = "active",
                locations: str | list[str] = "ALL", limits: dict[str, Any] | None = None,
                consent_id: str | None = None) -> dict[str, Any]:
    """A consent record (as a document) for a seeded merchant, in the given state."""
    effective = now - timedelta(days=30)
    expires = now + timedelta(days=335)
    revocation = None
    if state == "expiring":
        expires = now + timedelta(days=6)
    elif state == "expired":
        effective, expires = now - timedelta(days=400), now - timedelta(days=2)
    elif state == "not_yet_effective":
        effective = now + timedelta(days=3)
    elif state == "revoked":
        revocation = {"revoked_at": _text(now - timedelta(days=1)),
                      "revoked_by": "Store owner", "reason": "Handling orders in-house again"}
    scope: dict[str, Any] = {"action": "complete_fully_paid_orders",
                             "order_sources": ["Square Online"], "min_order_age_hours": 2}
    scope.update(limits or {})
    document: dict[str, Any] = {
        "consent_id": consent_id or str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                   f"demo:{merchant.merchant.id}:{state}")),
        "schema_version": 1, "merchant_id": merchant.merchant.id, "location_ids": locations,
        "grantor": {"name": f"Owner of {merchant.merchant.business_name}", "role": "Owner",
                    "email": f"owner{merchant.merchant.id[-4:].lower()}@example.com",
                    "authority": "square_account_owner"},
        "grantee": {"organisation": "Ledgerline Integrations", "role": "Integration Specialists"},
        "scope": scope,
        "notice": {"version": "2026-01", "text_sha256": NOTICE_SHA256},
        "evidence": {"method": "e_signature", "reference": f"ESIGN-{merchant.merchant.id[:8]}",
                     # Captured before it takes effect, and never in the future.
                     "captured_at": _text(min(effective, now)),
                     "captured_by": "onboarding team"},
        "effective_from": _text(effective), "expires_at": _text(expires),
    }
    if revocation:
        document["revocation"] = revocation
    return document


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def credentials_for(merchants: list[SeededMerchant], sync_times: bool = True
                    ) -> dict[str, MerchantCredentials]:
    return {m.merchant.id: MerchantCredentials(
        merchant_id=m.merchant.id, access_token=SecretStr(m.token.token),
        sync_time=time(3 + index % 4, 0) if sync_times else None)
        for index, m in enumerate(merchants)}


def workspace_on_emulator(emulator: EmulatorApp, merchants: list[SeededMerchant],
                          db: Path | str, operator: str = "demo-operator", *,
                          timeout_s: float = 10.0, retry: RetryPolicy | None = None,
                          credentials: dict[str, MerchantCredentials] | None = None,
                          home: Path | None = None) -> Workspace:
    """A workspace whose Square is the in-process emulator (httpx.ASGITransport). `home`:
    where its (unwritten) credentials file and so its checkpoint key live; by default beside
    the database file (a database URL needs one)."""
    where = home or Path(db).parent
    settings = ReconSettings(db=db, square_base_url=EMULATOR_BASE_URL, operator=operator,
                             credentials=where / "in-memory-credentials.toml",
                             request_timeout_s=timeout_s)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.asgi()),
                             base_url=EMULATOR_BASE_URL, timeout=timeout_s)
    workspace = Workspace.open(settings, http=http,
                               credentials=credentials or credentials_for(merchants),
                               retry=retry)
    workspace.gateway._owns_http = True  # the workspace closes the client it was given
    return workspace


# Which consent state each demo merchant gets, in seed order (beyond the list: none).
DEMO_CONSENT_STATES = ["active", "active", "expiring", "active", "expired", "revoked",
                       "not_yet_effective", "active", "none", "none", "active", "active",
                       "active", "none"]


@dataclass
class DemoEnvironment:
    emulator: EmulatorApp
    merchants: list[SeededMerchant]
    workspace: Workspace
    directory: Path
    mail: LocalSmtpServer | None = None   # the local SMTP server reminders go to


def build_demo(seed: int = 7, operator: str = "demo-operator", directory: Path | None = None,
               merchants: int = 14, orders_per_location: int = 40,
               heavy_orders_per_location: int = 1500, faults: FaultPlan | None = None,
               now: datetime | None = None, mail: bool = False) -> DemoEnvironment:
    """Everything `recon-console demo` needs, with no set-up: 14 merchants across every consent
    state and token health, two of them with thousands of orders. A fixed `now` freezes every
    clock (emulator, workspace, audit), for snapshots."""
    frozen = now is not None
    now = now or datetime.now(UTC)
    directory = directory or Path(tempfile.mkdtemp(prefix="recon-demo-"))
    directory.mkdir(parents=True, exist_ok=True)  # the store makes no directory but the default
    square = EmulatedSquare(rng=random.Random(seed + 1))
    if frozen:
        square.clock = lambda: now
    square, seeded = seed_square(SeedConfig(seed=seed, merchants=merchants,
                                            orders_per_location=orders_per_location), now=now,
                                 square=square)
    # Two busy merchants with thousands of orders.
    rng = random.Random(seed)
    kinds = ["online_paid_open"] * 8 + ["online_partially_paid", "point_of_sale_open"]
    for heavy in seeded[:2]:
        for location in heavy.locations:
            if location.status != "ACTIVE":
                continue
            for _ in range(heavy_orders_per_location):
                make_order(square, rng, heavy.merchant.id, location, rng.choice(kinds),
                           now - timedelta(seconds=rng.randint(3 * 3600, 30 * 86400)))
    # Token health across the board.
    if len(seeded) > 9:
        square.tokens[seeded[8].token.token].expires_at = now - timedelta(days=1)
        square.revoke_token(seeded[9].token.token, now - timedelta(hours=5))
    if len(seeded) > 11:
        square.tokens[seeded[11].token.token].expires_at = now + timedelta(days=5)
    if len(seeded) > 12:
        square.tokens[seeded[12].token.token].scopes = frozenset(
            {"ORDERS_READ", "PAYMENTS_READ", "MERCHANT_PROFILE_READ"})
    emulator = build_app(square, faults)
    workspace = workspace_on_emulator(emulator, seeded, directory / "recon.db", operator)
    if frozen:
        workspace.clock = lambda: now
    documents = []
    for index, merchant in enumerate(seeded):
        state = DEMO_CONSENT_STATES[index] if index < len(DEMO_CONSENT_STATES) else "none"
        if state == "none":
            continue
        limits = {"max_orders_per_batch": 500} if index == 0 else None
        locations: str | list[str] = "ALL"
        if index == 3:  # consent that covers only the first location
            locations = [merchant.locations[0].id]
        documents.append(consent_for(merchant, now, state=state, locations=locations,
                                     limits=limits))
    consent_file = directory / "demo-consents.json"
    consent_file.write_text(json.dumps(documents, indent=2))
    workspace.import_consent_files([consent_file])
    server = None
    if mail:
        server, mail_settings = start_demo_mail(directory / "mailbox")
        for name, value in mail_settings.items():
            setattr(workspace.settings, name, value)
    return DemoEnvironment(emulator, seeded, workspace, directory, server)


def start_demo_mail(mailbox: Path) -> tuple[LocalSmtpServer, dict[str, Any]]:
    """The demo's mail server, started, and the settings that send reminders to it.
    Reminders go to aiosmtpd on loopback, in this process; each message is also written as .eml
    into `mailbox`. Nothing leaves the machine."""
    server = LocalSmtpServer(directory=mailbox).start()
    return server, {"smtp_url": server.url(), "demo_mailbox": mailbox,
                    "reminder_from": "Ledgerline Reconciliation Team <recon@ledgerline.example>",
                    # The demo can be tried at any hour of the day.
                    "reminder_business_hours": "00:00-24:00"}


def write_demo_files(directory: Path, merchants: list[SeededMerchant]) -> None:
    """A credentials file (owner-only) and consent records for the seeded merchants, so a new
    user can try the command line against `emulator serve` in three commands."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, merchant in enumerate(merchants):
        lines.append(f"[merchants.{merchant.merchant.id}]\n"
                     f"access_token = \"{merchant.token.token}\"\n"
                     f"sync_time = \"{3 + index % 4:02d}:00\"\n")
    with open_private(directory / "credentials.toml") as handle:
        handle.write("\n".join(lines))
    now = datetime.now(UTC)
    # Every merchant but the last two consents; those two stay on the reminder list.
    documents = [consent_for(m, now) for m in merchants[:max(1, len(merchants) - 2)]]
    (directory / "consents.json").write_text(json.dumps(documents, indent=2))
