"""Settings from flags and `RECON_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import getpass
import ipaddress
import unicodedata
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PG_POOL_MAX", "SQUARE_BASE_URLS", "ReconSettings", "check_base_url", "check_db_path",
           "default_credentials_path", "default_db_path", "default_keymap_path"]

SQUARE_BASE_URLS = {
    "production": "https://connect.squareup.com",
    "sandbox": "https://connect.squareupsandbox.com",
}
APP_NAME = "recon-console"
# Team mode: the most connections one process's PostgreSQL pool opens (docs/scaling.md counts
# them). Every thread holds at most one at a time, and LISTEN has its own outside the pool.
PG_POOL_MAX = 4


def default_db_path() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME)) / "recon.db"


def default_credentials_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "credentials.toml"


def default_keymap_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "keymap.toml"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "operator"


def check_base_url(url: str) -> str:
    """https anywhere, or http only to this machine (the local emulator): a token never
    travels in clear text to another host."""
    parts = urlsplit(url)
    if "@" in parts.netloc:  # the SDK sends a bearer token; a password here would be echoed
        raise ValueError("a Square base URL must not carry a user name or password: give "
                         "the URL without `user:password@`")
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host:
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return url
    raise ValueError(f"Square base URL {url!r} must be https://..., or http:// to a loopback "
                     "address (127.0.0.1, ::1, localhost)")


def check_db_path(path: Path) -> Path:
    """An explicit database file must sit in a directory that exists: a typo must not start a
    new, empty database somewhere (only the default location's directory is ever created)."""
    if path.expanduser() == default_db_path():
        return path
    if path.is_dir():
        raise ValueError(f"database {str(path)!r} is a directory: give a file path, "
                         f"e.g. {str(path / 'recon.db')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"database directory {str(path.parent)!r} does not exist: create it "
                         "first, or fix the --db / RECON_DB path")
    return path


class ReconSettings(BaseSettings):
    """Where the database and credentials live, which Square to talk to, who is operating."""

    # hide_input_in_errors: a refused value may be a URL holding a password; no error repeats it.
    model_config = SettingsConfigDict(env_prefix="RECON_", extra="ignore",
                                      hide_input_in_errors=True)

    # A SQLite file, or a `postgresql://` URL (team mode; services/database_url.py).
    db: Path | str = Field(default_factory=default_db_path)
    square_base_url: str | None = None
    square_environment: Literal["production", "sandbox"] = "production"
    credentials: Path = Field(default_factory=default_credentials_path)
    operator: str = Field(default_factory=_os_user)
    # Rebinding keys: `"queue.complete" = "ctrl+k"` lines, by binding id (see `?` in the console).
    keymap: Path = Field(default_factory=default_keymap_path)
    # Concurrency and retry knobs; the defaults suit Square's unpublished limits.
    max_concurrent_merchants: int = Field(16, ge=1)
    # A discovery of many merchants is shared out over this many processes (at most the
    # machine's cores; services/discovery_processes.py). 1: all in the console's own.
    discovery_processes: int = Field(2, ge=1, le=16)
    read_retries: int = Field(4, ge=0)
    request_timeout_s: float = Field(20.0, gt=0)
    # Reminders (services/reminders): `smtp://user@host:587` (STARTTLS) or `smtps://...:465`;
    # the password comes from the credentials file's [smtp] section, never from here.
    smtp_url: str | None = None
    reminder_from: str = "Reconciliation Team <recon@example.com>"
    reminder_window_days: int = Field(7, ge=1)
    reminder_consent_link: str = "https://example.com/managed-reconciliation/consent"
    # Overrides of the shipped templates (`no_consent.txt.j2`, ...), looked up here first.
    reminder_templates: Path = Field(default_factory=lambda: Path(
        platformdirs.user_config_dir(APP_NAME)) / "reminder-templates")
    # Merchant-local hours in which reminders go out ("00:00-24:00": any time).
    reminder_business_hours: str = Field(
        "09:00-17:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d-(([01]\d|2[0-3]):[0-5]\d|24:00)$")
    # The demo's mailbox (RECON_DEMO_MAILBOX): the folder its local SMTP server writes each
    # message into, shown on the Reminders screen (b). Set by `demo` and `demo --team`.
    demo_mailbox: Path | None = None

    @field_validator("db", mode="before")
    @classmethod
    def _db_where_asked(cls, value: Any) -> Any:
        # Only explicit values get here (defaults are not validated).
        if isinstance(value, str) and "://" in value:
            from services.database_url import check_database_url
            return check_database_url(value)  # a URL stays a str: Path() would fold its //
        if isinstance(value, str | Path):
            return check_db_path(Path(value).expanduser())
        return value

    @field_validator("operator")
    @classmethod
    def _someone(cls, value: str) -> str:
        # The audit names the operator on every action: "" (an unset $USER) names no one.
        if not value.strip():
            raise ValueError("the operator is empty: set RECON_OPERATOR or --operator to your "
                             "name (the audit records it on every action)")
        # One person, one spelling: four-eyes compares names, so "Ana " or a zero-width
        # character must not make the preparer a second operator.
        value = unicodedata.normalize("NFKC", value).strip()
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
            raise ValueError("the operator name holds control or invisible characters: set "
                             "RECON_OPERATOR or --operator to your name in plain text")
        return value

    @field_validator("square_base_url")
    @classmethod
    def _https_or_loopback(cls, value: str | None) -> str | None:
        return None if value is None else check_base_url(value)

    @model_validator(mode="after")
    def _one_target(self) -> ReconSettings:
        # Fields set from flags or RECON_* variables alike: two answers to "which Square?".
        if self.square_base_url is not None and "square_environment" in self.model_fields_set:
            raise ValueError(f"both a Square base URL ({self.square_base_url}) and an "
                             f"environment ({self.square_environment}) are given: give only one "
                             "(--square-base-url/RECON_SQUARE_BASE_URL or "
                             "--environment/RECON_SQUARE_ENVIRONMENT)")
        return self

    @property
    def base_url(self) -> str:
        return self.square_base_url or SQUARE_BASE_URLS[self.square_environment]

    @property
    def local_dir(self) -> Path:
        """Where the console writes files of its own (exports): beside a SQLite file; with a
        team database (a URL), the user data directory, made owner-only if missing."""
        if isinstance(self.db, Path):
            return self.db.parent
        directory = default_db_path().parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return directory

    @property
    def target(self) -> str:
        """Which Square, as the operator is told it: production, sandbox, or the base URL."""
        return self.square_base_url or self.square_environment

    # Four-eyes (issue 14): a batch of more than `four_eyes_orders` orders, or of more than
    # `four_eyes_amount` (major units, e.g. 10000.00) in any one currency, runs only once a
    # second operator approved it; an approval is good for `approval_ttl_minutes`.
    # (RECON_FOUR_EYES_ORDERS, RECON_FOUR_EYES_AMOUNT, RECON_APPROVAL_TTL_MINUTES)
    four_eyes_orders: int = Field(200, ge=0)
    four_eyes_amount: Decimal = Field(Decimal("10000.00"), ge=0)
    approval_ttl_minutes: float = Field(30.0, gt=0)

    # A merchant lease a dead holder keeps until it expires, in seconds; heart-beaten every
    # third of it (RECON_LEASE_TTL_S).
    lease_ttl_s: float = Field(30.0, gt=0)

    # PostgreSQL connections one console (or command) pools at most (RECON_PG_POOL_MAX).
    pg_pool_max: int = Field(PG_POOL_MAX, ge=1)

    # Signed audit checkpoints go here, outside the database (RECON_CHECKPOINT_DIR); unset: a
    # `checkpoints/` folder beside the credentials file (services/checkpoints.py).
    checkpoint_dir: Path | None = None
