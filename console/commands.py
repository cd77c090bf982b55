"""The headless commands: each opens a `Workspace`, does one job, prints, returns an exit code.

`--json` documents go to stdout and nothing else does; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from console.cli import (
    EXIT_CANCELLED,
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    err,
    install_cancel,
    print_json,
    print_json_stream,
)
from services.audit import Checkpoint
from services.completion import BatchProgress, Outcome
from services.consent import ConsentStatus
from services.errors import ConfigurationError, ConsentFileError
from services.settings import ReconSettings
from services.workspace import Workspace, format_money

stderr = Console(stderr=True, highlight=False)


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
                table = Table("consent", "merchant", "status", "expires", "grantor")
                table.columns[0].no_wrap = True
                for row in rows:
                    table.add_row(str(row["consent_id"]), str(row["merchant_id"]),
                                  str(row["status"]), str(row["expires_at"] or "—"),
                                  str(row["grantor"]))
                Console().print(table)
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


def _report_merchants(reports: list[Any]) -> None:
    for report in reports:
        if report.error:
            err(f"{report.merchant_id} ({report.business_name or '?'}): {report.error}")


def _age(now: datetime, moment: str | None) -> str:
    """'45s', '12m', '2h', '3d': how long ago `moment` (RFC 3339) was."""
    if not moment:
        return "?"
    seconds = max(0, int((now - datetime.fromisoformat(moment.replace("Z", "+00:00")))
                         .total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def queue(args: argparse.Namespace, settings: ReconSettings) -> int:
    async def run() -> int:
        workspace = Workspace.open(settings)
        try:
            await _recover_first(workspace)
            reports = await workspace.refresh(args.merchant, full=args.full)
            refreshed = {r.merchant_id for r in reports if r.refreshed}
            orders = [o for o in workspace.queue(include_ineligible=args.include_ineligible)
                      if not args.merchant or o.merchant_id in args.merchant]
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
                print_json_stream("orders", (o.to_json(o.merchant_id not in refreshed)
                                             for o in orders),
                                  {"merchants": [{"merchant_id": r.merchant_id,
                                                  "business_name": r.business_name,
                                                  "token_health": r.token_health,
                                                  "error": r.error, "open_orders": r.orders,
                                                  "eligible": r.eligible,
                                                  "stale": not r.refreshed} for r in reports]})
                return code
            stale = any(o.merchant_id not in refreshed for o in orders)
            table = Table("merchant", "order", "ref", "created", "total", "eligible", "reason",
                          *(["fetched"] if stale else []))
            for order in orders:
                note = ([f"stale {_age(now, order.fetched_at)}"
                         if order.merchant_id not in refreshed else ""] if stale else [])
                table.add_row(names.get(order.merchant_id, order.merchant_id), order.order_id,
                              order.reference_id or "", order.created_at[:16],
                              format_money(order.total_amount, order.currency),
                              "yes" if order.eligible else "no", order.reason or "", *note)
            Console().print(table)
            err(f"{sum(o.eligible for o in orders)} eligible of {len(orders)} shown.")
            if failed:
                err(f"{len(failed)} merchant(s) could not be refreshed: their orders are as last "
                    "fetched from Square; run `recon-console queue` again when it answers.")
            return code
        finally:
            await workspace.aclose()
    return asyncio.run(run())


def complete(args: argparse.Namespace, settings: ReconSettings) -> int:
    async def run() -> int:
        workspace = Workspace.open(settings)
        try:
            await _recover_first(workspace)
            merchants = None if args.all_merchants else args.merchant
            reports = await workspace.refresh(merchants)
            _report_merchants(reports)
            preview = workspace.preview(merchants, args.order, args.max_orders)
            for line in preview.lines():
                err(line)
            for order, reason in preview.held_back[:5]:
                err(f"held back: {order.order_id} ({reason})")
            if len(preview.held_back) > 5:
                err(f"held back: {len(preview.held_back) - 5} more")
            if preview.count == 0:
                err("Nothing eligible to complete.")
                _print_results(args, None, preview.sha256, [], dry_run=args.dry_run)
                return EXIT_OK
            if args.dry_run:
                err(f"Dry run: {preview.count} orders would be completed; nothing was sent.")
                _print_results(args, None, preview.sha256, [
                    {"merchant_id": i.merchant_id, "order_id": i.order_id,
                     "version": i.version, "outcome": "skipped", "reason": "DRY_RUN",
                     "detail": "dry run: not sent"} for i in preview.items], dry_run=True)
                return EXIT_OK
            if not args.yes:
                if not sys.stdin.isatty():
                    err("Confirmation needed: run in a terminal to type the count, or pass "
                        "--yes to approve this exact preview.")
                    return EXIT_USAGE
                typed = input(f"Type the number of orders ({preview.count}) to complete them: ")
                if typed.strip() != str(preview.count):
                    err("Not confirmed: nothing was sent.")
                    return EXIT_CANCELLED
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

            batch_id, results = await workspace.complete(preview, cancel=cancel,
                                                         on_progress=progress)
            _print_results(args, batch_id, preview.sha256, [r.to_json() for r in results])
            if cancel.is_set():
                return EXIT_CANCELLED
            return EXIT_FAILURES if any(r.outcome is Outcome.FAILED for r in results) \
                else EXIT_OK
        finally:
            await workspace.aclose()
    return asyncio.run(run())


def _print_results(args: argparse.Namespace, batch_id: str | None, sha: str,
                   results: list[dict[str, Any]], dry_run: bool = False) -> None:
    summary = {o.value: sum(1 for r in results if r["outcome"] == o.value) for o in Outcome}
    if args.json:
        document: dict[str, Any] = {"batch_id": batch_id, "approved_set_sha256": sha,
                                    "results": results, "summary": summary}
        if dry_run:
            document["dry_run"] = True
        print_json(document)
        return
    table = Table("order", "version", "outcome", "reason", "detail")
    for r in results:
        table.add_row(r["order_id"], str(r["version"]), r["outcome"], r["reason"] or "",
                      r["detail"][:60])
    Console().print(table)
    err(f"completed {summary['completed']}, skipped {summary['skipped']}, "
        f"failed {summary['failed']}" + (f" (batch {batch_id})" if batch_id else ""))


def recover(args: argparse.Namespace, settings: ReconSettings) -> int:
    async def run() -> int:
        workspace = Workspace.open(settings)
        try:
            before = workspace.open_intent_count()
            results = await workspace.recover()
            left = workspace.open_intent_count()
            if args.json:
                print_json({"open_before": before, "open_after": left,
                            "results": [r.to_json() for r in results]})
            else:
                err(f"{before} open intent(s); settled {len(results)}; {left} still open.")
            if left:
                err("Some intents could not be settled (no credentials or Square "
                    "unreachable): run `recon-console recover` again when Square answers.")
                return EXIT_FAILURES
            return EXIT_OK
        finally:
            await workspace.aclose()
    return asyncio.run(run())


def audit(args: argparse.Namespace, settings: ReconSettings) -> int:
    workspace = Workspace.open(settings)
    try:
        if args.audit_command == "verify":
            checkpoint = None
            if args.checkpoint is not None:
                try:
                    data = json.loads(args.checkpoint.read_text())
                    checkpoint = Checkpoint(int(data["size"]), str(data["head_hash"]),
                                            str(data.get("created_at", "")))
                except (OSError, ValueError, KeyError, TypeError) as error:
                    raise ConfigurationError(
                        f"{args.checkpoint}: not a checkpoint file ({error}); make one with "
                        "`recon-console audit checkpoint`.") from None
            report = workspace.verify(checkpoint)
            if args.json:
                print_json(report.to_json())
            else:
                err(report.sentence())
            return EXIT_OK if report.ok else EXIT_FAILURES
        if args.audit_command == "checkpoint":
            document = json.dumps(workspace.audit.checkpoint().to_json(), indent=2) + "\n"
            if args.output:
                args.output.write_text(document)
                err(f"checkpoint written to {args.output}")
            else:
                sys.stdout.write(document)
            return EXIT_OK
        since = None
        if args.since:
            try:
                since = datetime.fromisoformat(args.since.replace("Z", "+00:00")).isoformat()
                since = since.replace("+00:00", "Z")
            except ValueError:
                raise ConfigurationError(f"--since {args.since!r} is not an RFC 3339 time, "
                                         "e.g. 2026-11-01T00:00:00Z.") from None
        if args.output:
            with args.output.open("w", newline="") as handle:
                count = workspace.audit.export(handle, args.format, merchant_id=args.merchant,
                                               since=since)
            err(f"{count} entries written to {args.output}")
        else:
            workspace.audit.export(sys.stdout, args.format, merchant_id=args.merchant,
                                   since=since)
        return EXIT_OK
    finally:
        asyncio.run(workspace.aclose())


__all__ = ["EXIT_CANCELLED", "audit", "complete", "consent", "queue", "recover"]
