"""The headless commands: each opens a `Workspace`, does one job, prints, returns an exit code.

`--json` documents go to stdout and nothing else does; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from console.output import (
    EXIT_CANCELLED,
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    OBJECTS_SEPARATOR,
    err,
    install_cancel,
    print_json,
    print_json_objects,
)
from console.wording import format_money, preview_lines
from services.completion import NOT_RECORDED, BatchProgress, Outcome, SkipReason
from services.consent import ConsentStatus
from services.errors import ApprovalRefused, ConfigurationError, ConsentFileError, ReconError
from services.private_files import open_private
from services.settings import ReconSettings
from services.store import Approval, Store, utc_text
from services.text_safety import printable
from services.timestamps import parse_time
from services.workspace import Preview, Workspace

# A listing's columns: (tsv header, table heading); a heading of None is tsv only (an id
# the table leaves out for room, which a script needs).
Columns = Sequence[tuple[str, str | None]]


def print_listing(args: argparse.Namespace, columns: Columns,
                  rows: Iterable[Sequence[Any]]) -> None:
    """A listing on stdout as `--format` says (json is printed by the caller): a Rich table,
    or tab-separated lines with every value in full, each cell through `printable` so outside
    text stays inert and on its own line (a tab or newline in a value shows as ␉ or ␊)."""
    if args.output_format == "tsv":
        lines = ["\t".join(key for key, _ in columns)]
        lines.extend("\t".join(printable("" if value is None else str(value))
                               for value in row) for row in rows)
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        return
    # Rich (and our safe text on it) is imported here: `--json` and tsv never need it
    # (start-up cost).
    from rich.console import Console
    from rich.table import Table

    from console.safe_text import safe

    shown = [index for index, (_, heading) in enumerate(columns) if heading is not None]
    table = Table(*(columns[index][1] or "" for index in shown))
    for row in rows:
        table.add_row(*(safe(row[index]) for index in shown))
    # Off a terminal (`--format table > file`) Rich would cut the table to 80 columns.
    sized = sys.stdout.isatty() or "COLUMNS" in os.environ
    Console(width=None if sized else 10_000).print(table)


def consent(args: argparse.Namespace, settings: ReconSettings) -> int:
    workspace = Workspace.open(settings)
    try:
        if args.consent_command == "import":
            try:
                results = workspace.import_consent_files(
                    args.files, on_warning=lambda text: err(f"warning: {text}"))
            except ConsentFileError as error:
                for line in str(error).splitlines():  # one line per problem
                    err(f"error: {line}")
                return EXIT_USAGE
            for path, consent_id, state in results:
                err(f"{path}: {consent_id}: {state.replace('_', ' ')}")
            return EXIT_OK
        if args.consent_command == "list":
            now = workspace.clock()
            rows = [{"consent_id": c.record.consent_id, "merchant_id": c.record.merchant_id,
                     "status": c.record.status_at(now).value,
                     "expiring_soon": c.record.expiring_soon(now),
                     "effective_from": c.record.effective_from.isoformat(),
                     "expires_at": c.record.expires_at.isoformat()
                     if c.record.expires_at else None,
                     "revoked_at": c.record.revocation.revoked_at.isoformat()
                     if c.record.revocation else None,
                     "grantor": c.record.grantor.name, "version": c.version,
                     "record_sha256": c.sha256} for c in workspace.consents()]
            if args.json:
                print_json({"consents": rows})
            else:
                print_listing(args, [("consent_id", "consent"), ("merchant_id", "merchant"),
                                     ("status", "status"), ("effective_from", None),
                                     ("expires_at", "expires"), ("revoked_at", None),
                                     ("grantor", "grantor")],
                              [(row["consent_id"], row["merchant_id"], row["status"],
                                row["effective_from"],
                                row["expires_at"] or ("—" if args.output_format == "table"
                                                      else ""),
                                row["revoked_at"], row["grantor"]) for row in rows])
            return EXIT_OK
        if args.all_for_merchant is not None:
            revoked = workspace.revoke_all_for_merchant(args.all_for_merchant, args.by,
                                                        args.reason)
        else:
            revoked = [workspace.revoke_consent(args.consent_id, args.by, args.reason)]
        for stored in revoked:
            err(f"{stored.record.consent_id}: revoked from "
                f"{stored.record.revocation.revoked_at.isoformat()}"  # type: ignore[union-attr]
                f" (merchant {stored.record.merchant_id}).")
        _name_consents_left(workspace, revoked[0].record.merchant_id)
        _checkpoint_note(workspace)
        return EXIT_OK
    finally:
        asyncio.run(workspace.aclose())


def _name_consents_left(workspace: Workspace, merchant_id: str) -> None:
    """Revoking one record of a merchant with a renewal must not look like stopping it."""
    left = workspace.consents_still_granting(merchant_id)
    if not left:
        return
    now = workspace.clock()
    named = []
    for stored in left:
        record = stored.record
        if record.status_at(now) is ConsentStatus.NOT_YET_EFFECTIVE:
            named.append(f"{record.consent_id} (effective from "
                         f"{record.effective_from.isoformat()})")
        else:
            until = record.expires_at.isoformat() if record.expires_at else "no expiry"
            named.append(f"{record.consent_id} (active, until {until})")
    err(f"Merchant {merchant_id} stays eligible under {len(left)} other consent(s): "
        f"{', '.join(named)}. To revoke them all: recon-console consent revoke "
        f"--all-for-merchant {merchant_id} --by NAME --reason TEXT")


async def _recover_first(workspace: Workspace) -> None:
    if workspace.open_intent_count():
        err(f"recovering {workspace.open_intent_count()} unsettled intent(s) first…")
        results = await workspace.recover()
        for result in results:
            err(f"  {result.order_id}: {result.outcome.value} {result.reason or ''}")
        for line in workspace.recover_left_alone:
            err(f"  left alone (live lease): {line}")


def _report_merchants(reports: list[Any]) -> None:
    for report in reports:
        if report.error:
            err(f"{report.merchant_id} ({report.business_name or '?'}): {report.error}")


def _age(now: datetime, moment: str | None) -> str:
    """'45s', '12m', '2h', '3d': how long ago `moment` (RFC 3339) was."""
    if not moment:
        return "?"
    seconds = max(0, int((now - parse_time(moment))
                         .total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _merchants_part(reports: Sequence[Any]) -> dict[str, Any]:
    """`queue --json`'s part after the orders: the merchants refreshed just now."""
    return {"merchants": [{"merchant_id": r.merchant_id, "business_name": r.business_name,
                           "token_health": r.token_health, "error": r.error,
                           "open_orders": r.orders, "eligible": r.eligible,
                           "stale": not r.refreshed} for r in reports]}


