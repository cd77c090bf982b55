"""Consent records: the schema and the model agree; import is idempotent and versioned; bad files
store nothing and get one line naming file, field and problem."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from services.consent import (
    ConsentRecord,
    ConsentStatus,
    InvalidConsent,
    consent_rule_problems,
    consent_schema,
    parse_consent_file,
    read_consent_file,
    validate_consent,
)
from services.errors import ConsentFileError
from services.settings import ReconSettings
from services.workspace import Workspace
from tests.conftest import DATA
from tests.oracle import eligibility as oracle

VALID = sorted((DATA / "consent" / "valid").glob("*.json"))
INVALID = sorted((DATA / "consent" / "invalid").glob("*.json"))


def _records(path: Path) -> list[object]:
    document = json.loads(path.read_text())
    return document if isinstance(document, list) else [document]


def test_schema_is_2020_12_with_versioned_id_and_closed_objects() -> None:
    schema = consent_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "/v1/" in schema["$id"]

    def closed(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, node.get("description")
            for value in node.values():
                closed(value)
        elif isinstance(node, list):
            for value in node:
                closed(value)
    closed(schema)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_examples_pass_schema_and_model(path: Path) -> None:
    for document in _records(path):
        record, problems = validate_consent(document)
        assert problems == [] and isinstance(record, ConsentRecord)
        # The model reproduces the document it was given.
        assert record.to_document() == document


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_are_refused_by_schema_and_by_model(path: Path) -> None:
    document = json.loads(path.read_text())
    validator = Draft202012Validator(consent_schema(),
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    assert list(validator.iter_errors(document)), "the schema accepted it"
    with pytest.raises(ValidationError):
        ConsentRecord.model_validate(document)
    with pytest.raises(ConsentFileError) as error:
        parse_consent_file(path)
    line = str(error.value)
    assert "\n" not in line and str(path) in line and "$" in line


def test_status_over_time() -> None:
    record, _ = validate_consent(_records(DATA / "consent" / "valid" / "revoked.json")[0])
    assert record is not None
    assert record.status_at(datetime(2026, 10, 1, tzinfo=UTC)) is ConsentStatus.NOT_YET_EFFECTIVE
    assert record.status_at(datetime(2026, 11, 10, tzinfo=UTC)) is ConsentStatus.ACTIVE
    # Revoked 2026-11-20T09:30+01:00 = 08:30Z.
    assert record.status_at(datetime(2026, 11, 20, 8, 29, tzinfo=UTC)) is ConsentStatus.ACTIVE
    assert record.status_at(datetime(2026, 11, 20, 8, 30, tzinfo=UTC)) is ConsentStatus.REVOKED
    full, _ = validate_consent(_records(DATA / "consent" / "valid" / "full.json")[0])
    assert full is not None
    assert full.status_at(datetime(2027, 11, 1, tzinfo=UTC)) is ConsentStatus.EXPIRED
    assert full.expiring_soon(datetime(2027, 10, 25, tzinfo=UTC))


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    settings = ReconSettings(db=tmp_path / "recon.db", credentials=tmp_path / "none.toml",
                             operator="tester", square_base_url="https://unused.invalid")
    return Workspace.open(settings)


def test_import_is_idempotent_and_versions_changes(workspace: Workspace, tmp_path: Path) -> None:
    full = DATA / "consent" / "valid" / "full.json"
    assert [r[2] for r in workspace.import_consent_files([full])] == ["new"]
    assert [r[2] for r in workspace.import_consent_files([full])] == ["unchanged"]
    changed = json.loads(full.read_text())
    changed["expires_at"] = "2028-01-01T00:00:00Z"
    other = tmp_path / "changed.json"
    other.write_text(json.dumps(changed))
    assert [r[2] for r in workspace.import_consent_files([other])] == ["new_version"]
    assert workspace.store.consent_versions(changed["consent_id"]) == 2
    [current] = [c for c in workspace.consents() if c.record.consent_id == changed["consent_id"]]
    assert current.version == 2 and current.record.expires_at is not None
    assert current.record.expires_at.year == 2028
    actions = [e["action"] for e in workspace.audit.entries()]
    assert actions == ["consent_imported", "consent_imported"]


def test_invalid_file_stores_nothing_even_beside_valid_ones(workspace: Workspace,
                                                           tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.json"
    good = json.loads((DATA / "consent" / "valid" / "minimal.json").read_text())
    bad = json.loads((DATA / "consent" / "invalid" / "bad_email.json").read_text())
    mixed.write_text(json.dumps([good, bad]))
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ConsentFileError) as error:
        workspace.import_consent_files([mixed, broken])
    lines = str(error.value).splitlines()
    assert len(lines) == 2
    assert "mixed.json: record 1: $.grantor.email" in lines[0]
    assert "broken.json: not valid JSON" in lines[1] and "import it again" in lines[1]
    assert workspace.consents() == []


def test_a_consent_file_saved_with_a_byte_order_mark_imports(workspace: Workspace,
                                                            tmp_path: Path) -> None:
    """Windows editors write a UTF-8 byte-order mark: the same JSON, not 'not valid JSON
    (Unexpected UTF-8 BOM (decode using utf-8-sig))'."""
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + (DATA / "consent" / "valid" / "minimal.json")
                       .read_bytes())
    workspace.import_consent_files([marked])
    assert len(workspace.consents()) == 1


