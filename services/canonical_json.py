"""The one canonical JSON form this project hashes: orjson, keys sorted, UTF-8, no spaces.

Audit entries, approved sets and consent records are all hashed through `canonical_sha256`, so
a hash written by one part can be recomputed by any other (and by an outside verifier with the
same four rules)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

__all__ = ["canonical_json", "canonical_sha256"]


def canonical_json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def canonical_sha256(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()
