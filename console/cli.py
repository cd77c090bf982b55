"""`recon-console`: the command line (see ../shared/interfaces.md for the contract).

Exit codes: 0 done; 1 done but some orders failed (or verify found a break); 2 usage or
configuration error, one line on stderr; 130 cancelled by the operator.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from console.output import (
    EXIT_CANCELLED,
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    err,
)
from services.errors import ApprovalRefused, ConfigurationError, ReconError


class UsageError(Exception):
    pass


# Global options: every parser (the top level and each subcommand, nested ones included)
# accepts them, each under a dest of its own with no default, so a value given before the
# subcommand is never overwritten by the subcommand's default (argparse copies a subparser's
# namespace over its parent's). `merge_global_options` then joins them, refusing two
# different values.
GLOBAL_OPTIONS = ("db", "square_base_url", "environment", "credentials", "operator",
                  "checkpoint_dir", "read_only")
_SCOPED = "global:"
# Commands that talk to Square print their target on stderr first. Extend when adding one.
TALKS_TO_SQUARE = {None, "queue", "complete", "recover", "remind", "approve"}


class _Once(argparse.Action):
    """Store a value; the same option twice with two different values is a usage error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None)
        if before is not None and before != values:
            parser.error(f"{option_string} is given twice, {_shown(before)!r} and "
                         f"{_shown(values)!r}: give it once")
        setattr(namespace, self.dest, values)


def _common(parser: argparse.ArgumentParser) -> None:
    if any("--db" in action.option_strings for action in parser._actions):
        return  # every _Parser has them already; kept so callers may still ask for them
    group = parser.add_argument_group(
        "global options (before or after the subcommand; each also has a RECON_* variable)")

    def scoped(name: str) -> dict[str, Any]:
        return {"dest": f"{_SCOPED}{name}@{parser.prog}", "default": argparse.SUPPRESS}

    group.add_argument("--db", action=_Once, metavar="PATH|URL", **scoped("db"),
                       help="SQLite file, or a postgresql:// URL without a password (RECON_DB; "
                            "default: a file under the user data dir)")
    group.add_argument("--square-base-url", action=_Once, metavar="URL",
                       **scoped("square_base_url"),
                       help="Square base URL: https, or http to loopback "
                            "(RECON_SQUARE_BASE_URL)")
    group.add_argument("--environment", action=_Once, choices=["production", "sandbox"],
                       **scoped("environment"),
                       help="Square environment (RECON_SQUARE_ENVIRONMENT)")
    group.add_argument("--credentials", action=_Once, metavar="PATH",
                       **scoped("credentials"),
                       help="credentials TOML (RECON_CREDENTIALS)")
    group.add_argument("--operator", action=_Once, metavar="NAME", **scoped("operator"),
                       help="who is operating (RECON_OPERATOR; default OS user)")
    group.add_argument("--checkpoint-dir", action=_Once, metavar="DIR",
                       **scoped("checkpoint_dir"),
                       help="signed audit checkpoints (RECON_CHECKPOINT_DIR; default: "
                            "checkpoints/ beside the credentials)")
    group.add_argument("--read-only", action="store_true", **scoped("read_only"),
                       help="the console (or demo) offers no write actions at all")


def _shown(value: Any) -> Any:
    """A value as an error may repeat it: a database URL without any password in it."""
    from services.database_url import display_url, is_database_url
    return display_url(value) if is_database_url(value) else value


def _said_within(limit: int) -> Callable[[str], str]:
    """_said, no longer than the consent record holds (services/consent.py: Revocation):
    a longer one failed the record's validation, a traceback with the consent still active."""
    def said(value: str) -> str:
        if len(value) > limit:
            raise argparse.ArgumentTypeError(f"is {len(value):,} characters: at most {limit:,} "
                                             "fit the consent record; shorten it")
        return _said(value)
    return said


