"""Discovery: for every merchant with credentials, find its OPEN orders and classify them.

Merchants run concurrently (bounded); each one's token health, profile and locations come first,
then SearchOrders over its ACTIVE locations in chunks of 10, every cursor followed. A failure is
recorded on that merchant and never stops the others; its cached orders stay (marked stale by
the caller), except under a token that is another merchant's: those are dropped, because
nothing seen through such a token may be filed under this merchant.

Refresh by change (issue 11): a location read before keeps a mark, the moment that read began.
The next refresh asks only for orders in every state updated since the mark (less
`MARK_MARGIN`, for clock skew between us and Square and Square's indexing delay), sorted by
UPDATED_AT as Square requires: OPEN ones are written anew, the others removed. A location with
no mark, or whose last full read is older than `FULL_EVERY`, or every location under
`full=True`, is read in full (OPEN orders) and its rows replaced. Stored rows whose verdict may
have moved since (the merchant's consent view changed, or only time: TOO_RECENT) are classified
again from their `order_json`. Everything a merchant's refresh writes goes in one transaction
(with other merchants' writes of the moment: `_Commits`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from services.consent import ConsentRecord
from services.credentials import MerchantCredentials
from services.eligibility import ConsentView, classify
from services.errors import (
    ReconError,
    SquareAuthError,
    SquareScopeError,
    TokenMerchantMismatch,
)
from services.square_gateway import SquareGateway
from services.square_models import (
    Classifiable,
    Location,
    OrderStruct,
    StoredOrder,
    decode_order,
    encode_stored,
    stored_order,
)
from services.store import ORDER_COLUMNS, Store, utc_text
from services.timestamps import parse_time

__all__ = ["FULL_EVERY", "MARK_MARGIN", "NEEDED_SCOPES", "MerchantDiscovery", "TokenHealth",
           "changes_query", "consent_signature", "discover", "order_row", "order_values",
           "reads_in_full"]

NEEDED_SCOPES = ("ORDERS_READ", "ORDERS_WRITE", "PAYMENTS_READ", "MERCHANT_PROFILE_READ")
TOKEN_EXPIRY_WARNING = timedelta(days=8)
OPEN_ORDERS_QUERY = {"filter": {"state_filter": {"states": ["OPEN"]}},
                     "sort": {"sort_field": "CREATED_AT", "sort_order": "ASC"}}
ALL_STATES = ["OPEN", "COMPLETED", "CANCELED", "DRAFT"]
# A mark is our clock when a read began; Square stamps `updated_at` with its own. The margin
# covers the two clocks disagreeing and Square indexing a change a little late.
MARK_MARGIN = timedelta(minutes=5)
# Past this, a location is read in full again: a safety net for anything the marks missed
# (an order that reached Square late with an old `updated_at`, a skew beyond the margin).
FULL_EVERY = timedelta(days=1)
# How long a merchant's order writes may wait to be committed with others' (`_Commits`).
COMMIT_WINDOW = timedelta(milliseconds=100)


class TokenHealth:
    VALID = "valid"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    REVOKED = "revoked"
    INVALID = "invalid"
    MISSING_SCOPES = "missing_scopes"
    MERCHANT_MISMATCH = "merchant_mismatch"   # Square says the token is another merchant's
    UNKNOWN = "unknown"


@dataclass
class MerchantDiscovery:
    merchant_id: str
    business_name: str | None = None
    token_health: str = TokenHealth.UNKNOWN
    error: str | None = None
    orders: int = 0
    eligible: int = 0
    refreshed: bool = False     # its orders were re-read from Square just now
    locations: list[Location] = field(default_factory=list)


def _fulfillment_summary(order: StoredOrder) -> str:
    return ",".join([f"{f.type}:{f.state}" for f in order.fulfillments])


def order_values(order: Classifiable, merchant_id: str, consents: Sequence[ConsentRecord],
                 now: datetime, seen_at: str, view: ConsentView | None = None
                 ) -> tuple[Any, ...]:
    """The `orders` row of one order, in `ORDER_COLUMNS` order. 100,000 of these per full
    discovery: the order is turned into the stored one first, whose plain fields are read
    (classified, written) faster than the slim order's properties."""
    stored = stored_order(order)
    verdict = classify(stored, consents, now, view)
    reason, consent = verdict.reason, verdict.consent
    return (stored.id, merchant_id, stored.location_id, stored.version, stored.state,
            stored.source_name, stored.reference_id, stored.total_amount, stored.currency,
            stored.amount_due, stored.created_at, stored.updated_at, int(verdict.eligible),
            reason.value if reason else None, verdict.detail,
            consent.consent_id if consent else None,
            _fulfillment_summary(stored), encode_stored(stored), seen_at)


