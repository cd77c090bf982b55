"""`recon-console db migrate --to postgresql://...`: one specialist's SQLite database becomes the
team's PostgreSQL one.

Refused while completion intents are open: an interrupted batch is settled by `recover` against
Square first, on the machine that ran it, so no order's fate is carried over half-known. (The
issue asks both to copy open intents and to refuse while there are any; refusing wins, and the
settled intents, with their attempt numbers, are copied.) The audit chain is verified before
(against the file's latest signed checkpoint) and after (on PostgreSQL, from the first entry),
and must end at the same size and head hash; then a signed checkpoint anchors the new database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.audit import AuditTrail, VerifyReport
from services.checkpoints import CheckpointAnchor, default_checkpoint_dir
from services.database_url import (
    check_database_url,
    connect_kwargs,
    display_url,
    provide_password,
)
from services.errors import AuditChainError, ConfigurationError
from services.settings import ReconSettings
from services.storage.postgres import PostgresStore
from services.storage.sqlite import SQLiteStore
from services.storage.transfer import copy_tables, source_snapshot

__all__ = ["MigrationReport", "migrate_to_postgres"]


@dataclass(frozen=True)
class MigrationReport:
    source: str
    target: str                  # shown without any password
    rows: dict[str, int]
    entries: int
    head_hash: str
    checkpoint: Path | None

    def sentence(self) -> str:
        counts = ", ".join(f"{count} {table}" for table, count in self.rows.items())
        where = f"; checkpoint {self.checkpoint}" if self.checkpoint else ""
        return (f"Copied {self.source} to {self.target}: {counts}. Audit chain verified before "
                f"and after: {self.entries} entries, same head {self.head_hash[:12]}{where}. "
                "Point every console at the new database (RECON_DB) and stop using the file.")


def migrate_to_postgres(settings: ReconSettings, to_url: str) -> MigrationReport:
    source_path = settings.db
    if not isinstance(source_path, Path):
        raise ConfigurationError("db migrate copies from a SQLite file: give the file with "
                                 "--db PATH (or RECON_DB) and the PostgreSQL URL with --to")
    if not source_path.is_file():
        raise ConfigurationError(f"no SQLite database at {source_path}: give the file to copy "
                                 "with --db PATH")
    try:
        to_url = check_database_url(to_url)
    except ValueError as error:
        raise ConfigurationError(f"--to: {error}") from None
    provide_password(to_url, settings.credentials)

    source = SQLiteStore(source_path, migrate=False)
    try:
        source_anchor = CheckpointAnchor(settings.checkpoint_dir or default_checkpoint_dir(
            settings.credentials, source_path), settings.credentials)
        target = PostgresStore(to_url, password=connect_kwargs(to_url).get("password"))
        try:
            with source_snapshot(source):
                before = _verified(source_anchor.verify(AuditTrail(source)), "before the copy",
                                   str(source_path))
                checked: list[VerifyReport] = []

                def same_chain_or_nothing() -> None:
                    # On the copy, inside its transaction: a mismatch commits nothing.
                    after = _verified(AuditTrail(target).verify(), "after the copy",
                                      display_url(to_url))
                    if (after.entries, after.head_hash) != (before.entries, before.head_hash):
                        raise AuditChainError(
                            f"the copied audit chain ends at entry {after.entries} with head "
                            f"{after.head_hash[:12]}, the SQLite one at {before.entries} with "
                            f"head {before.head_hash[:12]}: nothing was copied; report this")
                    checked.append(after)
                copied = copy_tables(source, target, before_commit=same_chain_or_nothing)
            after = checked[0]
            checkpoint = None
            if after.entries:
                target_anchor = CheckpointAnchor(default_checkpoint_dir(
                    settings.credentials, to_url), settings.credentials)
                checkpoint = target_anchor.write(AuditTrail(target))
        finally:
            target.close()
    finally:
        source.close()
    return MigrationReport(str(source_path), display_url(to_url), copied.rows, after.entries,
                           after.head_hash, checkpoint)


def _verified(report: VerifyReport, when: str, where: str) -> VerifyReport:
    if not report.ok:
        raise AuditChainError(f"the audit chain of {where} does not verify {when}: "
                              f"{report.sentence()} Nothing was copied; find out why first "
                              "(`recon-console audit verify`)")
    return report
