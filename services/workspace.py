"""`Workspace`: the narrow interface the console and the command line are handed.

It owns the store, the audit trail, the Square gateway and the credentials, and offers the jobs
operators do: import and revoke consent, refresh the queue, preview, complete, recover, verify.
Screens and commands never reach past it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import orjson

from services.audit import AuditAction, AuditTrail, VerifyReport
from services.changes import ChangeFeed, PolledChangeFeed
from services.checkpoints import CheckpointAnchor, default_checkpoint_dir
from services.completion import (
    ApprovedItem,
    BatchProgress,
    OrderResult,
    approved_set_sha256,
)
from services.completion.approvals import (
    Approvals,
    FourEyesPolicy,
    approval_items,
    approval_totals,
)
from services.completion.leases import holder_gone
from services.consent import (
    ConsentRecord,
    ConsentStatus,
    consent_rule_problems,
    problem_line,
    read_consent_file,
    record_sha256,
)
from services.credentials import MerchantCredentials, load_credentials
from services.discovery import (
    NEEDED_SCOPES,
    MerchantDiscovery,
    TokenHealth,
    discover,
    order_row,
    reads_in_full,
)
from services.discovery_processes import discover_in_processes, processes_for
from services.eligibility import (
    ConsentView,
    EligibilityReason,
    LimitedItem,
    apply_batch_limits,
)
from services.errors import AuditChainError, ConfigurationError, ConsentFileError
from services.money import major_text, totals_by_currency
from services.presence import EXPIRY_S, HEARTBEAT_S, Presence, online
from services.processes import HOST
from services.settings import ReconSettings
from services.square_gateway import RetryPolicy, SquareGateway
from services.square_models import decode_order
from services.store import (
    Approval,
    OperatorSession,
    QueuedOrder,
    Store,
    StoredConsent,
    database_errors,
    open_store,
    utc_text,
)
from services.timestamps import parse_time

if TYPE_CHECKING:
    import httpx

    from services.completion.engine import CompletionEngine

__all__ = ["ConsentLine", "Hold", "MerchantDetail", "MerchantOverview", "Preview",
           "Workspace"]



@dataclass(frozen=True)
class Hold:
    """Why an order that passes every eligibility rule cannot be completed now. `reason` is a
    code (TOKEN_MISSING_SCOPES, MERCHANT_LEASED, BATCH_LIMIT_REACHED, ...); `detail` the facts
    behind it (the scopes the token lacks, who holds the lease)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Preview:
    """Exactly what the operator approves: (merchant, order, version) pairs and their totals
    (minor units per currency per merchant). The console writes them for people."""

    items: list[ApprovedItem]
    totals: dict[str, dict[str, int]]
    names: dict[str, str]
    held_back: list[tuple[QueuedOrder, str]]
    sha256: str

    @property
    def count(self) -> int:
        return len(self.items)

    def per_merchant(self) -> list[tuple[str, int, dict[str, int]]]:
        """(merchant id, order count, totals per currency), by merchant id."""
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.merchant_id] = counts.get(item.merchant_id, 0) + 1
        return [(merchant_id, counts.get(merchant_id, 0), by_currency)
                for merchant_id, by_currency in sorted(self.totals.items())]


@dataclass(frozen=True)
class MerchantOverview:
    merchant_id: str
    business_name: str
    consent_status: str            # active, expiring, expired, revoked, not_yet_effective, none
    consent_expires_at: str | None
    token_health: str
    error: str | None
    candidates: int
    totals: dict[str, int]
    oldest_candidate_at: str | None
    age_buckets: tuple[int, ...]   # candidates aged <1d, 1-3d, 3-7d, 7-14d, >=14d
    next_sync_in: timedelta | None
    waiting_without_consent: int   # candidate-looking orders with NO_CONSENT (reminders)
    leased_by: str | None = None   # another live run working on this merchant, and since when
    held: int = 0                  # eligible, but not completable now (see Workspace.holds)
    consent_effective_from: str | None = None  # when a not-yet-effective consent starts

    @property
    def urgency(self) -> tuple[int, float]:
        sync = self.next_sync_in.total_seconds() if self.next_sync_in else 1e9
        return (0 if self.candidates else 1, sync)


@dataclass(frozen=True)
class ConsentLine:
    consent_id: str
    status: str
    effective_from: datetime
    expires_at: datetime | None
    max_orders_per_batch: int | None
    max_amount_per_batch: tuple[int, str] | None
    location_ids: str | tuple[str, ...]
    revoked_at: datetime | None


@dataclass(frozen=True)
class MerchantDetail:
    """One merchant, in full, for the merchants screen's detail pane."""

    merchant_id: str
    business_name: str
    token_health: str
    token_expires_at: datetime | None
    token_scopes: tuple[str, ...]
    timezone: str | None
    locations: tuple[tuple[str, str], ...]         # (name, status)
    refreshed_at: datetime | None
    refreshed_age: timedelta | None
    error: str | None
    consents: tuple[ConsentLine, ...]
    batches: tuple[dict[str, Any], ...]           # newest first, with outcome counts
    # (day, counts by age or None when nothing was recorded, rebuilt from open orders?)
    history: tuple[tuple[date, tuple[int, int, int, int, int] | None, bool], ...]