def _said(value: str) -> str:
    """--by/--reason go into the audit: a blank one would record a revocation by nobody."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is blank: say who asked and why")
    return value


def _place(prog: str) -> str:
    _, _, command = prog.partition(" ")
    return f"after `{command}`" if command else "before the subcommand"


def merge_global_options(args: argparse.Namespace) -> argparse.Namespace:
    """Join each global option given before and/or after the subcommand into `args.NAME`."""
    found: dict[str, list[tuple[str, Any]]] = {name: [] for name in GLOBAL_OPTIONS}
    for key, value in list(vars(args).items()):
        if key.startswith(_SCOPED):
            name, _, prog = key[len(_SCOPED):].partition("@")
            found[name].append((prog, value))
            delattr(args, key)
    for name, given in found.items():
        values = {value for _, value in given}
        if len(values) > 1:
            flag = "--" + name.replace("_", "-")
            where = " and ".join(f"{_shown(value)!r} ({_place(prog)})" for prog, value in given)
            raise UsageError(f"recon-console: {flag} is given twice with different values, "
                             f"{where}: give it once, before or after the subcommand")
        setattr(args, name, given[0][1] if given else (False if name == "read_only" else None))
    return args


# Every parser's --help ends with these (scripts branch on them; interfaces.md has the contract).
EXIT_CODES_EPILOG = """exit codes:
  0    done
  1    done, but some orders failed, a merchant could not be reached, some outcomes could
       not be recorded (run `recon-console recover`), or `audit verify` found a break
  2    usage or configuration error (one line on stderr says what is wrong and what to do)
  3    nothing sent: the batch needs, or lacks, a second operator's approval (four-eyes),
       or `approve` refused the decision (your own batch, already decided)
  130  cancelled by the operator"""

# Listings: a table on a terminal; off one (a pipe, a file) tab-separated lines with every
# value in full, since a table cut to 80 columns loses the ids that --merchant and revoke need.
OUTPUT_FORMATS = ("table", "tsv", "json")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES_EPILOG)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        _common(self)  # every subcommand, however nested, takes the global options

    def error(self, message: str) -> Any:  # one line, exit 2
        # A mistyped option is what is wrong, whatever argparse noticed first: it said
        # "one of the arguments --merchant --all-merchants --batch is required" for
        # `complete --merchnat X`, or "unrecognized arguments" without the command.
        typo = _unknown_option(*_parsing) if _parsing is not None else None
        if typo is not None:
            raise UsageError(typo)
        raise UsageError(f"{self.prog}: {message} (see --help)")


# What `main` is parsing (its parser, the words), for `_Parser.error`: argparse hands it
# only a message.
_parsing: tuple[argparse.ArgumentParser, list[str]] | None = None


def _command_parser(parser: argparse.ArgumentParser, words: Sequence[str]
                    ) -> argparse.ArgumentParser:
    """The innermost (sub)command parser the words name (`consent revoke`: revoke's)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for index, word in enumerate(words):
                if word in action.choices:
                    return _command_parser(action.choices[word], words[index + 1:])
    return parser


def _unknown_option(parser: argparse.ArgumentParser, words: Sequence[str]) -> str | None:
    """"`recon-console complete`: no option --merchnat (did you mean --merchant?)" for the
    first long option the command does not know (nor abbreviates, as argparse allows)."""
    if not words:
        return None
    command = _command_parser(parser, words)
    known = [option for option in command._option_string_actions if option.startswith("--")]
    for word in words:
        if word == "--":
            break
        option = word.split("=", 1)[0]
        if not option.startswith("--") or any(k.startswith(option) for k in known):
            continue
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return (f"{command.prog}: no option {option}{hint}; "
                f"`{command.prog} --help` lists them")
    return None


def _at_least_one(text: str) -> int:
    # A negative N sliced the candidates to "all but the last N": a limit must never grow.
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _listing(parser: argparse.ArgumentParser) -> None:
    """--format table|tsv|json, and --json (the contract's spelling of --format json)."""
    parser.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS,
                        help="table (the default on a terminal), tsv (the default off one: "
                             "a header line, then one line per row, values in full, tabs and "
                             "newlines in them shown as ␉ ␊), or json")
    parser.add_argument("--json", action="store_true",
                        help="one JSON document on stdout (the same as --format json)")