def order_row(order: Classifiable, merchant_id: str, consents: Sequence[ConsentRecord],
              now: datetime, seen_at: str, view: ConsentView | None = None
              ) -> dict[str, object]:
    return dict(zip(ORDER_COLUMNS, order_values(order, merchant_id, consents, now, seen_at,
                                                view), strict=True))


def changes_query(since: datetime) -> dict[str, Any]:
    """SearchOrders' query for orders in every state changed since `since`."""
    start = since.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"filter": {"state_filter": {"states": ALL_STATES},
                       "date_time_filter": {"updated_at": {"start_at": start}}},
            "sort": {"sort_field": "UPDATED_AT", "sort_order": "ASC"}}


def consent_signature(view: ConsentView) -> str:
    """Changes whenever a verdict could change for a reason other than the order or time:
    a consent added, changed, revoked, or moving into or out of force."""
    parts = sorted((c.model_dump_json(), status.value)
                   for c, status in zip(view.consents, view.statuses, strict=True))
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()


def _plan(active: list[str], marks: dict[str, tuple[str, str]], synced: bool, full: bool,
          now: datetime) -> tuple[list[str], list[str]]:
    """(locations read in full, locations read by change) of a merchant's refresh."""
    whole = [loc for loc in active
             if full or not synced or loc not in marks
             or now - parse_time(marks[loc][1]) >= FULL_EVERY]
    return whole, [loc for loc in active if loc not in whole]


def reads_in_full(store: Store, merchant_id: str, full: bool, now: datetime) -> bool:
    """Whether this refresh reads some of the merchant's orders in full: the heavy part of
    a discovery (a refresh by change reads only what changed). `_plan`'s rule, over the
    locations read last time (a merchant never read has none: read in full)."""
    marks = store.order_marks(merchant_id)
    synced = store.order_sync(merchant_id) is not None
    return not marks or bool(_plan(list(marks), marks, synced, full, now)[0])


_Pages = tuple[list[list[OrderStruct]], list[list[OrderStruct]]]


async def _fetch(gateway: SquareGateway, creds: MerchantCredentials, whole: list[str],
                 by_change: list[str], marks: dict[str, tuple[str, str]]) -> _Pages:
    """The SearchOrders pages of a plan: OPEN orders of `whole`, changes at `by_change`."""
    full_pages: list[list[OrderStruct]] = []
    for start in range(0, len(whole), 10):
        async for page in gateway.search_orders(creds, whole[start:start + 10],
                                                OPEN_ORDERS_QUERY):
            full_pages.append(page)
    change_pages: list[list[OrderStruct]] = []
    for start in range(0, len(by_change), 10):
        chunk = by_change[start:start + 10]
        since = min(parse_time(marks[loc][0]) for loc in chunk) - MARK_MARGIN
        async for page in gateway.search_orders(creds, chunk, changes_query(since)):
            change_pages.append(page)
    return full_pages, change_pages


class _Slot:
    """A merchant's place among those talking to Square at once (`concurrency`). Given back
    (`leave`) as soon as its reads are done: its writes then wait to be committed with others'
    (`_Commits`) while the next merchant's requests are already on their way, so Square's
    latency and the CPU of writing overlap instead of taking turns."""

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self.gate, self.held = gate, False

    async def __aenter__(self) -> _Slot:
        await self.gate.acquire()
        self.held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.leave()

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()


