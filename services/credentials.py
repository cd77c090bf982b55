"""The credentials file: merchant access tokens, read into memory and nowhere else.

Tokens are held as `SecretStr`, so printing, logging or dumping a `MerchantCredentials` shows
`**********`; only the Square gateway calls `get_secret_value()`.
"""

from __future__ import annotations

import stat
import tomllib
from datetime import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator

from services.errors import CredentialsError

__all__ = ["MerchantCredentials", "load_credentials", "load_section_secret"]


class MerchantCredentials(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    merchant_id: str
    access_token: SecretStr
    sync_time: time | None = None

    @field_validator("sync_time", mode="before")
    @classmethod
    def _parse_sync_time(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                hours, minutes = value.split(":")
                return time(int(hours), int(minutes))
            except ValueError:
                raise ValueError(f"sync_time {value!r} is not HH:MM") from None
        return value


class _MerchantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    access_token: SecretStr
    sync_time: str | None = None


def load_credentials(path: Path) -> dict[str, MerchantCredentials]:
    """Read and check the file; refuse it if group or others can read it."""
    document = _read_document(path)
    merchants = document.get("merchants")
    if not isinstance(merchants, dict) or not merchants:
        raise CredentialsError(f"{path}: no [merchants.MERCHANT_ID] tables with access_token.")
    result: dict[str, MerchantCredentials] = {}
    for merchant_id, entry in merchants.items():
        try:
            parsed = _MerchantEntry.model_validate(entry)
            result[merchant_id] = MerchantCredentials(
                merchant_id=merchant_id, access_token=parsed.access_token,
                sync_time=parsed.sync_time)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            # Never echo the input: it may be a token.
            raise CredentialsError(f"{path}: merchants.{merchant_id}.{where}: "
                                   f"{first['msg']}.") from None
        if not parsed.access_token.get_secret_value().strip():
            raise CredentialsError(f"{path}: merchants.{merchant_id}.access_token is empty.")
    return result


def load_section_secret(path: Path, section: str, key: str) -> SecretStr | None:
    """One secret from an optional section (`[smtp] password`, `[audit] checkpoint_key`), with
    the same file checks as the tokens; None when the section or key is absent."""
    table = _read_document(path).get(section)
    value = table.get(key) if isinstance(table, dict) else None
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CredentialsError(f"{path}: {section}.{key} must be a non-empty string.")
    return SecretStr(value)


def _read_document(path: Path) -> dict[str, Any]:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialsError(f"{path}: credentials file not found; create it (TOML, "
                               "[merchants.ID] access_token = ...) or pass --credentials."
                               ) from None
    except OSError as error:
        raise CredentialsError(f"{path}: cannot read credentials ({error.strerror}).") from None
    if not stat.S_ISREG(mode):  # a directory was a traceback, a FIFO a hang on open()
        raise CredentialsError(f"{path}: not a regular file; give --credentials the TOML "
                               "credentials file.")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path}: readable by group or others; run `chmod 600 {path}` "
                               "and rotate the tokens if others may have read them.")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        # The parser's message names the line, never the token's text.
        raise CredentialsError(f"{path}: not valid TOML ({str(error).splitlines()[0]}).") from None
    return document