@dataclass
class Workspace:
    settings: ReconSettings
    store: Store
    gateway: SquareGateway
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _credentials: dict[str, MerchantCredentials] | None = None
    credentials_error: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    recover_left_alone: list[str] = field(default_factory=list)
    _consent_cache: dict[str, tuple[int, list[tuple[ConsentRecord, str]]]] = field(
        default_factory=dict)
    # Why the last automatic checkpoint was not written (a batch never fails for it).
    checkpoint_problem: str | None = None
    presence: Presence | None = None  # this process's operator session, once online
    # Processes a large discovery may use (services/discovery_processes.py): set by `open`
    # from the settings when the workspace is all of the settings' own making.
    discovery_processes: int = 1

    @classmethod
    def open(cls, settings: ReconSettings, http: httpx.AsyncClient | None = None,
             credentials: dict[str, MerchantCredentials] | None = None,
             retry: RetryPolicy | None = None) -> Workspace:
        store = open_store(settings.db, pg_pool_max=settings.pg_pool_max)
        gateway = SquareGateway(settings.base_url, http, timeout_s=settings.request_timeout_s,
                                retry=retry or RetryPolicy(attempts=settings.read_retries + 1))
        return cls(settings=settings, store=store, gateway=gateway, _credentials=credentials,
                   discovery_processes=settings.discovery_processes
                   if http is None and credentials is None else 1)

    @property
    def audit(self) -> AuditTrail:
        return AuditTrail(self.store, self.clock)

    @property
    def operator(self) -> str:
        return self.settings.operator

    async def aclose(self) -> None:
        if self.presence is not None:
            self.presence.stop()
        await self.gateway.aclose()
        self.store.close()

    @contextmanager
    def own_connection(self) -> Iterator[Workspace]:
        """This workspace on a database connection of its own, for a worker thread (SQLite
        connections stay in their thread; the UI thread keeps using the first one)."""
        if self.store.location == ":memory:":  # nothing else can open it: the one connection
            yield self
            return
        store = self.store.for_thread()
        try:
            yield replace(self, store=store)
        finally:
            store.close()

    # ------------------------------------------------------------------ credentials
    def credentials(self, required: bool = True) -> dict[str, MerchantCredentials]:
        if self._credentials is None:
            try:
                self._credentials = load_credentials(self.settings.credentials)
            except ConfigurationError as error:
                self.credentials_error = str(error)
                if required:
                    raise
                return {}
        return self._credentials

    # ------------------------------------------------------------------ consent
    def import_consent_files(self, paths: Sequence[Path],
                             on_warning: Callable[[str], None] | None = None
                             ) -> list[tuple[Path, str, str]]:
        """All or nothing: every record of every file is checked first (schema, model, dates,
        revoked ids, one content per id), then all are stored in one transaction. Otherwise
        ConsentFileError with one line per problem, and nothing is stored.
        Returns (file, consent_id, 'new' | 'new_version' | 'unchanged') per record."""
        now = self.clock()
        problems: list[str] = []
        found: list[tuple[Path, str, ConsentRecord, dict[str, Any], str]] = []
        for path in paths:
            records, lines = read_consent_file(path)
            problems += lines
            for where, record, document in records:
                problems += [problem_line(where, p) for p in consent_rule_problems(record, now)]
                found.append((path, where, record, document, record_sha256(document)))
        first: dict[str, tuple[str, str]] = {}
        for _, where, record, _, digest in found:
            seen = first.setdefault(record.consent_id, (where, digest))
            if seen[1] != digest:
                problems.append(f"{where}: consent {record.consent_id} is also in {seen[0]} "
                                "with different content; import one version of it.")
        results = []
        with self.store.transaction():
            # Checked under the write lock, so a revoke cannot slip in between.
            revoked = self.store.revocations()
            for _, where, record, _, digest in found:
                owner = self.store.consent_merchant_id(record.consent_id)
                if owner is not None and owner != record.merchant_id:
                    # A consent is one merchant's word: the same id can never cover another.
                    problems.append(
                        f"{where}: consent {record.consent_id} belongs to merchant {owner}, "
                        f"not {record.merchant_id}; nothing was imported. A consent for "
                        "another merchant needs its own record with a new consent_id.")
                durable = revoked.get(record.consent_id)
                if (durable is not None and durable.revoked_at <= now
                        and self.store.latest_consent_sha256(record.consent_id) != digest):
                    problems.append(
                        f"{where}: consent {record.consent_id} was revoked at "
                        f"{durable.revoked_at.isoformat()} and stays revoked; nothing was "
                        "imported. To reinstate the merchant, import a new consent record "
                        "with a new consent_id.")
            if problems:
                raise ConsentFileError("\n".join(problems))  # rolls back: nothing stored
            for path, _, record, document, digest in found:
                state, version = self.store.save_consent(record, document, self.operator,
                                                         str(path))
                if state != "unchanged":
                    if record.revocation is not None:
                        self.store.record_revocation(record, self.operator, str(path))
                    self.audit.append(operator=self.operator,
                                      action=AuditAction.CONSENT_IMPORTED,
                                      merchant_id=record.merchant_id,
                                      consent_id=record.consent_id, consent_sha256=digest,
                                      detail=f"{state} (version {version}) from {path.name}")
                results.append((path, record.consent_id, state))
        if on_warning is not None:
            for warning in self._merchants_without_credentials(
                    sorted({record.merchant_id for _, _, record, _, _ in found})):
                on_warning(warning)
        return results

    def _merchants_without_credentials(self, merchant_ids: list[str]) -> list[str]:
        """A consent for a merchant with no token is stored, but cannot be used: say so."""
        credentials = self.credentials(required=False)
        if self._credentials is None:
            return [f"could not check the merchants against the credentials "
                    f"({self.credentials_error})"]
        return [f"merchant {m} has no entry in {self.settings.credentials}: its consent is "
                "stored, but its orders cannot be read or completed until it has a token."
                for m in merchant_ids if m not in credentials]

    def consents(self) -> list[StoredConsent]:
        return self.store.consents()

    def consents_for(self, merchant_id: str) -> list[tuple[ConsentRecord, str]]:
        """The merchant's consents as the database holds them right now. The table only ever
        grows (a change is a new version), so its last rowid tells whether a cached answer
        is still current: one cheap query per call instead of parsing every record."""
        revision = self.store.consents_revision()
        cached = self._consent_cache.get(merchant_id)
        if cached is not None and cached[0] == revision:
            return cached[1]
        records = [(c.record, c.sha256) for c in self.store.consents(merchant_id)]
        self._consent_cache[merchant_id] = (revision, records)
        return records

    def consents_by_merchant(self) -> dict[str, list[ConsentRecord]]:
        grouped: dict[str, list[ConsentRecord]] = {}
        for stored in self.store.consents():
            grouped.setdefault(stored.record.merchant_id, []).append(stored.record)
        return grouped

    def revoke_consent(self, consent_id: str, by: str, reason: str) -> StoredConsent:
        [stored] = self._revoke(lambda c: c.record.consent_id == consent_id, by, reason,
                                f"Unknown consent {consent_id}: see `recon-console consent "
                                "list`.")
        return stored

    def revoke_all_for_merchant(self, merchant_id: str, by: str, reason: str
                                ) -> list[StoredConsent]:
        """Every consent of the merchant not yet revoked, in one transaction."""
        return self._revoke(lambda c: c.record.merchant_id == merchant_id, by, reason,
                            f"Merchant {merchant_id} has no consents: see `recon-console "
                            "consent list`.")

    def _revoke(self, chosen: Callable[[StoredConsent], bool], by: str, reason: str,
                unknown: str) -> list[StoredConsent]:
        now = self.clock()
        revocation = {"revoked_at": now.isoformat().replace("+00:00", "Z"),
                      "revoked_by": by, "reason": reason}
        with self.store.transaction():
            targets = [c for c in self.store.consents() if chosen(c)]
            if not targets:
                raise ConfigurationError(unknown)
            # A revocation dated in the future is not in force yet: revoking now still works.
            live = [c for c in targets if c.record.status_at(now) is not ConsentStatus.REVOKED]
            if not live:
                done = targets[0].record.revocation
                assert done is not None
                which = (f"Consent {targets[0].record.consent_id} was" if len(targets) == 1
                         else f"All {len(targets)} consents of merchant "
                              f"{targets[0].record.merchant_id} were")
                raise ConfigurationError(f"{which} already revoked (at "
                                         f"{done.revoked_at.isoformat()}).")
            revoked_ids = set()
            for current in live:
                document = {**current.document, "revocation": revocation}
                record = ConsentRecord.model_validate(document)
                revoked_ids.add(record.consent_id)
                self.store.save_consent(record, document, self.operator, "revoke")
                self.store.record_revocation(record, self.operator, "revoke")
                self.audit.append(operator=self.operator,
                                  action=AuditAction.CONSENT_REVOKED,
                                  merchant_id=record.merchant_id,
                                  consent_id=record.consent_id,
                                  consent_sha256=record_sha256(document),
                                  detail=f"revoked by {by}: {reason}"[:500])
        # Orders these consents made eligible are not any more.
        for merchant_id in sorted({c.record.merchant_id for c in live}):
            self.reclassify(merchant_id)
        self.write_checkpoint()
        return [c for c in self.store.consents() if c.record.consent_id in revoked_ids]

    def consents_still_granting(self, merchant_id: str) -> list[StoredConsent]:
        """The merchant's consents that are active now or will become active: while any is
        left, revoking one consent does not stop the merchant's orders."""
        now = self.clock()
        return [c for c in self.store.consents(merchant_id)
                if c.record.status_at(now) in (ConsentStatus.ACTIVE,
                                               ConsentStatus.NOT_YET_EFFECTIVE)]

    def reclassify(self, merchant_id: str) -> None:
        """Re-run classification on stored orders after consent changed (no Square call)."""
        consents = [c for c, _ in self.consents_for(merchant_id)]
        now = self.clock()
        view = ConsentView.build(consents, now)
        rows = []
        for document, seen_at in self.store.order_documents(merchant_id):
            order = decode_order(document)
            rows.append(order_row(order, merchant_id, consents, now, seen_at, view))
        self.store.replace_orders(merchant_id, rows)

    # ------------------------------------------------------------------ discovery and queue
    async def refresh(self, merchant_ids: Sequence[str] | None = None,
                      on_merchant: Callable[[MerchantDiscovery], None] | None = None,
                      full: bool = False,
                      on_written: Callable[[list[MerchantDiscovery]], None] | None = None,
                      on_merchant_written: Callable[[MerchantDiscovery], None] | None = None
                      ) -> list[MerchantDiscovery]:
        """By change since the last refresh; `full` re-reads every order. `on_written`: called
        once every merchant's orders are written, before the backlog history is recorded.
        `on_merchant_written`: called as each merchant this process discovers is done (its
        orders written, or its failure recorded); unlike `on_merchant`, it keeps no share of
        the merchants from a second process (whose merchants come only to `on_written`)."""
        credentials = self.credentials()
        if merchant_ids is not None:
            unknown = [m for m in merchant_ids if m not in credentials]
            if unknown:
                raise ConfigurationError(f"Unknown merchant {unknown[0]}: it has no entry in "
                                         f"{self.settings.credentials}.")
        now = self.clock()
        wanted = list(merchant_ids) if merchant_ids is not None else sorted(credentials)
        consents = self.consents_by_merchant()

        def each(report: MerchantDiscovery) -> None:
            for hook in (on_merchant, on_merchant_written):
                if hook is not None:
                    hook(report)

        async def here(ids: list[str], concurrency: int,
                       claim: Callable[[int], bool] | None = None) -> list[MerchantDiscovery]:
            return await discover(self.gateway, self.store, credentials, consents, now,
                                  concurrency=concurrency, merchant_ids=ids,
                                  on_merchant=each, full=full, claim=claim)
        processes, heavy = (1, []) if on_merchant is not None else \
            self._discovery_plan(wanted, full, now)
        if processes > 1:
            light = set(wanted) - set(heavy)
            reports = await discover_in_processes(
                self.settings, heavy + [m for m in wanted if m in light], now, full,
                self.settings.max_concurrent_merchants, processes, here)
            order = {merchant_id: index for index, merchant_id in enumerate(wanted)}
            reports.sort(key=lambda report: order[report.merchant_id])
        else:
            reports = await here(wanted, self.settings.max_concurrent_merchants)
        if on_written is not None:
            on_written(reports)
        self.record_backlog([r.merchant_id for r in reports if r.refreshed])
        return reports

    def _discovery_plan(self, wanted: Sequence[str], full: bool, now: datetime
                        ) -> tuple[int, list[str]]:
        """How many processes a refresh of `wanted` runs in, and the merchants read in full
        (shared out evenly among them first). Other processes only where they can open all
        this one has: the settings' database file or URL, credentials file and Square (not a
        client or credentials handed in), and with no one waiting on each merchant's report
        as it comes (`on_merchant`)."""
        if self.store.location == ":memory:" or self.discovery_processes <= 1:
            return 1, []
        # Worth a second interpreter only for many merchants read in full (a first
        # discovery, `--full`, the daily full read).
        heavy = [m for m in wanted if reads_in_full(self.store, m, full, now)]
        return processes_for(len(heavy), self.discovery_processes), heavy

    def refresh_in_processes(self, merchant_ids: Sequence[str] | None = None,
                             full: bool = False) -> bool:
        """Whether `refresh(merchant_ids, full=full)` (without `on_merchant`) would share its
        merchants out over several processes, as it stands now."""
        wanted = list(merchant_ids) if merchant_ids is not None else sorted(self.credentials())
        return self._discovery_plan(wanted, full, self.clock())[0] > 1

    def record_backlog(self, merchant_ids: Sequence[str], days: int = 30) -> None:
        """Today's candidates by age, per merchant just refreshed: the chart's history.

        A merchant's first snapshot also rebuilds the days before it from the candidates open
        now (each day counts those created by then, at their age then). Orders completed
        since are missing from those days, so they are marked rebuilt and a later refresh's
        record always wins."""
        now = self.clock()
        today = now.astimezone(UTC).date()
        recorded, rebuilt = [], []
        first = {m for m in merchant_ids if not self.store.has_backlog_history(m)}
        # Counted by the database from the text, not parsed here (issue 11: 100,000 times at
        # every refresh): how many were created at or before now - n days, for the n that
        # today's buckets need, and for a first snapshot those of the 29 days before too.
        moment = now.astimezone(UTC)
        ages = {False: (1, 3, 7, 14), True: tuple(range(1, days + 14))}
        counted: dict[str, tuple[int, ...] | None] = {}
        for is_first, ns in ages.items():
            counted.update(self.store.candidates_by_age(
                [m for m in merchant_ids if (m in first) is is_first],
                [_millis_text(moment - timedelta(days=n)) for n in ns]))
        for merchant_id in merchant_ids:
            ns = ages[merchant_id in first]
            counts = counted.get(merchant_id, (0,) * (len(ns) + 1))
            if counts is not None:
                found = dict(zip(ns, counts[1:], strict=True))
                total, older = counts[0], found.__getitem__
            else:  # a created_at in another form than Square's: read here, as it always was
                total, older = _older_parsed(self.store.candidate_created_at(merchant_id), now)
            recorded.append((today.isoformat(), merchant_id,
                             _buckets(total, *(older(n) for n in (1, 3, 7, 14)))))
            if merchant_id in first:
                for back in range(1, days):
                    rebuilt.append(((today - timedelta(days=back)).isoformat(), merchant_id,
                                    _buckets(*(older(back + n) for n in (0, 1, 3, 7, 14)))))
        self.store.record_backlog(recorded, utc_text(now))
        self.store.record_backlog(rebuilt, utc_text(now), rebuilt=True)

    def merchant_detail(self, merchant_id: str, days: int = 30) -> MerchantDetail | None:
        """What the merchants screen's detail pane shows for one merchant."""
        merchant = self.store.merchant(merchant_id)
        if merchant is None:
            return None
        now = self.clock()
        consents = [ConsentLine(r.consent_id, r.status_at(now).value, r.effective_from,
                                r.expires_at, r.scope.max_orders_per_batch,
                                (r.scope.max_amount_per_batch.amount,
                                 r.scope.max_amount_per_batch.currency)
                                if r.scope.max_amount_per_batch else None,
                                r.location_ids, r.revocation.revoked_at if r.revocation
                                else None)
                    for r, _ in self.consents_for(merchant_id)]
        today = now.astimezone(UTC).date()
        first = today - timedelta(days=days - 1)
        stored = self.store.backlog_history(merchant_id, first.isoformat())
        history = [(day, *stored.get(day.isoformat(), (None, False)))
                   for day in (first + timedelta(days=n) for n in range(days))]
        refreshed = _instant(merchant.get("discovered_at"))
        return MerchantDetail(
            merchant_id=merchant_id,
            business_name=merchant.get("business_name") or merchant_id,
            token_health=merchant.get("token_health") or "unknown",
            token_expires_at=_instant(merchant.get("token_expires_at")),
            token_scopes=tuple(s for s in (merchant.get("token_scopes") or "").split(",") if s),
            timezone=merchant.get("timezone"),
            locations=tuple((loc.get("name") or loc["id"], loc.get("status") or "")
                            for loc in orjson.loads(merchant.get("locations_json") or "[]")),
            refreshed_at=refreshed, refreshed_age=now - refreshed if refreshed else None,
            error=merchant.get("discovery_error"),
            consents=tuple(consents), batches=tuple(self.store.recent_batches(merchant_id)),
            history=tuple(history))

    def queue(self, merchant_id: str | None = None, include_ineligible: bool = True,
              ordered: bool = True) -> list[QueuedOrder]:
        return self.store.queued_orders(merchant_id, eligible_only=not include_ineligible,
                                        ordered=ordered)

    def merchant_names(self) -> dict[str, str]:
        return {m["merchant_id"]: m.get("business_name") or m["merchant_id"]
                for m in self.store.merchants()}

    def location_names(self) -> dict[str, str]:
        import orjson
        names: dict[str, str] = {}
        for merchant in self.store.merchants():
            for location in orjson.loads(merchant.get("locations_json") or "[]"):
                names[location["id"]] = location.get("name") or location["id"]
        return names

    def overview(self) -> list[MerchantOverview]:
        now = self.clock()
        consents = self.consents_by_merchant()
        rows = []
        orders_by_merchant: dict[str, list[QueuedOrder]] = {}
        # Unordered: grouped here, and `holds` sorts for itself (a plain scan of the table,
        # not a walk of the index in merchant and age order).
        for order in self.store.queued_orders(ordered=False):
            orders_by_merchant.setdefault(order.merchant_id, []).append(order)
        leased = self.leased_merchants()
        # A candidate is what a batch would send now: held orders are counted apart.
        held = self.holds(order for group in orders_by_merchant.values() for order in group)
        for merchant in self.store.merchants():
            merchant_id = merchant["merchant_id"]
            status, expires = _consent_summary(consents.get(merchant_id, []), now)
            orders = orders_by_merchant.get(merchant_id, [])
            candidates = [o for o in orders if o.eligible and o.order_id not in held]
            totals = totals_by_currency(candidates)
            buckets = age_buckets(candidates, now)
            rows.append(MerchantOverview(
                merchant_id=merchant_id,
                business_name=merchant.get("business_name") or merchant_id,
                consent_status=status, consent_expires_at=expires,
                token_health=merchant.get("token_health") or "unknown",
                error=merchant.get("discovery_error"), candidates=len(candidates),
                totals=totals,
                oldest_candidate_at=min((o.created_at for o in candidates), default=None),
                age_buckets=tuple(buckets),
                next_sync_in=_next_sync(merchant.get("sync_time"), merchant.get("timezone"),
                                        now),
                waiting_without_consent=sum(1 for o in orders if o.reason in _REMINDER_REASONS),
                leased_by=leased.get(merchant_id),
                held=sum(1 for o in orders if o.order_id in held),
                consent_effective_from=_not_yet_effective_from(consents.get(merchant_id, []),
                                                               now)))
        return sorted(rows, key=lambda r: (r.urgency, r.business_name))

    # ------------------------------------------------------------------ completing
    def preview(self, merchant_ids: Sequence[str] | None = None,
                order_ids: Sequence[str] | None = None, max_orders: int | None = None,
                record: bool = True) -> Preview:
        """The candidates to approve, oldest first, within each consent's batch limits."""
        wanted_orders = set(order_ids) if order_ids else None
        known = {m["merchant_id"] for m in self.store.merchants()}
        for merchant_id in merchant_ids or []:
            if merchant_id not in known:
                raise ConfigurationError(f"Unknown merchant {merchant_id}: run `recon-console "
                                         "queue` first, or check the id.")
        candidates = [o for o in self.store.queued_orders(eligible_only=True)
                      if (merchant_ids is None or o.merchant_id in merchant_ids)
                      and (wanted_orders is None or o.order_id in wanted_orders)]
        kept, holds = self._split(candidates)
        held = [(order, hold.reason) for order, hold in holds]
        if max_orders is not None and len(kept) > max_orders:
            held += [(o, "MAX_ORDERS") for o in kept[max_orders:]]
            kept = kept[:max_orders]
        items = [ApprovedItem(o.merchant_id, o.order_id, o.version or 0) for o in kept]
        # The kept orders are among the candidates just read: priced from them, the queue is
        # read once (a second read of 100,000 orders cost the console's preview ~0.3 s).
        preview = self.preview_of(items, held, orders=kept)
        if record:
            self.audit.append(operator=self.operator, action=AuditAction.PREVIEW,
                              approved_set_sha256=preview.sha256,
                              detail=_preview_record(preview)[:500])
        return preview

    def holds(self, orders: Iterable[QueuedOrder]) -> dict[str, Hold]:
        """Order id -> why it cannot be completed now, for the eligible ones among `orders`
        that a preview of all of them would hold back. The queue shows these apart from the
        candidates, so what it counts is what a confirmation will hold."""
        _, held = self._split([o for o in orders if o.eligible])
        return {order.order_id: hold for order, hold in held}

    def _split(self, candidates: list[QueuedOrder]
               ) -> tuple[list[QueuedOrder], list[tuple[QueuedOrder, Hold]]]:
        """Eligible orders -> those a batch sends now (oldest first, within each consent's
        batch limits) and those held back, each with why."""
        candidates = sorted(candidates, key=lambda o: (o.created_at, o.order_id))
        merchants = {m["merchant_id"]: m for m in self.store.merchants()}
        leased = self.leased_merchants()
        consents = {c.record.consent_id: c.record for c in self.store.consents()}
        held: list[tuple[QueuedOrder, Hold]] = []
        open_: list[QueuedOrder] = []
        for order in candidates:
            merchant = merchants.get(order.merchant_id, {})
            health = merchant.get("token_health")
            if health in _UNHEALTHY_TOKENS:
                # A token that cannot write would fail every call.
                held.append((order, Hold(f"TOKEN_{str(health).upper()}",
                                         _token_problem(merchant))))
            elif order.merchant_id in leased:  # another live run is sending for it
                held.append((order, Hold("MERCHANT_LEASED", leased[order.merchant_id])))
            elif order.version is None:
                held.append((order, Hold("NO_VERSION", "refresh from Square")))
            elif order.consent_id not in consents:
                held.append((order, Hold(EligibilityReason.NO_CONSENT.value)))
            else:
                open_.append(order)
        limited = [LimitedItem((o.merchant_id, o.order_id), consents[o.consent_id or ""],
                               o.total_amount) for o in open_]
        kept_keys, held_keys = apply_batch_limits(limited)
        by_key = {(o.merchant_id, o.order_id): o for o in open_}
        held += [(by_key[k], Hold(EligibilityReason.BATCH_LIMIT_REACHED.value,
                                  by_key[k].consent_id or "")) for k in held_keys]
        return [by_key[k] for k in kept_keys], held

    def preview_of(self, items: list[ApprovedItem],
                   held_back: list[tuple[QueuedOrder, str]] | None = None,
                   orders: Iterable[QueuedOrder] | None = None) -> Preview:
        """A preview of exactly these (merchant, order, version) items, with their totals
        per currency per merchant from the queue (e.g. to retry only the failed); `orders`:
        queued orders already read that hold every item, else the queue is read."""
        amounts = {o.order_id: o for o in (self.store.queued_orders(ordered=False)
                                            if orders is None else orders)}
        by_merchant: dict[str, list[QueuedOrder]] = {}
        for item in items:
            order = amounts.get(item.order_id)
            if order is not None:
                by_merchant.setdefault(item.merchant_id, []).append(order)
        totals = {m: totals_by_currency(orders) for m, orders in by_merchant.items()}
        return Preview(items, totals, self.merchant_names(), held_back or [],
                       approved_set_sha256(items))

    def engine(self) -> CompletionEngine:
        # Imported here: only completing and recovering need the engine (start-up cost).
        from services.completion.engine import CompletionEngine

        ttl = self.settings.lease_ttl_s
        options = {"four_eyes": self.four_eyes, "lease_ttl_s": ttl,
                   "heartbeat_s": min(5.0, ttl / 3), **self.engine_options}
        return CompletionEngine(self.store, self.audit, self.gateway, self.credentials(),
                                self.consents_for, self.clock, self.operator, **options)

    # ------------------------------------------------------------------ four-eyes
    @property
    def four_eyes(self) -> FourEyesPolicy:
        return FourEyesPolicy(self.settings.four_eyes_orders, self.settings.four_eyes_amount,
                              timedelta(minutes=self.settings.approval_ttl_minutes),
                              timedelta(minutes=self.settings.four_eyes_window_minutes))

    @property
    def approvals(self) -> Approvals:
        return Approvals(self.store, self.audit, self.four_eyes, self.clock)

    def needs_second_operator(self, preview: Preview) -> str | None:
        """Why this preview may only run with another operator's approval, or None."""
        return self.approvals.why_needed(preview.items, self.operator)

    def prepare_batch(self, preview: Preview) -> Approval:
        """Store the preview (its exact set, hash and totals) for a second operator."""
        why = self.needs_second_operator(preview) or "prepared for a second operator"
        return self.approvals.prepare(str(uuid.uuid4()), preview.items, self.operator,
                                      preview.totals, why)

    def decide_batch(self, batch_id: str, approve: bool, reason: str | None) -> Approval:
        """This operator approves or rejects another's prepared batch (ApprovalRefused for
        one's own, or one already decided)."""
        return self.approvals.decide(batch_id, self.operator, approve, reason)

    def prepared_batch(self, batch_id: str) -> tuple[Approval, Preview]:
        """A prepared batch and its preview with the totals its preparer saw."""
        approval = self.approvals.get(batch_id)
        items = approval_items(approval)
        return approval, Preview(items, approval_totals(approval), self.merchant_names(), [],
                                 approval.approved_set_sha256)

    def pending_batches(self) -> list[Approval]:
        """Waiting for a decision, or approved and not yet run nor expired."""
        return self.approvals.listed()

    async def complete(self, preview: Preview | Sequence[ApprovedItem], *,
                       cancel: asyncio.Event | None = None,
                       on_progress: Callable[[BatchProgress], None] | None = None,
                       batch_id: str | None = None) -> tuple[str, list[OrderResult]]:
        """Run a batch (a preview, or exactly these items, e.g. to retry the failed), then
        anchor the audit outside the database, even if the batch stopped on an error.
        `batch_id`: a prepared batch, run under its four-eyes approval (the engine checks)."""
        items = preview.items if isinstance(preview, Preview) else list(preview)
        try:
            batch_id, results = await self.engine().run(items, cancel=cancel,
                                                        on_progress=on_progress,
                                                        batch_id=batch_id)
            self._record_unknown_outcomes(batch_id, results)
            return batch_id, results
        finally:
            self.write_checkpoint()

    def _record_unknown_outcomes(self, batch_id: str, results: list[OrderResult]) -> None:
        """The engine leaves an unanswered call's intent open for `recover` and writes no
        outcome for it; the operator was shown "failed, outcome unknown", so the audit says
        so too (`outcome:failed` finds it). `recover` later adds what Square settled."""
        unknown = [r for r in results if r.reason == "OUTCOME_UNKNOWN"]
        if not unknown:
            return
        with self.store.transaction():
            for result in unknown:
                self.audit.append(operator=self.operator, action=AuditAction.OUTCOME,
                                  merchant_id=result.merchant_id, order_id=result.order_id,
                                  version=result.version, batch_id=batch_id,
                                  outcome=result.outcome.value,
                                  detail=f"{result.reason}: {result.detail}"[:500])

    async def recover(self) -> list[OrderResult]:
        """Settle open intents whose lease holder is gone; `recover_left_alone` then says
        which were left to a live holder (another process or operator)."""
        engine = self.engine()
        try:
            results = await engine.recover()
        finally:
            self.write_checkpoint()
        self.recover_left_alone = engine.recovery.left_alone
        return results

    def open_intent_count(self, settleable_only: bool = False) -> int:
        """Intents without an outcome; `settleable_only`: not those of merchants another live
        run holds (they are its in-flight work, not ours to settle)."""
        if not settleable_only:
            return self.store.open_intent_count()
        leased = self.leased_merchants()
        return sum(1 for row in self.store.open_intents() if row["merchant_id"] not in leased)

    def leased_merchants(self) -> dict[str, str]:
        """Merchants another live holder is working on: merchant id -> who and since when."""
        return {lease.merchant_id: lease.describe() for lease in self.store.leases()
                if not holder_gone(lease) and (lease.host, lease.pid) != (HOST, os.getpid())}

    # ------------------------------------------------------------------ presence and changes
    def go_online(self, kind: str, heartbeat_s: float = HEARTBEAT_S) -> Presence:
        """Register this process as an operator session (a console, a batch command), heart-
        beaten while the event loop runs and ended by `aclose`."""
        if self.presence is None:
            self.presence = Presence(self.store, self.operator, kind, heartbeat_s=heartbeat_s)
            self.presence.start()
        return self.presence

    def online(self, expiry_s: float = EXPIRY_S) -> list[OperatorSession]:
        """Operator sessions heard from within the expiry (real time, not `clock`: other
        processes heart-beat in real time)."""
        return online(self.store, expiry_s=expiry_s)

    def changes(self) -> ChangeFeed:
        """What tells an open console that another process changed what it shows:
        LISTEN/NOTIFY on PostgreSQL, a poll of the change counter on SQLite."""
        feed: ChangeFeed | None = self.store.change_feed()
        return feed if feed is not None else PolledChangeFeed(self.store)

    # ------------------------------------------------------------------ audit
    @property
    def checkpoints(self) -> CheckpointAnchor:
        directory = self.settings.checkpoint_dir or default_checkpoint_dir(
            self.settings.credentials, self.settings.db)
        return CheckpointAnchor(directory, self.settings.credentials)

    def write_checkpoint(self, output: Path | None = None, *, automatic: bool = True
                         ) -> Path | None:
        """Sign the chain's size and head into the checkpoint folder (or `output`).
        Automatic ones (after a batch, a recovery, a revocation) skip an unchanged chain and
        never raise: the reason lands in `checkpoint_problem` for the caller to show."""
        if not automatic:
            return self.checkpoints.write(self.audit, output)
        self.checkpoint_problem = None
        try:
            return self.checkpoints.write(self.audit, output, skip_if_unchanged=True)
        except _checkpoint_failures() as error:
            self.checkpoint_problem = str(error)
            return None

    def verify(self, checkpoint_file: Path | None = None, *, own_connection: bool = False
               ) -> VerifyReport:
        """The chain against the latest signed checkpoint (or the one given). With
        own_connection, on a connection of its own, to run in a worker thread."""
        if not own_connection:
            return self.checkpoints.verify(self.audit, checkpoint_file)
        store = self.store.for_thread()
        try:
            return self.checkpoints.verify(AuditTrail(store), checkpoint_file)
        finally:
            store.close()


