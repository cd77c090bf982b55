"""The tamper-evident audit trail: append-only, hash-chained entries.

Each entry's `hash` is SHA-256 over the canonical JSON (orjson, keys sorted, UTF-8, no spaces)
of all its fields except `hash`, `prev_hash` included; the first entry's `prev_hash` is 64 zeros.
`verify` recomputes the chain and names the first broken entry; a checkpoint (size, head hash)
taken earlier also reveals a cut tail or rewritten history (services/checkpoints.py signs them and
keeps them outside the database).
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from services.canonical_json import canonical_sha256
from services.storage.base import AUDIT_COLUMNS, AUDIT_VERIFY_COLUMNS
from services.store import Store, open_store, utc_text
from services.text_safety import csv_cell, json_line

__all__ = ["AUDIT_FIELDS", "AuditAction", "AuditTrail", "ChainProblem", "Checkpoint",
           "VerifyReport"]

GENESIS = "0" * 64
AUDIT_FIELDS = AUDIT_COLUMNS[:-1]   # all but `hash`, which is over these
_ALL = AUDIT_COLUMNS


class AuditAction(StrEnum):
    CONSENT_IMPORTED = "consent_imported"
    CONSENT_REVOKED = "consent_revoked"
    PREVIEW = "preview"
    APPROVAL = "approval"
    INTENT = "intent"
    OUTCOME = "outcome"
    CANCEL = "cancel"
    RECOVERY = "recovery"
    BATCH_FINISHED = "batch_finished"
    REMINDER_SENT = "reminder_sent"
    REMINDER_FAILED = "reminder_failed"
    REMINDER_OPT_OUT = "reminder_opt_out"
    REMINDER_OPT_IN = "reminder_opt_in"
    # Four-eyes (services/completion/approvals.py)
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_GRANTED = "approval_granted"
    APPROVAL_REJECTED = "approval_rejected"
    APPROVAL_USED = "approval_used"
    BATCH_REFUSED = "batch_refused"


_SORTED_FIELDS = AUDIT_VERIFY_COLUMNS[:-1]
assert tuple(sorted(AUDIT_FIELDS)) == _SORTED_FIELDS


# From this many entries on, `verify` uses one process per core; below, starting the workers
# costs more than they save.
_PARALLEL_FROM = 200_000


def _worker_context() -> multiprocessing.context.BaseContext:
    """Never fork: the console verifies from a worker thread, and forking a process with
    threads can deadlock the child on a lock another thread held. The fork server is a
    clean single-threaded process (spawn where there is none)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["services.audit"])
        return context
    return multiprocessing.get_context("spawn")


class ChainProblem(StrEnum):
    """`problem_kind` of a chain that does not verify (see also services/checkpoints.py)."""

    MISSING_ENTRY = "missing_entry"
    BROKEN_LINK = "broken_link"
    CHANGED_ENTRY = "changed_entry"
    CUT_TAIL = "cut_tail"
    REWRITTEN_HISTORY = "rewritten_history"


_Problem = tuple[int, str, str]  # (seq, kind, what)


def _verify_range(rows: Iterable[tuple[Any, ...]], first: int, end: int | None,
                  prev: str | None) -> tuple[_Problem | None, int, str | None]:
    """Check entries first..end-1 (to the last if end is None), given as AUDIT_VERIFY_COLUMNS
    rows by seq, starting from `prev`: returns (first problem as (seq, kind, what) or None,
    entries checked, last hash)."""
    seq_at = _SORTED_FIELDS.index("seq")
    prev_at = _SORTED_FIELDS.index("prev_hash")
    expected = first
    count = 0
    digest_of = canonical_sha256
    fields = _SORTED_FIELDS
    for row in rows:
        seq = row[seq_at]
        if seq != expected:
            return ((expected, ChainProblem.MISSING_ENTRY,
                     f"entry {expected} is missing (next is {seq})."), count, prev)
        if row[prev_at] != prev:
            return ((seq, ChainProblem.BROKEN_LINK,
                     "its prev_hash does not match the entry before it."), count, prev)
        digest = digest_of(dict(zip(fields, row, strict=False)))
        if digest != row[-1]:
            return ((seq, ChainProblem.CHANGED_ENTRY,
                     "its contents do not match its hash (changed)."), count, prev)
        prev = digest
        count += 1
        expected += 1
    if end is not None and expected != end:
        return ((expected, ChainProblem.MISSING_ENTRY, f"entry {expected} is missing."),
                count, prev)
    return None, count, prev