def test_revoke_stores_new_version_and_audits(workspace: Workspace) -> None:
    workspace.import_consent_files([DATA / "consent" / "valid" / "full.json"])
    stored = workspace.revoke_consent("0b7c6f1e-3f7a-4c1e-9a51-2f8e6c1d4b10", "Dana", "Closing")
    assert stored.version == 2 and stored.record.revocation is not None
    assert stored.record.status_at(datetime.now(UTC)) is ConsentStatus.REVOKED
    assert [e["action"] for e in workspace.audit.entries()][-1] == "consent_revoked"


def _document(name: str, **changes: object) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((DATA / "consent" / "valid" / name).read_text())
    document.update(changes)
    return document


# The independent oracle's words for each status (tests/oracle reads consent.schema.json's dates).
_ORACLE_STATE = {ConsentStatus.ACTIVE: "ACTIVE", ConsentStatus.REVOKED: "CONSENT_REVOKED",
                 ConsentStatus.EXPIRED: "CONSENT_EXPIRED",
                 ConsentStatus.NOT_YET_EFFECTIVE: "CONSENT_NOT_YET_EFFECTIVE"}


@pytest.mark.parametrize("name", ["full.json", "revoked.json", "minimal.json"])
def test_status_turns_at_each_date_as_the_independent_oracle_reads_it(name: str) -> None:
    """A consent is usable from `effective_from` on, and no longer from `expires_at` or
    `revocation.revoked_at` on: judged a microsecond before, at, and after each date."""
    document = _document(name)
    record = ConsentRecord.model_validate(document)
    dates = [record.effective_from, record.expires_at,
             record.revocation.revoked_at if record.revocation else None]
    tick = timedelta(microseconds=1)
    for date in filter(None, dates):
        for moment in (date - tick, date, date + tick):
            assert _ORACLE_STATE[record.status_at(moment)] == \
                oracle.consent_state(document, moment), (name, moment)
    assert record.status_at(record.effective_from) is ConsentStatus.ACTIVE


