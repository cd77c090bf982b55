"""Consent records: validation against `consent.schema.json`, the model used in code, and status.

A record is checked by the JSON Schema first (format checks on), then loaded into
`ConsentRecord`; a test proves the two agree on every example in `tests/data/consent/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
)

from services.canonical_json import canonical_sha256
from services.errors import ConsentFileError

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

__all__ = [
    "DEFAULT_ORDER_SOURCES",
    "ConsentRecord",
    "ConsentStatus",
    "InvalidConsent",
    "Revocation",
    "consent_rule_problems",
    "consent_schema",
    "parse_consent_file",
    "read_consent_file",
    "record_sha256",
    "validate_consent",
]

# Package data, so an installed wheel has it; a test keeps it byte-identical to the top-level
# consent.schema.json (the published copy).
SCHEMA_RESOURCE = resources.files("services") / "schemas" / "consent.schema.json"
DEFAULT_ORDER_SOURCES = ("Square Online",)
EXPIRING_SOON = timedelta(days=14)
# The same pattern stands in consent.schema.json beside `"format": "email"`.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
# Far above any real file (a record is ~1.5 KB); only a wrong path or a hostile file gets here.
MAX_CONSENT_FILE_BYTES = 32 * 2**20


class ConsentStatus(StrEnum):
    ACTIVE = "active"
    NOT_YET_EFFECTIVE = "not_yet_effective"
    EXPIRED = "expired"
    REVOKED = "revoked"


def _unique(items: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(items)) != len(items):
        raise ValueError("items must be unique")
    return items


LocationId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
SourceName = Annotated[str, Field(min_length=1, max_length=100)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grantor(_Strict):
    name: str = Field(min_length=1, max_length=200)
    role: str = Field(min_length=1, max_length=200)
    email: str = Field(max_length=320, pattern=EMAIL_PATTERN)
    authority: Literal["square_account_owner", "signed_service_agreement", "other_documented"]


class Grantee(_Strict):
    organisation: str = Field(min_length=1, max_length=200)
    role: str = Field(min_length=1, max_length=200)


class MoneyLimit(_Strict):
    amount: StrictInt = Field(ge=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class ConsentScope(_Strict):
    action: Literal["complete_fully_paid_orders"]
    order_sources: Annotated[tuple[SourceName, ...], Field(min_length=1),
                             AfterValidator(_unique)] | None = None
    min_order_age_hours: StrictInt | None = Field(None, ge=0, le=8760)
    max_orders_per_batch: StrictInt | None = Field(None, ge=1, le=100000)
    max_amount_per_batch: MoneyLimit | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return self.order_sources or DEFAULT_ORDER_SOURCES


class Notice(_Strict):
    version: str = Field(min_length=1, max_length=64)
    text_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Evidence(_Strict):
    method: Literal["e_signature", "portal_checkbox", "email_reply"]
    reference: str = Field(min_length=1, max_length=500)
    captured_at: AwareDatetime
    captured_by: str = Field(min_length=1, max_length=200)


class Revocation(_Strict):
    revoked_at: AwareDatetime
    revoked_by: str = Field(min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=1000)


class ConsentRecord(_Strict):
    consent_id: str = Field(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                                    r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
    schema_version: Literal[1]
    merchant_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    location_ids: Literal["ALL"] | Annotated[tuple[LocationId, ...], Field(min_length=1),
                                             AfterValidator(_unique)]
    grantor: Grantor
    grantee: Grantee
    scope: ConsentScope
    notice: Notice
    evidence: Evidence
    effective_from: AwareDatetime
    expires_at: AwareDatetime | None = None
    revocation: Revocation | None = None

    def status_at(self, moment: datetime) -> ConsentStatus:
        if self.revocation is not None and self.revocation.revoked_at <= moment:
            return ConsentStatus.REVOKED
        if moment < self.effective_from:
            return ConsentStatus.NOT_YET_EFFECTIVE
        if self.expires_at is not None and self.expires_at <= moment:
            return ConsentStatus.EXPIRED
        return ConsentStatus.ACTIVE

    def expiring_soon(self, moment: datetime) -> bool:
        return (self.status_at(moment) is ConsentStatus.ACTIVE and self.expires_at is not None
                and self.expires_at - moment <= EXPIRING_SOON)

    def covers_location(self, location_id: str) -> bool:
        return self.location_ids == "ALL" or location_id in self.location_ids

    def covers_source(self, source_name: str | None) -> bool:
        return source_name in self.scope.sources

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def record_sha256(document: dict[str, Any]) -> str:
    """Hash of the canonical JSON of a record: what the audit says was relied on."""
    return canonical_sha256(document)


@cache
def consent_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_RESOURCE.read_text(encoding="utf-8"))
    return schema


@cache
def _validator() -> Draft202012Validator:
    # Imported here: jsonschema and its format checkers are a tenth of a second of start-up
    # that only a consent import needs.
    from jsonschema import Draft202012Validator
    return Draft202012Validator(consent_schema(),
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


@dataclass(frozen=True)
class InvalidConsent:
    """One problem: where in the record, and what is wrong."""

    path: str
    message: str


def validate_consent(document: Any) -> tuple[ConsentRecord | None, list[InvalidConsent]]:
    """Schema first (the contract), then the model (what code uses); both must accept."""
    problems = [InvalidConsent(e.json_path, e.message)
                for e in sorted(_validator().iter_errors(document),
                                key=lambda e: list(map(str, e.absolute_path)))]
    if problems:
        return None, problems
    try:
        return ConsentRecord.model_validate(document), []
    except ValidationError as error:
        # The schema accepted it, and a test proves schema and model agree: a model error here
        # is a bug of ours, reported with pydantic's own location.
        return None, [InvalidConsent("$", f"{'.'.join(map(str, e['loc']))}: {e['msg']}")
                      for e in error.errors()]


def consent_rule_problems(record: ConsentRecord, now: datetime) -> list[InvalidConsent]:
    """What a schema cannot say: dates that contradict each other or the clock. Checked on
    import only, so a record already stored always loads."""
    problems = []
    times = {"$.effective_from": record.effective_from, "$.expires_at": record.expires_at,
             "$.evidence.captured_at": record.evidence.captured_at,
             "$.revocation.revoked_at": (record.revocation.revoked_at if record.revocation
                                         else None)}
    for path, moment in times.items():
        if moment is None:
            continue
        try:  # 9999-12-31T23:59:59-12:00 is valid RFC 3339 but past year 9999 in UTC
            moment.astimezone(UTC)
        except OverflowError:
            problems.append(InvalidConsent(path, f"{moment.isoformat()} is out of range once "
                                                 "in UTC (years 1 to 9999)"))
    if problems:  # the comparisons below would overflow too
        return problems
    if record.expires_at is not None and record.expires_at <= record.effective_from:
        problems.append(InvalidConsent(
            "$.expires_at", f"{record.expires_at.isoformat()} is not after effective_from "
                            f"{record.effective_from.isoformat()}"))
    if record.evidence.captured_at > now:
        problems.append(InvalidConsent(
            "$.evidence.captured_at", f"{record.evidence.captured_at.isoformat()} is in the "
                                      f"future (now {now.isoformat(timespec='seconds')})"))
    return problems


def problem_line(where: str, problem: InvalidConsent, more: int = 0) -> str:
    extra = f" (and {more} more)" if more else ""
    return f"{where}: {problem.path}: {problem.message}{extra}; fix the record and import it again."


def read_consent_file(path: Path) -> tuple[list[tuple[str, ConsentRecord, dict[str, Any]]],
                                           list[str]]:
    """The valid records of a file, each with where it stands ("file: record N"), and one
    line per record (or per file) that is not valid: file, record, field path, what is wrong."""
    if path.exists() and not path.is_dir() and not path.is_file():
        return [], [f"{path}: not a regular file (a FIFO or a device would hang or never "
                    "end); give the consent file itself."]
    try:
        with path.open("rb") as handle:  # bounded: a consent file is kilobytes, not /dev/zero
            raw = handle.read(MAX_CONSENT_FILE_BYTES + 1)
        if len(raw) > MAX_CONSENT_FILE_BYTES:
            return [], [f"{path}: larger than {MAX_CONSENT_FILE_BYTES // 2**20} MiB, not a "
                        "consent file; split it or check the path."]
        # utf-8-sig: a file saved with a byte-order mark (Windows editors) is the same JSON.
        document = json.loads(raw.decode("utf-8-sig"))
    except FileNotFoundError:
        return [], [f"{path}: file not found."]
    except IsADirectoryError:
        return [], [f"{path}: is a directory; give the consent files in it (e.g. DIR/*.json)."]
    except OSError as error:
        return [], [f"{path}: cannot be read ({error.strerror}); check the path and its "
                    "permissions."]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [], [f"{path}: not valid JSON ({error}); fix the file (one consent record, "
                    "or a JSON array of records, in UTF-8) and import it again."]
    except RecursionError:
        return [], [f"{path}: JSON nested too deeply to be a consent record."]
    items = document if isinstance(document, list) else [document]
    if not items:
        return [], [f"{path}: the array holds no consent records."]
    records, lines = [], []
    for index, item in enumerate(items):
        where = f"{path}: record {index}" if isinstance(document, list) else str(path)
        record, problems = validate_consent(item)
        if problems:
            lines.append(problem_line(where, problems[0], len(problems) - 1))
            continue
        assert record is not None
        records.append((where, record, item))
    return records, lines


def parse_consent_file(path: Path) -> list[tuple[ConsentRecord, dict[str, Any]]]:
    """All records of a file (one record or an array), or ConsentFileError naming the first
    problem: the file, the record, the field path and what is wrong. Nothing partial."""
    records, lines = read_consent_file(path)
    if lines:
        raise ConsentFileError(lines[0])
    return [(record, document) for _, record, document in records]