def resolve_output_format(args: argparse.Namespace) -> None:
    """Set `args.output_format` (table on a terminal, tsv off it) and `args.json` to match."""
    if not hasattr(args, "output_format"):
        return
    if args.json and args.output_format not in (None, "json"):
        raise UsageError(f"recon-console: --json and --format {args.output_format} disagree: "
                         "give one of them")
    chosen = "json" if args.json else args.output_format
    if chosen is None:
        # Rich's own test: a tty, or TTY_COMPATIBLE=1 / FORCE_COLOR set by whoever runs us.
        from rich.console import Console
        chosen = "table" if Console().is_terminal else "tsv"
    args.output_format, args.json = chosen, chosen == "json"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recon-console",
                     description="Managed Reconciliation Console: complete consented, fully "
                                 "paid Square Online orders, with an audit trail.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    demo = sub.add_parser("demo", help="the console on the local emulator with demo data")
    demo.add_argument("--seed", type=int, default=7,
                      help="seed of the emulator's merchants and orders (default: 7)")
    demo.add_argument("--team", action="store_true",
                      help="on a throwaway local PostgreSQL cluster, and print the command "
                           "that opens a second console on it as another operator")

    emulator = sub.add_parser("emulator", help="the local Square emulator")
    emulator_sub = emulator.add_subparsers(dest="emulator_command", parser_class=_Parser,
                                           required=True)
    serve = emulator_sub.add_parser("serve", help="serve the emulator on loopback")
    serve.add_argument("--host", default="127.0.0.1",
                       help="loopback address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765,
                       help="port to listen on; 0 picks a free one (default: 8765)")
    serve.add_argument("--seed", type=int, default=7,
                       help="seed of the merchants and orders; with the counts below it "
                            "decides the merchant ids (default: 7)")
    serve.add_argument("--merchants", type=int, default=12,
                       help="how many merchants (default: 12)")
    serve.add_argument("--locations-per-merchant", type=int, default=2,
                       help="active locations per merchant (default: 2)")
    serve.add_argument("--orders-per-location", type=int, default=60,
                       help="orders seeded per location (default: 60)")
    serve.add_argument("--latency-ms", type=float, default=0.0,
                       help="added to every answer, in milliseconds (default: 0)")
    serve.add_argument("--jitter-ms", type=float, default=0.0,
                       help="random extra latency up to this, in milliseconds (default: 0)")
    serve.add_argument("--rate-limit", type=float, default=None,
                       help="requests/s per token before 429 (default: no limit)")
    serve.add_argument("--fault-rate", type=float, default=0.0,
                       help="fraction of requests answered 503 (default: 0)")
    serve.add_argument("--manifest", type=Path, default=None, metavar="PATH",
                       help="write the base URL and each merchant's id, token and locations "
                            "here (JSON, owner-only) once listening")
    serve.add_argument("--kinds", default=None, metavar="KIND=W,...",
                       help="order mix, e.g. online_paid_open=9,online_unpaid=1 "
                            "(default: the realistic mix)")
    serve.add_argument("--write-demo-files", type=Path, default=None, metavar="DIR",
                       help="also write DIR/credentials.toml and DIR/consents.json for the "
                            "seeded merchants")
    serve.add_argument("--steering", action="store_true",
                       help="enable the /_emulator/ routes that steer faults, tokens and versions")
    serve.add_argument("--strict", action="store_true",
                       help="the strictest reading of Square's unconfirmed rules (see "
                            "services/emulator/app.py)")

    consent = sub.add_parser("consent", help="import, list and revoke consent records")
    consent_sub = consent.add_subparsers(dest="consent_command", parser_class=_Parser,
                                         required=True)
    c_import = consent_sub.add_parser("import", help="validate and store consent files")
    _common(c_import)
    c_import.add_argument("files", nargs="+", type=Path, metavar="FILE",
                          help="JSON file holding one consent record or an array of them "
                               "(consent.schema.json); all or nothing")
    c_list = consent_sub.add_parser("list", help="consents and their status now")
    _common(c_list)
    _listing(c_list)
    c_revoke = consent_sub.add_parser("revoke", help="revoke a consent from now on; a revoked "
                                      "consent id stays revoked whatever is imported later")
    _common(c_revoke)
    which = c_revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("consent_id", nargs="?", metavar="CONSENT_ID",
                       help="the consent to revoke (see `consent list`)")
    which.add_argument("--all-for-merchant", metavar="MERCHANT_ID",
                       help="revoke every consent of this merchant not yet revoked")
    c_revoke.add_argument("--by", required=True, type=_said_within(200), metavar="NAME",
                          help="who asked for the revocation (recorded in the audit)")
    c_revoke.add_argument("--reason", required=True, type=_said_within(1000), metavar="TEXT",
                          help="why (recorded in the audit)")

    queue = sub.add_parser("queue", help="discover open orders and classify them")
    _common(queue)
    queue.add_argument("--merchant", action="append", metavar="MERCHANT_ID",
                       help="only this merchant (repeatable; default: all)")
    queue.add_argument("--include-ineligible", action="store_true",
                       help="also list the open orders that are not eligible, with the reason")
    queue.add_argument("--full", action="store_true",
                       help="re-read every order instead of what changed since the last refresh")
    _listing(queue)

    complete = sub.add_parser("complete", help="bulk-complete eligible orders")
    _common(complete)
    who = complete.add_mutually_exclusive_group(required=True)
    who.add_argument("--merchant", action="extend", nargs="+", metavar="MERCHANT_ID",
                     help="complete these merchants' eligible orders (several ids, or "
                          "repeat the option)")
    who.add_argument("--all-merchants", action="store_true",
                     help="complete the eligible orders of every merchant")
    who.add_argument("--batch", metavar="BATCH_ID",
                     help="run a prepared batch that another operator approved (four-eyes)")
    complete.add_argument("--order", action="extend", nargs="+", metavar="ORDER_ID",
                          help="only these orders (several ids, or repeat the option)")
    complete.add_argument("--dry-run", action="store_true",
                          help="show what would be completed; send nothing")
    complete.add_argument("--yes", action="store_true",
                          help="approve the preview without typing the count (for scripts)")
    complete.add_argument("--max-orders", type=_at_least_one, metavar="N",
                          help="complete at most N orders in this batch")
    _listing(complete)

    approve = sub.add_parser(
        "approve", help="four-eyes: list prepared batches, or approve or reject one",
        description="A batch over the four-eyes threshold (RECON_FOUR_EYES_ORDERS, "
                    "RECON_FOUR_EYES_AMOUNT) is prepared by one operator and approved or "
                    "rejected here by another; the approval is good for "
                    "RECON_APPROVAL_TTL_MINUTES and one run (`complete --batch BATCH_ID`).")
    _common(approve)
    approve.add_argument("batch_id", nargs="?", metavar="BATCH_ID",
                         help="the prepared batch (without it: list the pending ones)")
    approve.add_argument("--reject", action="store_true", help="reject it (needs --reason)")
    approve.add_argument("--reason", type=_said, metavar="TEXT",
                         help="why (recorded in the audit; required with --reject)")
    approve.add_argument("--yes", action="store_true",
                         help="approve without typing the count (for scripts)")
    _listing(approve)

    recover = sub.add_parser("recover", help="settle every intent that has no outcome")
    _common(recover)
    _listing(recover)

    # `remind` alone sends (as `remind send` does); history, opt-out and opt-in are
    # sub-commands. Options go after the last command word they belong to.
    remind = sub.add_parser("remind", help="friendly reminders to merchants (send, history, "
                                           "opt-out, opt-in)")
    remind_sub = remind.add_subparsers(dest="remind_command", parser_class=_Parser)
    for parser_ in (remind, remind_sub.add_parser("send", help="send the reminders that are "
                                                               "due (the default)")):
        _common(parser_)
        parser_.add_argument("--merchant", action="append", metavar="MERCHANT_ID",
                             help="only this merchant (repeatable)")
        parser_.add_argument("--dry-run", action="store_true",
                             help="show who is due and why the others are not; send nothing")
        parser_.add_argument("--yes", action="store_true",
                             help="send without typing the count (for scripts)")
        _listing(parser_)
    r_history = remind_sub.add_parser("history", help="reminders sent, deferred and failed")
    _common(r_history)
    r_history.add_argument("--merchant", action="append", metavar="MERCHANT_ID",
                           help="only this merchant (repeatable)")
    _listing(r_history)
    for name, what in (("opt-out", "stop reminders for a merchant"),
                       ("opt-in", "resume reminders for a merchant")):
        r_opt = remind_sub.add_parser(name, help=what)
        _common(r_opt)
        r_opt.add_argument("merchant_id", metavar="MERCHANT_ID", help="the merchant")
        r_opt.add_argument("--by", required=True, type=_said, metavar="NAME",
                           help="who asked (recorded in the audit)")
        r_opt.add_argument("--reason", required=True, type=_said, metavar="TEXT",
                           help="why (recorded in the audit)")

    database = sub.add_parser("db", help="move a SQLite database onto PostgreSQL (team mode)")
    db_sub = database.add_subparsers(dest="db_command", parser_class=_Parser, required=True)
    migrate = db_sub.add_parser(
        "migrate", help="copy the SQLite database (--db) into an empty PostgreSQL one: "
                        "consents, revocations, merchants, batches, intents, reminders and "
                        "the audit chain (verified before and after); refused while "
                        "intents are open (run `recover` first)")
    _common(migrate)
    migrate.add_argument("--to", required=True, metavar="URL",
                         help="postgresql://USER@HOST/DATABASE, without a password (that comes "
                              "from [database] password in the credentials file, or ~/.pgpass)")
    migrate.add_argument("--json", action="store_true",
                         help="the report as one JSON document on stdout")

    audit = sub.add_parser("audit", help="verify, checkpoint and export the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", parser_class=_Parser, required=True)
    verify = audit_sub.add_parser("verify", help="check the whole chain against the latest "
                                                 "signed checkpoint")
    _common(verify)
    verify.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="check against this signed checkpoint instead of the latest")
    verify.add_argument("--json", action="store_true",
                        help="the report as one JSON document on stdout (default: one "
                             "sentence on stderr)")
    checkpoint = audit_sub.add_parser("checkpoint", help="write a signed size and head hash")
    _common(checkpoint)
    checkpoint.add_argument("--output", type=Path, metavar="FILE",
                            help="write it here (default: into the checkpoint directory)")
    export = audit_sub.add_parser("export", help="export entries")
    _common(export)
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl",
                        help="jsonl: one JSON object a line, every character kept (the "
                             "default); csv: cells never start a formula")
    export.add_argument("--output", type=Path, metavar="FILE",
                        help="write to this file, owner-only (default: stdout)")
    export.add_argument("--merchant", metavar="MERCHANT_ID",
                        help="only this merchant's entries")
    export.add_argument("--since", metavar="TIME",
                        help="only entries at or after this RFC 3339 time with a zone, e.g. "
                             "2026-11-01T00:00:00Z")
    return parser


