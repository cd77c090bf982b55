"""Audit entries, approved sets and consent records hash one canonical JSON form. Judged by the
stdlib's json (keys sorted, no spaces, UTF-8), not by the code under test, so a hash an outside
verifier recomputes is the hash we stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from services.audit import AUDIT_FIELDS, entry_hash
from services.completion import ApprovedItem, approved_set_sha256
from services.consent import record_sha256

DATA = Path(__file__).parent / "data"


def stdlib_sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def test_consent_hash_is_the_canonical_form() -> None:
    document = json.loads((DATA / "consent" / "valid" / "full.json").read_text())
    document["grantor"]["name"] = "Zoë \u202e[/] \x1b[2J 東京"
    assert record_sha256(document) == stdlib_sha256(document)


def test_audit_entry_hash_is_the_canonical_form() -> None:
    entry = dict.fromkeys(AUDIT_FIELDS)
    entry.update(seq=7, at="2026-11-26T12:00:00.000000Z", operator="ana", action="intent",
                 detail="Zoë's \x00 [b]order[/b]", amount=1250, prev_hash="0" * 64)
    assert entry_hash(entry) == stdlib_sha256(entry)


def test_approved_set_hash_is_the_canonical_form_of_the_sorted_pairs() -> None:
    items = [ApprovedItem("M2", "O9", 3), ApprovedItem("M1", "O1", 1)]
    assert approved_set_sha256(items) == stdlib_sha256([["M1", "O1", 1], ["M2", "O9", 3]])
    assert approved_set_sha256(items) == approved_set_sha256(list(reversed(items)))