class _Commits:
    """Merchants' order writes, committed several at a time (issue 11).

    Order ids are random, so one merchant's 500 rows touch ~400 pages of the order_id
    index, and each commit writes every page it touched to the log: 200 commits of one
    merchant each wrote ~400 MB for 100,000 orders, mostly the same index pages again. A
    merchant's write (`commit`) therefore waits, in memory, until every merchant in
    progress is waiting too or `window_s` has passed, and all waiting writes are made in
    one transaction. The database is locked only while they are written (no await inside),
    so other writers (the other discovery process, another console) wait no longer than
    before. No savepoint per merchant (re-changing pages under a savepoint copies them
    first, which cost more than the grouping saved): when one write fails, the whole
    transaction is rolled back, and every merchant in it raises that error (which fails
    the refresh; the merchants keep what they had, marks included)."""

    def __init__(self, store: Store, window_s: float) -> None:
        self.store = store
        self.window_s = window_s
        self.running = 0          # merchants in progress (started, not yet written)
        self.parts: list[Callable[[], None]] = []
        self.done: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def commit(self, part: Callable[[], None]) -> None:
        """Make `part`'s writes, with others, in one transaction; return once committed."""
        loop = asyncio.get_running_loop()
        if self.done is None:
            self.done = loop.create_future()
            self.timer = loop.call_later(self.window_s, self.flush)
        done = self.done
        self.parts.append(part)
        self.flush_if_all_wait()
        await asyncio.shield(done)

    def flush_if_all_wait(self) -> None:
        """Nothing else can come while every merchant in progress waits: commit now."""
        if self.parts and len(self.parts) >= self.running:
            self.flush()

    def flush(self) -> None:
        parts, done, timer = self.parts, self.done, self.timer
        self.parts, self.done, self.timer = [], None, None
        if timer is not None:
            timer.cancel()
        if done is None:
            return
        try:
            with self.store.cache_transaction():
                for part in parts:
                    part()
        except Exception as error:
            done.set_exception(error)
            done.exception()  # raised in each waiting merchant; none left unretrieved
        else:
            done.set_result(None)


async def _read_orders(gateway: SquareGateway, store: Store, creds: MerchantCredentials,
                       active: list[str], consents: Sequence[ConsentRecord], now: datetime,
                       full: bool, merchant_row: dict[str, object], commits: _Commits,
                       slot: _Slot, early: tuple[list[str], asyncio.Task[_Pages]] | None = None
                       ) -> None:
    """Read the merchant's orders from Square (in full or by change) and write them, with
    the merchant's row, in one transaction (`commits`). `early`: the same reads, started
    with the locations stored at the last refresh (active ones, in order); used only if
    Square's locations are still those."""
    merchant_id = creds.merchant_id
    seen_at = utc_text(now)
    view = ConsentView.build(consents, now)
    signature = consent_signature(view)
    marks = store.order_marks(merchant_id)
    sync = store.order_sync(merchant_id)
    whole, by_change = _plan(active, marks, sync is not None, full, now)
    if early is not None and early[0] == active:
        full_pages, change_pages = await early[1]
    else:
        full_pages, change_pages = await _fetch(gateway, creds, whole, by_change, marks)
    # Done with Square: the next merchant's requests are on their way while this one's rows
    # are made and wait to be committed with others' (`_Commits`), so Square's latency and
    # this work overlap instead of taking turns. Commit groups stay as large (a full read of
    # 100,000 orders over two processes: ~8 merchants a commit either way), and the wall
    # of a full discovery in the parent spent waiting for answers went from ~1.0 to ~0.6 s.
    slot.leave()
    rows: list[tuple[Any, ...]] = [order_values(order, merchant_id, consents, now, seen_at, view)
                                   for page in full_pages for order in page]
    # Sorted by UPDATED_AT, an order changed while we page comes again later: the last wins.
    changed: dict[str, tuple[Any, ...] | None] = {}
    for page in change_pages:
        for order in page:
            changed[order.id] = (order_values(order, merchant_id, consents, now, seen_at, view)
                                 if order.state == "OPEN" else None)
    rows.extend(row for row in changed.values() if row is not None)

    # Rows outside `active` can exist only if the locations changed: the marks are saved with
    # the rows, for the active locations, at every refresh. Otherwise the check is skipped,
    # a read of every row of the merchant (~0.08 s over 100,000 orders).
    moved = not marks or set(marks) != set(active)

    def write() -> None:
        store.upsert_merchant(merchant_row)
        store.drop_orders(merchant_id, keep_locations=active if moved else None,
                          at_locations=whole,
                          order_ids=[oid for oid, row in changed.items() if row is None])
        store.write_orders(rows)
        if by_change:
            # Unchanged rows were classified under the consents and moment of an earlier
            # refresh: classify again those whose verdict may have moved since.
            again = store.orders_json(merchant_id, None if sync is None or sync[1] != signature
                                      else "TOO_RECENT")
            verdicts = []
            for order_id, document in again:
                verdict = classify(decode_order(document), consents, now, view)
                verdicts.append((int(verdict.eligible),
                                 verdict.reason.value if verdict.reason else None,
                                 verdict.detail,
                                 verdict.consent.consent_id if verdict.consent else None,
                                 order_id))
            store.update_verdicts(verdicts)
        store.save_order_marks(merchant_id, {
            loc: (seen_at, seen_at if loc in whole else marks[loc][1]) for loc in active})
        store.save_order_sync(merchant_id, seen_at, signature)
    await commits.commit(write)