def _verify_range_in_process(location: Path | str, first: int, end: int | None,
                             prev: str | None) -> tuple[_Problem | None, int, str | None]:
    store = open_store(location)
    try:
        return _verify_range(store.audit_rows(first, end), first, end, prev)
    finally:
        store.close()


def entry_hash(entry: dict[str, Any]) -> str:
    return canonical_sha256({k: entry.get(k) for k in AUDIT_FIELDS})


@dataclass(frozen=True)
class Checkpoint:
    size: int
    head_hash: str
    created_at: str
    signature: str | None = None   # HMAC-SHA256, hex (services/checkpoints.py)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "head_hash": self.head_hash, "created_at": self.created_at,
                "signature": self.signature}


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries: int
    head_hash: str
    broken_at: int | None = None
    problem: str | None = None
    # What went wrong, for scripts: a ChainProblem or a checkpoints.ProblemKind value; with
    # ok=True only "no_checkpoint" (then `warning` says the tail is not anchored).
    problem_kind: str | None = None
    warning: str | None = None
    checkpoint: dict[str, Any] | None = None  # path, size, created_at

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head_hash": self.head_hash,
                "broken_at": self.broken_at, "problem": self.problem,
                "problem_kind": self.problem_kind, "warning": self.warning,
                "checkpoint": self.checkpoint}

    def against(self) -> str:
        """Which checkpoint this was checked against, in words."""
        if self.checkpoint is None:
            return "no checkpoint"
        return (f"checkpoint {self.checkpoint['path']} (size {self.checkpoint['size']}, "
                f"{self.checkpoint['created_at']})")

    def sentence(self) -> str:
        if self.ok:
            text = f"Audit chain verified: {self.entries} entries, head {self.head_hash[:12]}"
            if self.warning:
                return f"{text}. Warning: {self.warning}"
            return f"{text}, against {self.against()}." if self.checkpoint else f"{text}."
        if self.broken_at is None:
            return f"Audit check FAILED: {self.problem}"
        return f"Audit chain BROKEN at entry {self.broken_at}: {self.problem}"