def _print_queue_document(store: Store, reports: Sequence[Any],
                          args: argparse.Namespace) -> None:
    """`queue --json`'s document: the orders, built by the database, not an object per order
    (issue 11); then the merchants refreshed just now."""
    print_json_objects("orders", store.queued_orders_json(
        sorted(r.merchant_id for r in reports if r.refreshed),
        eligible_only=not args.include_ineligible, merchant_ids=args.merchant or None),
        _merchants_part(reports))


class _QueueJsonMeanwhile:
    """`queue --json`'s orders, built while the refresh runs by a worker thread with a second
    SQLite connection (issue 11): each merchant's as soon as its refresh is over and every
    merchant before it in the document's order is done, so SQLite builds the JSON on the
    other core while this thread waits for Square, not after. A merchant's orders are one
    text (`queued_orders_json_joined`): the thread takes the GIL once a merchant, not once an
    order. The text is kept until every merchant is written, then written out by the
    thread while this one records the backlog history: a refresh that fails before prints
    no document, as before.

    The merchants that may gain or lose orders are those refreshed (the `--merchant`s, else
    every merchant with credentials); any other merchant's orders are as stored already.
    If the refresh's reports are not for exactly those, the document is built afterwards,
    as without a worker."""

    # Merchants written between two wakes of the thread, and at most in one text (one
    # merchant's is ~0.2 MB at 500 orders).
    GROUP = 32

    def __init__(self, workspace: Workspace, args: argparse.Namespace) -> None:
        import threading

        from services.storage.sqlite import SQLiteStore

        self.args = args
        self.store = workspace.store
        self.changed = threading.Condition()
        self.written: dict[str, bool] = {}    # merchant -> refreshed, as each one is done
        self.reports: list[Any] | None = None  # every merchant's: the refresh is over
        self.abandoned = False
        self.printed = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        # Not beside a discovery shared out over processes (many merchants read in full):
        # there both cores are busy discovering, and building meanwhile cost a full
        # discovery of 100,000 orders ~1 s of wall and 1.5 s of CPU (3.17 -> 4.15 s,
        # bench.discovery, 2026-12-03); after it, the document takes its turn as before.
        if args.json and isinstance(self.store, SQLiteStore) and \
                self.store.location != ":memory:" and \
                not workspace.refresh_in_processes(args.merchant, full=args.full):
            refreshed = set(args.merchant if args.merchant is not None
                            else workspace.credentials())
            self.thread = threading.Thread(target=self._build, args=(refreshed,),
                                           name="queue-json", daemon=True)
            self.thread.start()

    def merchant_written(self, report: Any) -> None:
        with self.changed:
            self.written[report.merchant_id] = report.refreshed
            # Woken a group at a time: each wake takes the GIL from the event loop.
            if len(self.written) % self.GROUP == 0:
                self.changed.notify()

    def all_written(self, reports: list[Any]) -> None:
        with self.changed:
            self.reports = reports
            self.written.update((r.merchant_id, r.refreshed) for r in reports)
            self.changed.notify()

    def abandon(self) -> None:
        """The refresh failed: the thread stops, nothing is written."""
        with self.changed:
            self.abandoned = True
            self.changed.notify()
        if self.thread is not None:
            self.thread.join()

    def _build(self, refreshed: set[str]) -> None:
        from services.storage.sqlite import SQLiteStore

        try:
            reader = SQLiteStore(self.store.location, migrate=False)
            try:
                blocks = self._blocks(reader, refreshed)
            finally:
                reader.close()
            if blocks is not None and self.reports is not None:
                print_json_objects("orders", ([block] for block in blocks),
                                   _merchants_part(self.reports))
                self.printed = True
        except BaseException as error:  # raised by `print`, in the command's thread
            self.error = error

    def _blocks(self, reader: Store, refreshed: set[str]) -> list[bytes] | None:
        merchants = sorted(set(reader.merchants_with_orders()) | refreshed)
        if self.args.merchant:
            merchants = [m for m in merchants if m in self.args.merchant]
        blocks: list[bytes] = []
        done = 0
        while True:
            with self.changed:
                while True:
                    if self.abandoned:
                        return None
                    ready = []  # (merchant, stale) of the next merchants, all done
                    for merchant_id in merchants[done:done + self.GROUP]:
                        if merchant_id in self.written:
                            ready.append((merchant_id, not self.written[merchant_id]))
                        elif merchant_id not in refreshed:
                            ready.append((merchant_id, True))
                        else:
                            break
                    over = self.reports is not None
                    if ready or over:
                        break
                    self.changed.wait()
            block = reader.queued_orders_json_joined(
                ready, OBJECTS_SEPARATOR, eligible_only=not self.args.include_ineligible)
            if block:
                blocks.append(block)
            done += len(ready)
            if over and not ready:
                break
        assert self.reports is not None
        if done < len(merchants) or {r.merchant_id for r in self.reports} != refreshed:
            return None
        return blocks

    def written_out(self) -> bool:
        """Wait for the document; False where the caller must build it (no worker, or not
        the merchants it expected)."""
        if self.thread is None:
            return False
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.printed


