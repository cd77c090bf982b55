"""`recon-console`: the command line (see ../shared/interfaces.md for the contract).

Exit codes: 0 done; 1 done but some orders failed (or verify found a break); 2 usage or
configuration error, one line on stderr; 130 cancelled by the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from services.errors import ConfigurationError, ReconError

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


class UsageError(Exception):
    pass


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options (each also has a RECON_* variable)")
    group.add_argument("--db", help="SQLite file (RECON_DB; default under the user data dir)")
    group.add_argument("--square-base-url", help="Square base URL (RECON_SQUARE_BASE_URL)")
    group.add_argument("--environment", choices=["production", "sandbox"],
                       help="Square environment (RECON_SQUARE_ENVIRONMENT)")
    group.add_argument("--credentials", help="credentials TOML (RECON_CREDENTIALS)")
    group.add_argument("--operator", help="who is operating (RECON_OPERATOR; default OS user)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recon-console",
                     description="Managed Reconciliation Console: complete consented, fully "
                                 "paid Square Online orders, with an audit trail.")
    _common(parser)
    parser.add_argument("--read-only", action="store_true",
                        help="the console offers no write actions at all")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    demo = sub.add_parser("demo", help="the console on the local emulator with demo data")
    _common(demo)
    demo.add_argument("--read-only", action="store_true")
    demo.add_argument("--seed", type=int, default=7)

    emulator = sub.add_parser("emulator", help="the local Square emulator")
    emulator_sub = emulator.add_subparsers(dest="emulator_command", parser_class=_Parser,
                                           required=True)
    serve = emulator_sub.add_parser("serve", help="serve the emulator on loopback")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--seed", type=int, default=7)
    serve.add_argument("--merchants", type=int, default=12)
    serve.add_argument("--locations-per-merchant", type=int, default=2)
    serve.add_argument("--orders-per-location", type=int, default=60)
    serve.add_argument("--latency-ms", type=float, default=0.0)
    serve.add_argument("--jitter-ms", type=float, default=0.0)
    serve.add_argument("--rate-limit", type=float, default=None, help="requests/s per token")
    serve.add_argument("--fault-rate", type=float, default=0.0, help="fraction answered 503")
    serve.add_argument("--manifest", type=Path, default=None)
    serve.add_argument("--kinds", default=None, metavar="KIND=W,...",
                       help="order mix, e.g. online_paid_open=9,online_unpaid=1 "
                            "(default: the realistic mix)")
    serve.add_argument("--write-demo-files", type=Path, default=None, metavar="DIR",
                       help="also write DIR/credentials.toml and DIR/consents.json for the "
                            "seeded merchants")

    consent = sub.add_parser("consent", help="import, list and revoke consent records")
    consent_sub = consent.add_subparsers(dest="consent_command", parser_class=_Parser,
                                         required=True)
    c_import = consent_sub.add_parser("import", help="validate and store consent files")
    _common(c_import)
    c_import.add_argument("files", nargs="+", type=Path)
    c_list = consent_sub.add_parser("list", help="consents and their status now")
    _common(c_list)
    c_list.add_argument("--json", action="store_true")
    c_revoke = consent_sub.add_parser("revoke", help="revoke a consent from now on; a revoked "
                                      "consent id stays revoked whatever is imported later")
    _common(c_revoke)
    which = c_revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("consent_id", nargs="?")
    which.add_argument("--all-for-merchant", metavar="MERCHANT_ID",
                       help="revoke every consent of this merchant not yet revoked")
    c_revoke.add_argument("--by", required=True)
    c_revoke.add_argument("--reason", required=True)

    queue = sub.add_parser("queue", help="discover open orders and classify them")
    _common(queue)
    queue.add_argument("--merchant", action="append")
    queue.add_argument("--include-ineligible", action="store_true")
    queue.add_argument("--full", action="store_true",
                       help="re-read every order instead of what changed since the last refresh")
    queue.add_argument("--json", action="store_true")

    complete = sub.add_parser("complete", help="bulk-complete eligible orders")
    _common(complete)
    who = complete.add_mutually_exclusive_group(required=True)
    who.add_argument("--merchant", action="append")
    who.add_argument("--all-merchants", action="store_true")
    complete.add_argument("--order", action="append")
    complete.add_argument("--dry-run", action="store_true")
    complete.add_argument("--yes", action="store_true")
    complete.add_argument("--max-orders", type=int)
    complete.add_argument("--json", action="store_true")

    recover = sub.add_parser("recover", help="settle every intent that has no outcome")
    _common(recover)
    recover.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="verify, checkpoint and export the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", parser_class=_Parser, required=True)
    verify = audit_sub.add_parser("verify", help="check the whole chain")
    _common(verify)
    verify.add_argument("--checkpoint", type=Path)
    verify.add_argument("--json", action="store_true")
    checkpoint = audit_sub.add_parser("checkpoint", help="write size and head hash")
    _common(checkpoint)
    checkpoint.add_argument("--output", type=Path)
    export = audit_sub.add_parser("export", help="export entries")
    _common(export)
    export.add_argument("--format", choices=["csv", "jsonl"], required=True)
    export.add_argument("--output", type=Path)
    export.add_argument("--merchant")
    export.add_argument("--since")
    return parser


def settings_from(args: argparse.Namespace) -> Any:
    from services.settings import ReconSettings
    overrides: dict[str, Any] = {}
    for flag, name in (("db", "db"), ("square_base_url", "square_base_url"),
                       ("environment", "square_environment"), ("credentials", "credentials"),
                       ("operator", "operator")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[name] = value
    try:
        return ReconSettings(**overrides)
    except Exception as error:
        raise ConfigurationError(f"invalid settings: {str(error).splitlines()[0]}") from None


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except UsageError as error:
        err(str(error))
        return EXIT_USAGE
    except ConfigurationError as error:
        err(f"error: {error}")
        return EXIT_USAGE
    except ReconError as error:
        err(f"error: {error}")
        return EXIT_FAILURES
    except KeyboardInterrupt:
        err("cancelled")
        return EXIT_CANCELLED
    except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command is None:
        from console.app import run_console
        return run_console(settings_from(args), read_only=args.read_only)
    if command == "demo":
        from console.app import run_demo
        return run_demo(settings_from(args), read_only=args.read_only, seed=args.seed)
    if command == "emulator":
        return _emulator_serve(args)
    from console import commands
    handler = {"consent": commands.consent, "queue": commands.queue,
               "complete": commands.complete, "recover": commands.recover,
               "audit": commands.audit}[command]
    return handler(args, settings_from(args))


def _emulator_serve(args: argparse.Namespace) -> int:
    from services.emulator import FaultPlan, SeedConfig
    from services.emulator.serve import serve
    kinds = None
    if args.kinds:
        try:
            kinds = tuple((name, int(weight)) for name, weight in
                          (part.split("=") for part in args.kinds.split(",")))
        except ValueError:
            raise ConfigurationError("--kinds takes KIND=WEIGHT pairs separated by commas, "
                                     "e.g. online_paid_open=9,online_unpaid=1") from None
    config = SeedConfig(seed=args.seed, merchants=args.merchants,
                        locations_per_merchant=args.locations_per_merchant,
                        orders_per_location=args.orders_per_location, kinds=kinds)
    faults = FaultPlan(latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                       rate_limit_rps=args.rate_limit, server_error_rate=args.fault_rate,
                       seed=args.seed)
    try:
        serve(args.host, args.port, config, faults, args.manifest,
              demo_files=args.write_demo_files)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    except OSError as error:
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port} "
                                 f"({error.strerror}): pick another --port.") from None
    return EXIT_OK


def run_async(coro: Any) -> Any:
    """Run a coroutine; the first Ctrl-C is handled by the command (cancel), not here."""
    return asyncio.run(coro)


_JSON_OPTIONS = (orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
                 | orjson.OPT_PASSTHROUGH_DATACLASS)


def print_json(document: Any) -> None:
    # orjson: `queue --json` of 100,000 orders is ~50 MB, 7x faster than json.dumps (issue 11),
    # written as bytes (no second 50 MB copy as text). Datetimes and dataclasses still go
    # through str(), as json.dumps(default=str) wrote them.
    data = orjson.dumps(document, default=str,
                        option=_JSON_OPTIONS | orjson.OPT_APPEND_NEWLINE)
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (some test harnesses)
        sys.stdout.write(data.decode())
        return
    sys.stdout.flush()
    buffer.write(data)
    buffer.flush()


def print_json_stream(key: str, items: Iterable[Any], rest: dict[str, Any],
                      chunk: int = 5000) -> None:
    """`print_json({key: list(items), **rest})`, byte for byte, written a chunk of items at a
    time: 100,000 queued orders as dicts at once cost ~150 MB (issue 11)."""
    options = _JSON_OPTIONS
    buffer = getattr(sys.stdout, "buffer", None)

    def write(data: bytes) -> None:
        if buffer is None:
            sys.stdout.write(data.decode())
        else:
            buffer.write(data)

    sys.stdout.flush()
    write(b"{\n  " + orjson.dumps(key) + b": [")
    iterator = iter(items)
    first = True
    while batch := list(itertools.islice(iterator, chunk)):
        # "[\n  {...},\n  {...}\n]" -> its items, one level deeper (strings in JSON hold
        # no raw newlines, so every newline is indentation).
        inner = orjson.dumps(batch, default=str, option=options)[2:-2]
        write((b"\n" if first else b",\n") + b"  " + inner.replace(b"\n", b"\n  "))
        first = False
    write(b"]" if first else b"\n  ]")
    for name, value in rest.items():
        write(b",\n  " + orjson.dumps(name) + b": " + orjson.dumps(
            value, default=str, option=options).replace(b"\n", b"\n  "))
    write(b"\n}\n")
    if buffer is not None:
        buffer.flush()


def install_cancel(loop: asyncio.AbstractEventLoop, cancel: asyncio.Event) -> None:
    def on_sigint() -> None:
        if cancel.is_set():
            return
        err("cancelling: no new orders will be sent; waiting for calls in flight…")
        cancel.set()
    if os.name == "posix":
        loop.add_signal_handler(signal.SIGINT, on_sigint)


if __name__ == "__main__":
    raise SystemExit(main())