class AuditTrail:
    def __init__(self, store: Store, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.clock = clock

    def using(self, store: Store) -> AuditTrail:
        """The same trail through another store of the same database (the journal's writer
        thread appends through its own connection)."""
        return AuditTrail(store, self.clock)

    def append(self, conn: object = None, **fields: Any) -> dict[str, Any]:
        """Append one entry. Inside the store's open transaction (`with store.transaction()`)
        it joins it, so the entry commits with the change it records. (`conn`, the
        transaction's connection, is accepted from older callers and not needed.)"""
        return self.append_many(conn, [fields])[0]

    def append_many(self, conn: object, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append several entries, chained in order: one read of the head and one INSERT for
        all (the completion journal's group commits). Joins an open transaction as `append`."""
        if conn is not None and getattr(self.store, "conn", conn) is not conn:
            # Another connection's transaction: appending here would not join it.
            raise ValueError("append through the store whose transaction is open "
                             "(AuditTrail.using(store))")
        if not entries:
            return []
        for fields in entries:
            unknown = set(fields) - set(AUDIT_FIELDS)
            if unknown:
                raise ValueError(f"unknown audit fields: {sorted(unknown)}")
        at = utc_text(self.clock() if self.clock else None)

        def chained(seq: int, prev: str | None) -> list[dict[str, Any]]:
            prev = prev or GENESIS
            made = []
            for fields in entries:
                entry: dict[str, Any] = dict.fromkeys(AUDIT_FIELDS)
                entry.update(fields)
                seq += 1
                entry["seq"] = seq
                entry["prev_hash"] = prev
                entry["at"] = entry["at"] or at
                entry["action"] = str(entry["action"])
                prev = entry["hash"] = entry_hash(entry)
                made.append(entry)
            return made

        return self.store.append_audit(chained)

    # ------------------------------------------------------------------ reading
    def entries(self, *, merchant_id: str | None = None, operator: str | None = None,
                order_id: str | None = None, outcome: str | None = None,
                since: str | None = None, until: str | None = None, action: str | None = None,
                limit: int | None = None, newest_first: bool = False
                ) -> Iterator[dict[str, Any]]:
        filters = {column: value for column, value in (
            ("merchant_id", merchant_id), ("operator", operator), ("order_id", order_id),
            ("outcome", outcome), ("action", action)) if value is not None}
        return self.store.audit_entries(filters, since, until, limit, newest_first)

    def size(self) -> int:
        return self.store.audit_extent()[1]

    def verify(self, checkpoint: Checkpoint | None = None,
               parallel_from: int = _PARALLEL_FROM) -> VerifyReport:
        """Recompute every link. Also catches gaps (a deleted entry), reordering, and, given a
        checkpoint, a cut tail or history rewritten before it. Long chains are checked in
        ranges, one process per core; each range starts from the stored hash before it,
        which the range before recomputes, so together they check every link."""
        store = self.store
        last = store.audit_extent()
        ranges: list[tuple[int, int | None]] = [(1, None)]
        location = store.location
        if last[1] >= parallel_from and isinstance(location, Path):
            workers = max(1, min(os.cpu_count() or 1, 4))
            step = int(last[0]) // workers + 1
            # Every range starts at an entry that can exist (a range past the last one would
            # report it missing); the last is open-ended.
            ranges = [(first, first + step) for first in range(1, int(last[0]) + 1, step)]
            ranges[-1] = (ranges[-1][0], None)
        if len(ranges) == 1:
            results = [_verify_range(store.audit_rows(1, None), 1, None, GENESIS)]
        else:
            starts = [GENESIS] + [store.audit_hash_at(a - 1) for a, _ in ranges[1:]]
            try:
                with ProcessPoolExecutor(len(ranges), mp_context=_worker_context()) as pool:
                    results = list(pool.map(_verify_range_in_process,
                                            [location] * len(ranges), [a for a, _ in ranges],
                                            [b for _, b in ranges], starts))
            except BrokenProcessPool:  # workers could not start
                results = [_verify_range(store.audit_rows(1, None), 1, None,  # (e.g. a
                                         GENESIS)]  # program read from stdin): one process
        count = 0
        prev = GENESIS
        for problem, range_count, range_last in results:
            if problem is not None:
                seq, kind, text = problem
                # head_hash: the last entry that did verify, as `entries` counts them
                return VerifyReport(False, count + range_count, range_last or prev, seq, text,
                                    kind)
            count += range_count
            prev = range_last or prev
        if checkpoint is not None:
            if count < checkpoint.size:
                return VerifyReport(False, count, prev, count + 1,
                                    f"the chain has {count} entries but the checkpoint of "
                                    f"{checkpoint.created_at} saw {checkpoint.size}: entries "
                                    "were cut from the end.", ChainProblem.CUT_TAIL)
            if checkpoint.size and store.audit_hash_at(checkpoint.size) != checkpoint.head_hash:
                return VerifyReport(False, count, prev, checkpoint.size,
                                    f"entry {checkpoint.size} does not have the hash the "
                                    f"checkpoint of {checkpoint.created_at} saw: history "
                                    "was rewritten.", ChainProblem.REWRITTEN_HISTORY)
        return VerifyReport(True, count, prev)

    def hash_at(self, seq: int) -> str | None:
        return self.store.audit_hash_at(seq)

    def checkpoint(self) -> Checkpoint:
        row = self.store.audit_last()
        if row is None:
            return Checkpoint(0, GENESIS, utc_text(self.clock() if self.clock else None))
        return Checkpoint(int(row[0]), str(row[1]),
                          utc_text(self.clock() if self.clock else None))

    # ------------------------------------------------------------------ export
    def export(self, out: IO[str], fmt: str, *, merchant_id: str | None = None,
               since: str | None = None, **filters: Any) -> int:
        """The entries `entries` would give for the same filters (oldest first)."""
        count = 0
        rows = self.entries(merchant_id=merchant_id, since=since, **filters)
        if fmt == "jsonl":
            for entry in rows:
                out.write(json_line(entry) + "\n")  # exact, and inert on a terminal
                count += 1
        elif fmt == "csv":
            writer = csv.DictWriter(out, fieldnames=list(_ALL))
            writer.writeheader()
            for entry in rows:
                writer.writerow({k: csv_cell(v) for k, v in entry.items()})  # no formulas
                count += 1
        else:
            raise ValueError(f"unknown export format {fmt!r}: use csv or jsonl")
        return count

    def export_text(self, fmt: str, **filters: Any) -> str:
        buffer = io.StringIO()
        self.export(buffer, fmt, **filters)
        return buffer.getvalue()