def queue(args: argparse.Namespace, settings: ReconSettings) -> int:
    async def run() -> int:
        workspace = Workspace.open(settings)
        try:
            await _recover_first(workspace)
            document = _QueueJsonMeanwhile(workspace, args)
            try:
                reports = await workspace.refresh(
                    args.merchant, full=args.full, on_written=document.all_written,
                    on_merchant_written=document.merchant_written)
            except BaseException:
                document.abandon()
                raise
            refreshed = {r.merchant_id for r in reports if r.refreshed}
            now = workspace.clock()
            names = workspace.merchant_names()
            failed = [r for r in reports if not r.refreshed]
            for report in reports:
                name = report.business_name or names.get(report.merchant_id, "?")
                problem = " ".join((report.error or "").split())
                if not report.refreshed:
                    last = max((o.fetched_at or "" for o in workspace.queue(report.merchant_id)),
                               default="")
                    cached = (f"showing its orders as fetched {_age(now, last)} ago (stale)"
                              if last else "no cached orders")
                    err(f"not refreshed: {report.merchant_id} ({name}): "
                        f"{problem.rstrip('.')}; {cached}.")
                elif problem:
                    err(f"{report.merchant_id} ({name}): {problem}")
            # Exit 1: an unreachable or refused merchant is a failure, not a quiet success.
            code = EXIT_FAILURES if failed else EXIT_OK
            if args.json:
                if not document.written_out():
                    _print_queue_document(workspace.store, reports, args)
                return code
            orders = [o for o in workspace.queue(include_ineligible=args.include_ineligible)
                      if not args.merchant or o.merchant_id in args.merchant]
            stale = any(o.merchant_id not in refreshed for o in orders)
            full = args.output_format == "tsv"
            print_listing(args, [("merchant", "merchant"), ("merchant_id", None),
                                 ("order_id", "order"), ("location_id", None),
                                 ("reference_id", "ref"), ("created_at", "created"),
                                 ("total", "total"), ("eligible", "eligible"),
                                 ("reason", "reason"),
                                 *([("fetched", "fetched")] if stale else [])],
                          [(names.get(order.merchant_id, order.merchant_id), order.merchant_id,
                            order.order_id, order.location_id, order.reference_id,
                            order.created_at if full else order.created_at[:16],
                            format_money(order.total_amount, order.currency),
                            "yes" if order.eligible else "no", order.reason,
                            *([f"stale {_age(now, order.fetched_at)}"
                               if order.merchant_id not in refreshed else ""] if stale else []))
                           for order in orders])
            err(f"{sum(o.eligible for o in orders)} eligible of {len(orders)} shown.")
            if failed:
                err(f"{len(failed)} merchant(s) could not be refreshed: their orders are as last "
                    "fetched from Square; run `recon-console queue` again when it answers.")
            return code
        finally:
            await workspace.aclose()
    return _run_sending(run())