def _start_early_reads(gateway: SquareGateway, store: Store, creds: MerchantCredentials,
                       full: bool, now: datetime, stored: dict[str, Any] | None
                       ) -> tuple[list[str], asyncio.Task[_Pages]] | None:
    """The order reads of this refresh, started beside the profile and locations requests
    with the ACTIVE locations stored last time (`stored`: the merchant's row; a round trip
    less per merchant): only the token's identity must come first, and it has. None for a
    merchant never read."""
    if not stored or not stored.get("locations_json"):
        return None
    active = [str(loc["id"]) for loc in orjson.loads(str(stored["locations_json"]))
              if loc.get("status") == "ACTIVE"]
    marks = store.order_marks(creds.merchant_id)
    whole, by_change = _plan(active, marks, store.order_sync(creds.merchant_id) is not None,
                             full, now)
    return active, asyncio.ensure_future(_fetch(gateway, creds, whole, by_change, marks))


def _drop(task: asyncio.Task[_Pages]) -> None:
    """Cancel early reads nobody used (Square's locations had changed, or the merchant
    failed), and retrieve their error, so none is reported as never retrieved."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def _discover_one(gateway: SquareGateway, store: Store, creds: MerchantCredentials,
                        consents: Sequence[ConsentRecord], now: datetime, full: bool,
                        commits: _Commits, slot: _Slot) -> MerchantDiscovery:
    report = MerchantDiscovery(creds.merchant_id)
    early: tuple[list[str], asyncio.Task[_Pages]] | None = None
    row: dict[str, object] = {"merchant_id": creds.merchant_id,
                              "sync_time": creds.sync_time.strftime("%H:%M")
                              if creds.sync_time else None}
    profile: asyncio.Future[Any] | None = None

    def ask_profile() -> asyncio.Future[Any]:
        """The merchant's profile and locations, together (each answer or its error)."""
        return asyncio.gather(gateway.merchant(creds), gateway.locations(creds),
                              return_exceptions=True)

    try:
        stored = store.merchant(creds.merchant_id)
        gateway.recall_owner(creds, stored.get("token_sha256") if stored else None)
        if gateway.owner_confirmed(creds):
            # Square said before that this token is this merchant's: its scopes, profile,
            # locations and orders are asked at once, a round trip less. Nothing read is
            # used unless the token's status below is good.
            early = _start_early_reads(gateway, store, creds, full, now, stored)
            profile = ask_profile()
        try:
            status = await gateway.token_status(creds)
        except ReconError as error:
            if isinstance(error, SquareAuthError):
                report.token_health = {"ACCESS_TOKEN_EXPIRED": TokenHealth.EXPIRED,
                                       "ACCESS_TOKEN_REVOKED": TokenHealth.REVOKED}.get(
                    error.code, TokenHealth.INVALID)
            if profile is not None and not isinstance(error, TokenMerchantMismatch):
                # merchants/me, asked beside the status, may have named another merchant:
                # that stands whatever became of the status.
                named = (await profile)[0]
                if isinstance(named, TokenMerchantMismatch):
                    raise named from None
            raise
        missing = [s for s in NEEDED_SCOPES if s not in status.scopes]
        expires = parse_time(status.expires_at) if status.expires_at else None
        if missing:
            report.token_health = TokenHealth.MISSING_SCOPES
        elif expires is not None and expires - now <= TOKEN_EXPIRY_WARNING:
            report.token_health = TokenHealth.EXPIRING
        else:
            report.token_health = TokenHealth.VALID
        row.update(token_expires_at=status.expires_at, token_scopes=",".join(status.scopes),
                   # Square has just confirmed whose it is (see recall_owner).
                   token_sha256=gateway.confirmation_sha256(creds))
        if profile is None:  # nothing asked beside the status: all at once now
            if "ORDERS_READ" not in missing:
                early = _start_early_reads(gateway, store, creds, full, now, stored)
            profile = ask_profile()
        merchant_or_error, locations_or_error = await profile
        for outcome in (merchant_or_error, locations_or_error):
            if isinstance(outcome, BaseException):
                raise outcome
        assert not isinstance(merchant_or_error, BaseException)
        assert not isinstance(locations_or_error, BaseException)
        merchant, locations = merchant_or_error, locations_or_error
        report.business_name = merchant.business_name
        report.locations = locations
        active = [loc.id for loc in locations if loc.status == "ACTIVE"]
        timezone = next((loc.timezone for loc in locations if loc.timezone), None)
        row.update(business_name=merchant.business_name, country=merchant.country,
                   currency=merchant.currency, timezone=timezone,
                   locations_json=orjson.dumps([loc.model_dump() for loc in locations]).decode(),
                   fetched_at=utc_text(now))
        if "ORDERS_READ" in missing:
            raise SquareScopeError(status=403, code="INSUFFICIENT_SCOPES",
                                   detail="ORDERS_READ missing")
        if missing:
            report.error = (f"Token lacks {', '.join(missing)}: orders are shown but cannot be "
                            "completed until the merchant re-authorizes.")
        row.update(token_health=report.token_health, discovery_error=report.error,
                   discovered_at=utc_text(now))
        await _read_orders(gateway, store, creds, active, consents, now, full, row, commits,
                           slot, early)
        report.refreshed = True
        report.orders, report.eligible = store.merchant_order_counts(creds.merchant_id)
        return report
    except TokenMerchantMismatch as error:
        report.token_health = TokenHealth.MERCHANT_MISMATCH
        report.error = str(error)
        row["token_sha256"] = None
        # Whatever is stored under this id may have come through that token: none of it may
        # stay a candidate, and the next good refresh reads everything again.
        store.replace_orders(creds.merchant_id, [])
        with store.transaction():
            store.save_order_marks(creds.merchant_id, {})
    except ReconError as error:
        report.error = str(error)
    finally:
        if early is not None:
            _drop(early[1])
        if profile is not None and not profile.done():
            profile.cancel()
    row.update(token_health=report.token_health, discovery_error=report.error,
               discovered_at=utc_text(now))
    with store.cache_transaction():
        store.upsert_merchant(row)
    return report