def _checkpoint_failures() -> tuple[type[BaseException], ...]:
    """Why an automatic checkpoint may not be written (reported, never raised)."""
    return (AuditChainError, ConfigurationError, OSError, *database_errors())

_UNHEALTHY_TOKENS = {TokenHealth.EXPIRED, TokenHealth.REVOKED, TokenHealth.INVALID,
                     TokenHealth.MISSING_SCOPES, TokenHealth.MERCHANT_MISMATCH}
# Orders that would be candidates but for consent: their merchants get friendly reminders.
_REMINDER_REASONS = {EligibilityReason.NO_CONSENT, EligibilityReason.CONSENT_EXPIRED,
                     EligibilityReason.CONSENT_REVOKED,
                     EligibilityReason.CONSENT_NOT_YET_EFFECTIVE}


def _token_problem(merchant: dict[str, Any]) -> str:
    """What is wrong with the merchant's token, in its facts (the scopes it lacks)."""
    if merchant.get("token_health") == TokenHealth.MISSING_SCOPES:
        have = set((merchant.get("token_scopes") or "").split(","))
        missing = [s for s in NEEDED_SCOPES if s not in have]
        return ", ".join(missing)
    return str(merchant.get("token_health") or "")


def _preview_record(preview: Preview) -> str:
    """The audit's note of a preview: counts and totals, per merchant (written as everywhere
    else: "275900 GBP" in minor units read as £275,900 on the audit screen)."""
    return "; ".join(
        f"{merchant_id}: {count} orders, " + ", ".join(major_text(amount, currency)
                                                 for currency, amount in sorted(totals.items()))
        for merchant_id, count, totals in preview.per_merchant()) or "nothing eligible"