def settings_from(args: argparse.Namespace) -> Any:
    from services.settings import ReconSettings
    overrides: dict[str, Any] = {}
    for flag, name in (("db", "db"), ("square_base_url", "square_base_url"),
                       ("environment", "square_environment"), ("credentials", "credentials"),
                       ("operator", "operator"), ("checkpoint_dir", "checkpoint_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[name] = value
    try:
        settings = ReconSettings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigurationError(f"invalid settings: {where + ': ' if where else ''}{message}"
                                 ) from None
    except Exception as error:
        raise ConfigurationError(f"invalid settings: {str(error).splitlines()[0]}") from None
    from services.database_url import is_database_url, provide_password
    if is_database_url(settings.db):  # its password, if the credentials file holds one
        provide_password(settings.db, settings.credentials)
    return settings


def _refuse_misplaced_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A subcommand's own option written before the subcommand (`recon-console --json queue`)
    is said to be one, with where it goes; argparse would call it unrecognized, or take its
    value for the subcommand's name ("invalid choice: 'json'")."""
    commands: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands = dict(action.choices)
    words = list(argv)
    named = [index for index, word in enumerate(words) if word in commands]
    if not named:
        return
    command = words[named[0]]

    def knows(sub: argparse.ArgumentParser, option: str) -> bool:
        if option in sub._option_string_actions:
            return True
        return any(knows(nested, option) for action in sub._actions
                   if isinstance(action, argparse._SubParsersAction)
                   for nested in action.choices.values())
    for word in words[:named[0]]:
        option = word.split("=", 1)[0]
        if option.startswith("-") and option not in parser._option_string_actions \
                and knows(commands[command], option):
            raise UsageError(f"recon-console: {option} is an option of `{command}`, not of "
                             f"recon-console itself: write it after the subcommand, as in "
                             f"`recon-console {command} {option} ...`")


def main(argv: Sequence[str] | None = None) -> int:
    global _parsing
    try:
        parser = build_parser()
        words = list(sys.argv[1:] if argv is None else argv)
        _refuse_misplaced_option(parser, words)
        _parsing = (parser, words)
        args = merge_global_options(parser.parse_args(words))
        resolve_output_format(args)
        return _dispatch(args)
    except UsageError as error:
        err(str(error))
        return EXIT_USAGE
    except ConfigurationError as error:
        err(f"error: {error}")
        return EXIT_USAGE
    except ApprovalRefused as error:
        err(f"refused: {error}")
        return EXIT_REFUSED
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
    except Exception as error:
        from services.store import database_errors
        if not isinstance(error, database_errors()):
            raise
        # A full disk, a lost server: what was written is durable, the rest was rolled back.
        err(f"error: the database refused: {str(error).splitlines()[0] if str(error) else ''}"
            f" ({type(error).__name__}); free space or check the database, then run "
            "`recon-console recover` before anything else.")
        return EXIT_FAILURES


# Commands that only read what earlier ones recorded: on a --db file that does not exist they
# would make a new, empty one and report on it ("Audit chain verified: 0 entries" for a
# mistyped path, exit 0), so they refuse instead.
READS_ONLY = {("audit", "verify"), ("audit", "export"), ("audit", "checkpoint"),
              ("consent", "list"), ("remind", "history"), ("approve", None)}


def _command_name(args: argparse.Namespace) -> str:
    """The command as typed, nested word included: "audit verify", "queue"."""
    return " ".join(part for part in (args.command, getattr(
        args, f"{args.command}_command", None)) if part)


def _refuse_missing_database(args: argparse.Namespace, settings: Any) -> None:
    from services.database_url import is_database_url
    if (args.command, getattr(args, f"{args.command}_command", None)) not in READS_ONLY \
            or is_database_url(settings.db):
        return
    from services.settings import default_db_path
    path = Path(settings.db).expanduser()
    # (The default location is never mistyped: there a first read finds an empty database.)
    if not path.exists() and path != default_db_path():
        raise ConfigurationError(
            f"no database at {str(path)!r}: `{_command_name(args)}` only reads what was "
            "recorded there. "
            "Check the --db / RECON_DB path (a database is made by the commands that record: "
            "`consent import`, `queue`, the console).")


def _refuse_unused(args: argparse.Namespace, unused: Sequence[str], why: str) -> None:
    """A global option a command has no use for is refused, never silently dropped."""
    for name in unused:
        if getattr(args, name):
            raise UsageError(f"recon-console: `{_command_name(args)}` does not use "
                             f"--{name.replace('_', '-')}: {why}")


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "emulator":
        _refuse_unused(args, GLOBAL_OPTIONS, "it serves its own seeded data; drop the option.")
        return _emulator_serve(args)
    if command == "demo":
        _refuse_unused(args, ("db", "square_base_url", "environment", "credentials",
                              "checkpoint_dir"),
                       "the demo always runs on the in-process emulator with a fresh "
                       "temporary database; drop the option.")
    elif command is not None:
        _refuse_unused(args, ("read_only",), "only the console (`recon-console --read-only` "
                       "or `recon-console demo --read-only`) has a read-only mode.")
    settings = settings_from(args)
    if command == "demo" and args.team:
        err("Square: local emulator (team demo, on loopback)")
        from console.app import run_team_demo
        return run_team_demo(settings, read_only=args.read_only, seed=args.seed)
    if command == "demo":
        err("Square: local emulator (demo, in-process)")
        from console.app import run_demo
        return run_demo(settings, read_only=args.read_only, seed=args.seed)
    if command in TALKS_TO_SQUARE:
        err(f"Square: {settings.target}")  # before anything else: which Square, always
    from services.database_url import display_url, is_database_url
    if is_database_url(settings.db):  # a team database: say which one (never its password)
        err(f"Database: {display_url(settings.db)}")
    if command is None:
        from console.app import run_console
        return run_console(settings, read_only=args.read_only)
    _refuse_missing_database(args, settings)
    from console import commands
    handler = {"consent": commands.consent, "queue": commands.queue,
               "complete": commands.complete, "recover": commands.recover,
               "audit": commands.audit, "remind": commands.remind,
               "db": commands.db, "approve": commands.approve}[command]
    return handler(args, settings)


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
    if not 0 <= args.port <= 65535:  # bind() would raise OverflowError: a traceback
        raise ConfigurationError(f"--port {args.port}: not a port number (0 to 65535)")
    try:
        faults = FaultPlan(latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
                           rate_limit_rps=args.rate_limit, server_error_rate=args.fault_rate,
                           seed=args.seed)
    except ValidationError as error:  # a value out of range: say which flag, no traceback
        first = error.errors()[0]
        flag = {"latency_ms": "--latency-ms", "jitter_ms": "--jitter-ms",
                "rate_limit_rps": "--rate-limit", "server_error_rate": "--fault-rate"
                }.get(str(first["loc"][0]), str(first["loc"][0]))
        raise ConfigurationError(f"{flag} {first['input']}: {first['msg'].lower()}") from None
    # A newcomer starting it with `&` otherwise sees nothing: say where, and how to stop it.
    where = f"port {args.port}" if args.port else "a free port (its base_url: the manifest)"
    err(f"emulator: {args.merchants} merchant{'s' if args.merchants != 1 else ''} "
        f"(seed {args.seed}) on {args.host}, {where}"
        f"{f'; manifest {args.manifest}' if args.manifest else ''}; stop it with Ctrl-C "
        f"or `kill {os.getpid()}`")
    try:
        on_seeded = None
        if args.write_demo_files is not None:
            from services.demo import write_demo_files
            directory = args.write_demo_files

            def on_seeded(merchants: list[Any]) -> None:
                write_demo_files(directory, merchants)
        serve(args.host, args.port, config, faults, args.manifest, on_seeded=on_seeded,
              steering=args.steering, strict=args.strict)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    except OSError as error:
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port} "
                                 f"({error.strerror}): pick another --port.") from None
    return EXIT_OK


def run() -> None:
    """The `recon-console` program (`python -m console.cli` too): `main`, then exit. What
    the command made is frozen first (gc.freeze), so the interpreter's exit frees it without
    its final full collections: ~0.1-0.2 s of CPU at the end of every command, once the
    command is over (measured 2026-12-02, issue 11). Not in `main`, which tests call
    in-process."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