async def discover(gateway: SquareGateway, store: Store,
                   credentials: dict[str, MerchantCredentials],
                   consents: dict[str, list[ConsentRecord]], now: datetime, *,
                   concurrency: int = 16, merchant_ids: Sequence[str] | None = None,
                   on_merchant: Callable[[MerchantDiscovery], None] | None = None,
                   full: bool = False, claim: Callable[[int], bool] | None = None
                   ) -> list[MerchantDiscovery]:
    """`full`: read every order again instead of what changed since the last refresh.
    `claim(index)`: whether this process takes `merchant_ids[index]` (False: another process
    has it, and this one reports nothing of it), asked as its turn comes (in order)."""
    wanted = list(merchant_ids) if merchant_ids is not None else sorted(credentials)
    gate = asyncio.Semaphore(concurrency)
    commits = _Commits(store, COMMIT_WINDOW.total_seconds())

    async def one(index: int, merchant_id: str) -> MerchantDiscovery | None:
        async with _Slot(gate) as slot:
            if claim is not None and not claim(index):
                return None
            commits.running += 1
            try:
                report = await _discover_one(gateway, store, credentials[merchant_id],
                                             consents.get(merchant_id, []), now, full,
                                             commits, slot)
            finally:
                commits.running -= 1
                commits.flush_if_all_wait()
        if on_merchant is not None:
            on_merchant(report)
        return report

    with store.large_writes():
        try:
            return [report for report in await asyncio.gather(
                *(one(index, m) for index, m in enumerate(wanted))) if report is not None]
        finally:
            commits.flush()  # the writes of merchants cancelled while they waited
