"""The credentials file's rules, and the seed's determinism."""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.credentials import load_credentials
from services.emulator import SeedConfig, seed_square
from services.errors import CredentialsError


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_valid_file_loads_and_hides_tokens(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[merchants.M1]\naccess_token = "emu-token-secret"\n'
                                      'sync_time = "03:30"\n[merchants.M2]\n'
                                      'access_token = "emu-token-other"\n')
    loaded = load_credentials(path)
    assert set(loaded) == {"M1", "M2"}
    assert loaded["M1"].sync_time is not None and loaded["M1"].sync_time.minute == 30
    assert loaded["M1"].access_token.get_secret_value() == "emu-token-secret"
    assert "emu-token-secret" not in repr(loaded) + str(loaded)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_other_readable_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "c.toml", '[merchants.M1]\naccess_token = "x"\n', mode)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_credentials(path)


@pytest.mark.parametrize(("text", "expected"), [
    ('[merchants.M1]\naccess_token = "unterminated\n', "not valid TOML"),
    ("[other]\nx = 1\n", "no [merchants.MERCHANT_ID]"),
    ('[merchants.M1]\nsync_time = "03:00"\n', "access_token"),
    ('[merchants.M1]\naccess_token = "x"\nsync_time = "3 am"\n', "sync_time"),
    ('[merchants.M1]\naccess_token = "x"\nextra = 1\n', "extra"),
    ('[merchants.M1]\naccess_token = "  "\n', "empty"),
])
def test_malformed_files_are_one_line_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(CredentialsError) as error:
        load_credentials(path)
    message = str(error.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="--credentials"):
        load_credentials(tmp_path / "nope.toml")


def test_seed_is_deterministic_and_mixed() -> None:
    now = datetime(2026, 11, 26, tzinfo=UTC)
    config = SeedConfig(seed=11, merchants=4, orders_per_location=50)
    first, merchants = seed_square(config, now=now)
    second, _ = seed_square(config, now=now)
    assert [r.json for r in first.orders.values()] == [r.json for r in second.orders.values()]
    kinds = Counter((r.state, r.source_name, r.version is None) for r in first.orders.values())
    assert kinds[("OPEN", "Square Online", False)] > 100
    assert kinds[("COMPLETED", "Square Online", False)] > 10
    assert kinds[("OPEN", "Point of Sale", True)] > 0
    assert kinds[("OPEN", "Square Online", True)] > 0  # manual only
    currencies = {m.merchant.currency for m in merchants}
    timezones = {m.merchant.timezone for m in merchants}
    assert len(currencies) >= 3 and len(timezones) >= 4
    other = seed_square(SeedConfig(seed=12, merchants=4, orders_per_location=50), now=now)[0]
    assert [r.id for r in other.orders.values()] != [r.id for r in first.orders.values()]