def test_expiring_soon_is_the_last_fourteen_days_of_an_active_consent() -> None:
    """The queue flags a consent as expiring so someone renews it in time; a consent with no end,
    or one already expired or revoked, is not 'expiring'."""
    full = ConsentRecord.model_validate(_document("full.json"))
    assert full.expires_at is not None
    fourteen_days_before = full.expires_at - timedelta(days=14)
    assert full.expiring_soon(fourteen_days_before)
    assert not full.expiring_soon(fourteen_days_before - timedelta(seconds=1))
    assert not full.expiring_soon(full.expires_at)
    assert not full.expiring_soon(full.expires_at + timedelta(days=1))
    endless = ConsentRecord.model_validate(_document("minimal.json"))
    assert endless.expires_at is None
    assert not endless.expiring_soon(datetime(2030, 1, 1, tzinfo=UTC))
    revoked = ConsentRecord.model_validate(_document("full.json", revocation={
        "revoked_at": "2027-10-20T00:00:00Z", "revoked_by": "Dana", "reason": "Closing"}))
    assert not revoked.expiring_soon(datetime(2027, 10, 25, tzinfo=UTC))


def test_evidence_captured_this_very_moment_is_not_in_the_future() -> None:
    record = ConsentRecord.model_validate(_document("full.json"))
    captured = record.evidence.captured_at
    assert consent_rule_problems(record, captured) == []
    [problem] = consent_rule_problems(record, captured - timedelta(seconds=1))
    assert problem.path == "$.evidence.captured_at"
    assert "is in the future" in problem.message


def test_a_bad_record_gets_one_line_counting_its_other_problems(tmp_path: Path) -> None:
    """One line per bad record: the first problem, how many more there are, and what to do."""
    three = _document("full.json", schema_version=2, extra=1)
    three["scope"]["action"] = "refund_everything"
    one = _document("minimal.json", schema_version=2)
    path = tmp_path / "consents.json"
    path.write_text(json.dumps([three, one, _document("revoked.json")]))
    records, lines = read_consent_file(path)
    assert [where for where, _, _ in records] == [f"{path}: record 2"]
    assert lines == [
        f"{path}: record 0: $: Additional properties are not allowed ('extra' was unexpected) "
        "(and 2 more); fix the record and import it again.",
        f"{path}: record 1: $.schema_version: 1 was expected; fix the record and import it "
        "again."]


def test_a_record_the_schema_passes_but_the_model_refuses_is_still_refused_by_field() -> None:
    """JSON Schema counts 1.0 as an integer; the model does not. Such a record is refused, not
    stored, and the line still names the field and what is wrong with it."""
    document = _document("full.json")
    document["scope"]["min_order_age_hours"] = 24.0
    validator = Draft202012Validator(consent_schema(),
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    assert not list(validator.iter_errors(document)), "the schema must pass it for this test"
    record, problems = validate_consent(document)
    assert record is None
    assert problems == [InvalidConsent(
        "$", "scope.min_order_age_hours: Input should be a valid integer")]


def test_the_model_alone_refuses_repeated_locations_and_sources() -> None:
    """Records loaded back from the database skip the schema: the model itself refuses a listed
    location or source twice, and says so."""
    for changes in ({"location_ids": ["LMAIN123", "LMAIN123"]},
                    {"scope": {"action": "complete_fully_paid_orders",
                               "order_sources": ["Square Online", "Square Online"]}}):
        with pytest.raises(ValidationError) as error:
            ConsentRecord.model_validate(_document("full.json", **changes))
        assert "Value error, items must be unique" in {e["msg"] for e in error.value.errors()}


def test_an_import_refused_for_one_date_problem_says_just_that(workspace: Workspace,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "future.json"
    path.write_text(json.dumps(_document("full.json", evidence={
        "method": "e_signature", "reference": "DocuSign envelope 4F2A-11",
        "captured_at": "2099-01-01T00:00:00Z", "captured_by": "onboarding@ledgerline.example"})))
    with pytest.raises(ConsentFileError) as error:
        workspace.import_consent_files([path])
    [line] = str(error.value).splitlines()
    assert line.startswith(f"{path}: $.evidence.captured_at: 2099-01-01T00:00:00+00:00 is in the "
                           "future (now ")
    assert line.endswith("); fix the record and import it again.")
    assert "(and" not in line
    assert workspace.consents() == []