def _run_sending(main: Coroutine[Any, Any, int]) -> int:
    """`asyncio.run` on uvloop where it is installed (a dependency except on Windows): the
    stdlib loop's Python transports and scheduling cost ~65 us more client CPU per Square
    request (206 against 141 us measured), and `complete` makes one per order, `queue` four
    per merchant (issue 11)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def complete(args: argparse.Namespace, settings: ReconSettings) -> int:
    async def run() -> int:
        workspace = Workspace.open(settings)
        workspace.go_online("complete")  # other consoles list the operator as online
        try:
            await _recover_first(workspace)
            if args.batch is not None:
                return await _complete_prepared(args, workspace)
            merchants = None if args.all_merchants else args.merchant
            reports = await workspace.refresh(merchants)
            _report_merchants(reports)
            if args.order:  # a mistyped id, or another merchant's order: said, not ignored
                known = {o.order_id for o in workspace.store.queued_orders(ordered=False)
                         if merchants is None or o.merchant_id in merchants}
                for order_id in args.order:
                    if order_id not in known:
                        raise ConfigurationError(
                            f"--order {order_id}: not an open order of "
                            f"{'any merchant' if merchants is None else ', '.join(merchants)}; "
                            "see `recon-console queue --include-ineligible`.")
            preview = workspace.preview(merchants, args.order, args.max_orders)
            for line in preview_lines(preview):
                err(line)
            for order, reason in preview.held_back[:5]:
                err(f"held back: {order.order_id} ({reason})")
            if len(preview.held_back) > 5:
                err(f"held back: {len(preview.held_back) - 5} more")
            if preview.count == 0:
                err("Nothing eligible to complete.")
                _print_results(args, None, preview.sha256, [], dry_run=args.dry_run)
                return EXIT_OK
            why = workspace.needs_second_operator(preview)
            if args.dry_run:
                err(f"Dry run: {preview.count} orders would be completed; nothing was sent.")
                if why:
                    err(f"They need a second operator's approval first ({why}).")
                _print_results(args, None, preview.sha256, [
                    {"merchant_id": i.merchant_id, "order_id": i.order_id,
                     "version": i.version, "outcome": "skipped", "reason": "DRY_RUN",
                     "detail": "dry run: not sent"} for i in preview.items], dry_run=True)
                return EXIT_OK
            refused = _typed_count_refused(args.yes, preview.count, "orders", "complete them",
                                           "approve this exact preview")
            if refused is not None:
                return refused
            if why:
                # Four-eyes: the preview is kept for another operator, nothing is sent.
                approval = workspace.prepare_batch(preview)
                err(f"This batch needs a second operator ({why}): prepared as batch "
                    f"{approval.batch_id}; nothing was sent. Another operator approves it "
                    f"with `recon-console approve {approval.batch_id}`, then run "
                    f"`recon-console complete --batch {approval.batch_id}`.")
                if args.json:  # (a table of no results would only say "0 completed")
                    _print_results(args, approval.batch_id, preview.sha256, [],
                                   extra={"approval": approval_json(workspace, approval)})
                return EXIT_REFUSED
            return await _run_batch(args, workspace, preview, None)
        finally:
            await workspace.aclose()
    return _run_sending(run())


async def _complete_prepared(args: argparse.Namespace, workspace: Workspace) -> int:
    """`complete --batch BATCH_ID`: exactly the prepared set, under its approval."""
    if args.order or args.max_orders is not None:
        raise ConfigurationError("--batch runs exactly the prepared set: drop --order and "
                                 "--max-orders.")
    approval, preview = workspace.prepared_batch(args.batch)
    err(f"Batch {approval.batch_id} prepared by {approval.prepared_by} at "
        f"{approval.prepared_at}: {approval.status}"
        + (f" by {approval.decided_by}, until {approval.expires_at}"
           if approval.status == "approved" else ""))
    for line in preview_lines(preview):
        err(line)
    if args.dry_run:
        err(f"Dry run: {preview.count} orders would be completed; nothing was sent.")
        _print_results(args, approval.batch_id, preview.sha256, [
            {"merchant_id": i.merchant_id, "order_id": i.order_id, "version": i.version,
             "outcome": "skipped", "reason": "DRY_RUN", "detail": "dry run: not sent"}
            for i in preview.items], dry_run=True,
            extra={"approval": approval_json(workspace, approval)})
        return EXIT_OK
    refused = _typed_count_refused(args.yes, preview.count, "orders", "complete them",
                                   "run this approved batch")
    if refused is not None:
        return refused
    return await _run_batch(args, workspace, preview, approval.batch_id)


async def _run_batch(args: argparse.Namespace, workspace: Workspace, preview: Preview,
                     batch_id: str | None) -> int:
    cancel = asyncio.Event()
    install_cancel(asyncio.get_running_loop(), cancel)
    last = [0.0]

    def progress(event: BatchProgress) -> None:
        now = asyncio.get_running_loop().time()
        if now - last[0] < 0.5 and event.done < event.total:
            return
        last[0] = now
        eta = f"{event.eta_s:.0f}s" if event.eta_s is not None else "?"
        backoff = " (backing off: rate limited)" if event.backing_off else ""
        err(f"{event.done}/{event.total} done, {event.completed} completed, "
            f"{event.skipped} skipped, {event.failed} failed, "
            f"{event.rate_per_s:.1f}/s, ETA {eta}{backoff}")

    try:
        batch_id, results = await workspace.complete(preview, cancel=cancel,
                                                     on_progress=progress, batch_id=batch_id)
    except ApprovalRefused as error:  # the engine's four-eyes gate: nothing was sent
        err(f"refused: {error}")
        if args.json:
            _print_results(args, batch_id, preview.sha256, [],
                           extra={"refused": {"reason": error.code, "detail": error.detail}})
        return EXIT_REFUSED
    _print_results(args, batch_id, preview.sha256, [r.to_json() for r in results])
    unrecorded = sum(1 for r in results if r.reason == NOT_RECORDED)
    if unrecorded:
        err(f"{unrecorded} outcomes not recorded: run `recon-console recover`.")
    unreachable = sorted({r.merchant_id for r in results
                          if r.reason == SkipReason.SQUARE_UNREACHABLE})
    if unreachable:
        err(f"Square could not be reached for {', '.join(unreachable)}: their orders "
            "stay in the queue.")
    # Not sent because the database refused the intents (a full disk): a failure, not a
    # quiet success a script would take for a batch that ran.
    unwritable = sum(1 for r in results if r.reason == SkipReason.DATABASE_UNWRITABLE)
    if unwritable:
        err(f"{unwritable} orders not sent: the database refused a write; free space or check "
            "the database, then run `recon-console recover`.")
    _checkpoint_note(workspace)
    if cancel.is_set():
        return EXIT_CANCELLED
    return EXIT_FAILURES if unreachable or unwritable or any(
        r.outcome is Outcome.FAILED for r in results) else EXIT_OK


def approval_json(workspace: Workspace, approval: Approval, items: bool = False
                  ) -> dict[str, Any]:
    """A prepared batch as `approve --json` and `complete --json` show it: money as Square
    writes it, per merchant."""
    _, preview = workspace.prepared_batch(approval.batch_id)
    document: dict[str, Any] = {
        "batch_id": approval.batch_id, "approved_set_sha256": approval.approved_set_sha256,
        "status": approval.status, "why": approval.why, "orders": approval.orders,
        "prepared_by": approval.prepared_by, "prepared_at": approval.prepared_at,
        "decided_by": approval.decided_by, "decided_at": approval.decided_at,
        "reason": approval.reason, "expires_at": approval.expires_at,
        "merchants": [{"merchant_id": merchant_id,
                       "business_name": preview.names.get(merchant_id),
                       "orders": count,
                       "totals": [{"amount": amount, "currency": currency}
                                  for currency, amount in sorted(totals.items())]}
                      for merchant_id, count, totals in preview.per_merchant()]}
    if items:
        document["items"] = [{"merchant_id": i.merchant_id, "order_id": i.order_id,
                              "version": i.version} for i in preview.items]
    return document


def approve(args: argparse.Namespace, settings: ReconSettings) -> int:
    """`approve` lists the prepared batches; `approve BATCH_ID [--reject] --reason TEXT`
    decides one (another operator than its preparer)."""
    if args.reject and not args.reason:
        raise ConfigurationError("--reject needs --reason TEXT: say why (recorded in the "
                                 "audit).")
    workspace = Workspace.open(settings)
    try:
        if args.batch_id is None:
            if args.reject or args.reason or args.yes:
                raise ConfigurationError("--reject, --reason and --yes need a BATCH_ID.")
            batches = [approval_json(workspace, a) for a in workspace.pending_batches()]
            if args.json:
                print_json({"batches": batches})
                return EXIT_OK
            print_listing(args, [("batch_id", "batch"), ("status", "status"),
                                 ("prepared_by", "prepared by"), ("prepared_at", "at"),
                                 ("orders", "orders"), ("totals", "totals"),
                                 ("expires_at", "approval expires")],
                          [(b["batch_id"], b["status"], b["prepared_by"], b["prepared_at"],
                            b["orders"],
                            "; ".join(f"{m['business_name'] or m['merchant_id']}: "
                                      + ", ".join(format_money(t["amount"], t["currency"])
                                                  for t in m["totals"])
                                      for m in b["merchants"]),
                            b["expires_at"]) for b in batches])
            err(f"{len(batches)} prepared batch(es) pending or approved.")
            return EXIT_OK
        approval, preview = workspace.prepared_batch(args.batch_id)
        err(f"Batch {approval.batch_id} prepared by {approval.prepared_by} at "
            f"{approval.prepared_at} ({approval.why}); {approval.status}.")
        for line in preview_lines(preview):
            err(line)
        err(f"Approved set {approval.approved_set_sha256}: each order is re-checked at send "
            "time.")
        if not args.json:  # the orders themselves, as the preparer approved them
            print_listing(args, [("merchant", "merchant"), ("merchant_id", None),
                                 ("order_id", "order"), ("version", "version")],
                          [(preview.names.get(i.merchant_id, i.merchant_id), i.merchant_id,
                            i.order_id, i.version) for i in preview.items])
        approving = not args.reject
        if (approving and approval.status == "pending"
                and approval.prepared_by != workspace.operator):
            refused = _typed_count_refused(args.yes, preview.count, "orders",
                                           "approve them", "approve this exact batch")
            if refused is not None:
                return refused
        try:
            decided = workspace.decide_batch(args.batch_id, approving, args.reason)
        except ApprovalRefused as error:
            err(f"refused: {error}")
            if args.json:
                print_json({"batch_id": args.batch_id,
                            "refused": {"reason": error.code, "detail": error.detail}})
            return EXIT_REFUSED
        if args.json:
            print_json(approval_json(workspace, decided, items=True))
        elif approving:
            err(f"Approved by {decided.decided_by} until {decided.expires_at}: run "
                f"`recon-console complete --batch {decided.batch_id}`.")
        else:
            err(f"Rejected by {decided.decided_by}: nothing of it will be sent.")
        return EXIT_OK
    finally:
        asyncio.run(workspace.aclose())


def _typed_count_refused(yes: bool, count: int, noun: str, action: str, approval: str
                         ) -> int | None:
    """The CLI's confirmation: the operator types the count (or passed --yes). None when
    approved, else the exit code (2 off a terminal without --yes, 130 on a wrong count)."""
    if yes:
        return None
    if not sys.stdin.isatty():
        err(f"Confirmation needed: run in a terminal to type the count, or pass --yes to "
            f"{approval}.")
        return EXIT_USAGE
    typed = input(f"Type the number of {noun} ({count}) to {action}: ")
    if typed.strip() != str(count):
        err("Not confirmed: nothing was sent.")
        return EXIT_CANCELLED
    return None


def _print_results(args: argparse.Namespace, batch_id: str | None, sha: str,
                   results: list[dict[str, Any]], dry_run: bool = False,
                   extra: dict[str, Any] | None = None) -> None:
    summary = {o.value: sum(1 for r in results if r["outcome"] == o.value) for o in Outcome}
    if args.json:
        document: dict[str, Any] = {"batch_id": batch_id, "approved_set_sha256": sha,
                                    "results": results, "summary": summary, **(extra or {})}
        if dry_run:
            document["dry_run"] = True
        print_json(document)
        return
    full = args.output_format == "tsv"
    print_listing(args, [("merchant_id", "merchant"), ("order_id", "order"),
                         ("version", "version"),
                         ("outcome", "outcome"), ("reason", "reason"), ("detail", "detail")],
                  [(r["merchant_id"], r["order_id"], r["version"], r["outcome"], r["reason"],
                    r["detail"] if full else r["detail"][:60]) for r in results])
    err(f"completed {summary['completed']}, skipped {summary['skipped']}, "
        f"failed {summary['failed']}" + (f" (batch {batch_id})" if batch_id else ""))


def recover(args: argparse.Namespace, settings: ReconSettings) -> int:
    async def run() -> int:
        workspace = Workspace.open(settings)
        workspace.go_online("recover")
        try:
            before = workspace.open_intent_count()
            results = await workspace.recover()
            left = workspace.open_intent_count()
            held = workspace.recover_left_alone
            if args.json:
                print_json({"open_before": before, "open_after": left,
                            "results": [r.to_json() for r in results], "left_alone": held})
            else:
                settled = [r.to_json() for r in results]
                if settled:
                    print_listing(args, [("merchant_id", "merchant"), ("order_id", "order"),
                                         ("version", "version"), ("outcome", "outcome"),
                                         ("reason", "reason"), ("detail", "detail")],
                                  [(r["merchant_id"], r["order_id"], r["version"],
                                    r["outcome"], r["reason"], r["detail"]) for r in settled])
                err(f"{before} open intent(s); settled {len(results)}; {left} still open.")
            for line in held:
                err(f"left alone, another run is live: {line}")
            _checkpoint_note(workspace)
            reminders_left = _recover_reminders(workspace, settings)
            if workspace.open_intent_count(settleable_only=True):
                err("Some intents could not be settled (no credentials or Square "
                    "unreachable): run `recon-console recover` again when Square answers.")
                return EXIT_FAILURES
            return EXIT_FAILURES if reminders_left else EXIT_OK
        finally:
            await workspace.aclose()
    return _run_sending(run())


def db(args: argparse.Namespace, settings: ReconSettings) -> int:
    """`db migrate --to URL`: the SQLite file (--db) onto an empty PostgreSQL database."""
    from services.db_migrate import migrate_to_postgres
    report = migrate_to_postgres(settings, args.to)
    if args.json:
        print_json({"source": report.source, "target": report.target, "rows": report.rows,
                    "audit_entries": report.entries, "head_hash": report.head_hash,
                    "checkpoint": str(report.checkpoint) if report.checkpoint else None})
    err(report.sentence())
    return EXIT_OK


def _recover_reminders(workspace: Workspace, settings: ReconSettings) -> int:
    """Re-send reminders left in doubt (same Message-ID and bytes). Returns how many could
    not be settled now (no SMTP set up, or the server unreachable), said in one line."""
    from services.reminders import ReminderService
    from services.reminders.smtp import smtp_target_from

    probe = ReminderService.for_workspace(workspace, None)
    if not probe.open_rows():
        return 0
    try:
        service = ReminderService.for_workspace(
            workspace, smtp_target_from(settings, required=False))
        results = service.recover()
    except ReconError as error:
        left = len(probe.open_rows())
        err(f"{left} reminder(s) in doubt not settled: {error}")
        return left
    for result in results:
        err(f"  reminder {result.merchant_id}: {result.status} {result.reason or ''}")
    return 0


def audit(args: argparse.Namespace, settings: ReconSettings) -> int:
    workspace = Workspace.open(settings)
    try:
        if args.audit_command == "verify":
            report = workspace.verify(args.checkpoint)
            if args.json:
                print_json(report.to_json())
            else:
                err(report.sentence())
            return EXIT_OK if report.ok else EXIT_FAILURES
        if args.audit_command == "checkpoint":
            path = workspace.write_checkpoint(args.output, automatic=False)
            err(f"signed checkpoint written to {path}")
            return EXIT_OK
        since = _since(args.since) if args.since else None
        if args.output:
            with _output(args.output, newline="") as handle:
                count = workspace.audit.export(handle, args.format, merchant_id=args.merchant,
                                               since=since)
            err(f"{count} entries written to {args.output}")
        else:
            workspace.audit.export(sys.stdout, args.format, merchant_id=args.merchant,
                                   since=since)
        return EXIT_OK
    finally:
        asyncio.run(workspace.aclose())


def _since(text: str) -> str:
    """An RFC 3339 time with a zone, as the audit's own UTC text, so that comparing text
    compares instants (`10:30+02:00` is `08:30Z`)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(f"--since {text!r} is not an RFC 3339 time, e.g. "
                                 "2026-11-01T00:00:00Z.") from None
    if moment.tzinfo is None:
        raise ConfigurationError(f"--since {text!r} has no zone: add one, e.g. `Z` for UTC "
                                 "or `+02:00`.")
    return utc_text(moment)