def _not_yet_effective_from(records: list[ConsentRecord], now: datetime) -> str | None:
    starts = [r.effective_from for r in records
              if r.status_at(now) is ConsentStatus.NOT_YET_EFFECTIVE]
    return min(starts).isoformat() if starts else None


def age_bucket(created_at: str, now: datetime) -> int:
    """The Ages column's bucket: <1d, 1-3d, 3-7d, 7-14d, >=14d."""
    days = (now - parse_time(created_at)).total_seconds() \
        / 86400
    return 0 if days < 1 else 1 if days < 3 else 2 if days < 7 else 3 if days < 14 else 4


def age_buckets(orders: Sequence[QueuedOrder], now: datetime) -> tuple[int, int, int, int, int]:
    counts = [0, 0, 0, 0, 0]
    for order in orders:
        counts[age_bucket(order.created_at, now)] += 1
    return (counts[0], counts[1], counts[2], counts[3], counts[4])


_DAY_MICROS = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (floats would blur a bucket's edge)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _millis_text(moment: datetime) -> str:
    """`moment` (UTC) in Square's form, to the millisecond below: a time of that form is at
    or before `moment` exactly when it is at or before this text."""
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _buckets(total: int, day1: int, day3: int, day7: int, day14: int
             ) -> tuple[int, int, int, int, int]:
    """`age_buckets` from how many there are and how many are at least 1, 3, 7, 14 days old
    (a count is then the difference of two)."""
    return (total - day1, day1 - day3, day3 - day7, day7 - day14, day14)


def _older_parsed(created_at: Iterable[str], now: datetime) -> tuple[int, Callable[[int], int]]:
    """How many there are, and how many were created at or before now - n days: from the
    times themselves, each parsed once and sorted (a count is then one bisect)."""
    created = sorted(_micros(parse_time(text)) for text in created_at)
    end = _micros(now)
    return len(created), lambda n: bisect_right(created, end - n * _DAY_MICROS)


def _instant(text: str | None) -> datetime | None:
    return parse_time(text) if text else None


def _consent_summary(records: list[ConsentRecord], now: datetime) -> tuple[str, str | None]:
    if not records:
        return "none", None
    statuses = [(r.status_at(now), r) for r in records]
    active = [r for s, r in statuses if s is ConsentStatus.ACTIVE]
    if active:
        best = max(active, key=lambda r: r.expires_at or datetime.max.replace(tzinfo=UTC))
        expires = best.expires_at.isoformat() if best.expires_at else None
        return ("expiring" if best.expiring_soon(now) else "active"), expires
    for status in (ConsentStatus.REVOKED, ConsentStatus.EXPIRED,
                   ConsentStatus.NOT_YET_EFFECTIVE):
        if any(s is status for s, _ in statuses):
            return status.value, None
    return "none", None


def _next_sync(sync_time: str | None, timezone: str | None, now: datetime) -> timedelta | None:
    """Time until the merchant's next daily sync, at its sync time in its own timezone.

    The wall-clock time is built in the merchant's zone, then both ends are compared as UTC
    instants: subtracting two datetimes of the same zone is wall-clock arithmetic in Python and
    is an hour off across a DST change. A sync time that falls in a spring-forward gap runs at
    the instant the clock would have shown it before the change (fold=0)."""
    if not sync_time or not timezone:
        return None
    try:
        zone = ZoneInfo(timezone)
    except Exception:
        return None
    hours, minutes = (int(part) for part in sync_time.split(":"))
    local = now.astimezone(zone)
    for day in (local.date(), local.date() + timedelta(days=1)):
        target = datetime(day.year, day.month, day.day, hours, minutes, tzinfo=zone)
        gap = target.astimezone(UTC) - now.astimezone(UTC)
        if gap > timedelta(0):
            return gap
    return None  # unreachable: tomorrow's sync is always after now
