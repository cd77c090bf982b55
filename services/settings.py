"""Settings from flags and `RECON_*` environment variables (pydantic-settings)."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SQUARE_BASE_URLS", "ReconSettings", "default_credentials_path", "default_db_path",
           "default_keymap_path"]

SQUARE_BASE_URLS = {
    "production": "https://connect.squareup.com",
    "sandbox": "https://connect.squareupsandbox.com",
}
APP_NAME = "recon-console"


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


class ReconSettings(BaseSettings):
    """Where the database and credentials live, which Square to talk to, who is operating."""

    model_config = SettingsConfigDict(env_prefix="RECON_", extra="ignore")

    db: Path = Field(default_factory=default_db_path)
    square_base_url: str | None = None
    square_environment: Literal["production", "sandbox"] = "production"
    credentials: Path = Field(default_factory=default_credentials_path)
    operator: str = Field(default_factory=_os_user)
    # Rebinding keys: `"queue.complete" = "ctrl+k"` lines, by binding id (see `?` in the console).
    keymap: Path = Field(default_factory=default_keymap_path)
    # Concurrency and retry knobs; the defaults suit Square's unpublished limits.
    max_concurrent_merchants: int = Field(16, ge=1)
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

    @property
    def base_url(self) -> str:
        return self.square_base_url or SQUARE_BASE_URLS[self.square_environment]