def _checkpoint_note(workspace: Workspace) -> None:
    if workspace.checkpoint_problem:
        err(f"warning: {workspace.checkpoint_problem}")


@contextmanager
def _output(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """An --output file: 0600 (it holds audit data), and a one-line error if it cannot be."""
    try:
        handle = open_private(path, newline=newline)
    except OSError as error:
        raise ConfigurationError(f"cannot write {path} ({error.strerror}): check the "
                                 "--output path.") from None
    with handle:
        yield handle


__all__ = ["EXIT_CANCELLED", "approve", "audit", "complete", "consent", "queue", "recover"]


def remind(args: argparse.Namespace, settings: ReconSettings) -> int:
    """`remind [send]`, `remind history`, `remind opt-out|opt-in` (see interfaces.md)."""

    from rich.console import Console

    from console.safe_text import safe
    from services.reminders import ReminderProgress, ReminderService, SmtpTarget
    from services.reminders.smtp import smtp_target_from

    stderr = Console(stderr=True, highlight=False)
    command = args.remind_command or "send"
    sending = command == "send" and not args.dry_run
    # A missing or bad SMTP set-up is a usage error before anything is read or written.
    smtp: SmtpTarget | None = smtp_target_from(settings, required=sending) \
        if command == "send" else None

    async def run() -> int:
        workspace = Workspace.open(settings)
        try:
            service = ReminderService.for_workspace(workspace, smtp)
            if command in ("opt-out", "opt-in"):
                service.set_opt_out(args.merchant_id, command == "opt-out", args.by,
                                    args.reason)
                what = "opted out of" if command == "opt-out" else "opted in to"
                err(f"{args.merchant_id}: {what} reminders (recorded in the audit).")
                return EXIT_OK
            if command == "history":
                rows = [r for m in (args.merchant or [None]) for r in service.history(m)]
                if args.json:
                    print_json({"reminders": rows})
                    return EXIT_OK
                full = args.output_format == "tsv"
                print_listing(args, [("sent", "sent"), ("merchant", "merchant"),
                                     ("merchant_id", None), ("kind", "kind"), ("to", "to"),
                                     ("orders", "orders"), ("status", "status"),
                                     ("reason", "reason")],
                              [(str(row["settled_at"] or row["created_at"])[:None if full
                                                                            else 16],
                                row["business_name"], row["merchant_id"], row["kind"],
                                ", ".join(row["to"]), row["orders"], row["status"],
                                row["reason"]) for row in rows])
                return EXIT_OK
            if sending and service.open_rows():
                err(f"re-sending {len(service.open_rows())} reminder(s) left in doubt first…")
                for result in service.recover():
                    err(f"  {result.merchant_id}: {result.status} {result.reason or ''}")
            reports = await workspace.refresh(args.merchant)
            _report_merchants(reports)
            plans = service.plan(args.merchant)
            due = [p for p in plans if p.due]
            for plan in due:
                stderr.print(safe(f"{plan.business_name} ({plan.merchant_id}): "
                                  f"{plan.kind.value}, {len(plan.orders)} orders, to "
                                  f"{', '.join(plan.recipients)}"))
            skipped: dict[str, int] = {}
            for plan in plans:
                if not plan.due:
                    skipped[str(plan.skip)] = skipped.get(str(plan.skip), 0) + 1
            if skipped:
                err("not due: " + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())))
            if args.dry_run or not due:
                results = service.dry_run(plans)
                err(f"Dry run: {len(due)} reminder(s) would be sent; nothing was sent."
                    if args.dry_run else "No reminder is due.")
                _print_reminders(args, results)
                return EXIT_OK
            refused = _typed_count_refused(args.yes, len(due), "reminders", "send them",
                                           "send exactly these reminders")
            if refused is not None:
                return refused

            def progress(event: ReminderProgress) -> None:
                err(f"{event.done}/{event.total} done, {event.sent} sent, "
                    f"{event.deferred} deferred, {event.failed} failed")

            results = await asyncio.to_thread(service.send, plans, on_progress=progress)
            _print_reminders(args, results)
            return EXIT_FAILURES if any(r.status in ("failed", "deferred") for r in results) \
                else EXIT_OK
        finally:
            await workspace.aclose()
    return asyncio.run(run())


def _print_reminders(args: argparse.Namespace, results: list[Any]) -> None:
    if args.json:
        print_json({"reminders": [r.to_json() for r in results]})
        return
    full = args.output_format == "tsv"
    print_listing(args, [("merchant", "merchant"), ("merchant_id", None), ("kind", "kind"),
                         ("to", "to"), ("orders", "orders"), ("status", "status"),
                         ("reason", "reason")],
                  [(r.business_name if full else f"{r.business_name} ({r.merchant_id})",
                    r.merchant_id, r.kind, ", ".join(r.to) or ("" if full else "no address"),
                    r.orders, r.status, r.reason) for r in results])
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    err(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no reminders")
