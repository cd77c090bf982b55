"""Issue 12, items 8 and 9: output you can pipe (full values off a terminal, --format
table|tsv|json), help on every option with the exit codes, `audit export` JSON Lines by
default, and the README's example consents that fit the README's emulator."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from console.cli import EXIT_CODES_EPILOG, build_parser, main
from services.demo import write_demo_files
from services.emulator import SeedConfig
from tests.conftest import DATA, LoopbackServer, make_emulator
from tools.example_consents import EXAMPLES, example_documents, readme_merchants

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Longer than any 80-column table leaves for a column: cut, a script loses it.
LONG_MERCHANT = "MERCHANT_" + "X" * 50
LONG_GRANTOR = "Dana Whitfield-" + "Longname " * 12 + "the Third"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECON_") or name in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("RECON_DB", str(tmp_path / "recon.db"))
    monkeypatch.setenv("RECON_OPERATOR", "cli-output-test")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tsv(out: str) -> list[dict[str, str]]:
    header, *lines = out.rstrip("\n").split("\n")
    keys = header.split("\t")
    rows = [dict(zip(keys, line.split("\t"), strict=True)) for line in lines]
    return rows


@pytest.fixture
def long_consents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """Two consents whose merchant id and grantor do not fit in 80 columns, one grantor with
    a tab and a newline in it."""
    documents = []
    for index, grantor in enumerate((LONG_GRANTOR, "Tab\there\nand a new line")):
        document = json.loads((DATA / "consent" / "valid" / "minimal.json").read_text())
        document["consent_id"] = f"1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5{index}"
        document["merchant_id"] = f"{LONG_MERCHANT}{index}"
        document["grantor"]["name"] = grantor
        documents.append(document)
    (tmp_path / "long.json").write_text(json.dumps(documents))
    code, _, err = run(capsys, "consent", "import", str(tmp_path / "long.json"))
    assert code == 0, err
    return documents


# ---------------------------------------------------------------- item 8: output you can pipe
def test_piped_consent_list_keeps_every_id_and_name_in_full(
        long_consents: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal (capsys is not one) the default is tsv: one line per consent, nothing
    cut, so the ids can be fed to `--merchant` and `consent revoke`."""
    code, out, _ = run(capsys, "consent", "list")
    assert code == 0
    assert "…" not in out and "─" not in out and "━" not in out   # not a Rich table
    rows = tsv(out)
    assert [(r["consent_id"], r["merchant_id"], r["status"]) for r in rows] == [
        (d["consent_id"], d["merchant_id"], "active") for d in long_consents]
    assert rows[0]["grantor"] == LONG_GRANTOR
    # Outside text stays on its own line and inert: tab and newline are shown, not acted on.
    assert rows[1]["grantor"] == "Tab␉here␊and a new line"
    assert len(out.splitlines()) == 1 + len(long_consents)
    assert rows[0]["effective_from"].startswith("2026-11-01T00:00:00")
    assert rows[0]["expires_at"] == "" and rows[0]["revoked_at"] == ""


def test_format_choices_and_json_alias(long_consents: list[dict[str, Any]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _, as_json, _ = run(capsys, "consent", "list", "--json")
    _, as_format_json, _ = run(capsys, "consent", "list", "--format", "json")
    assert as_json == as_format_json
    consents = json.loads(as_json)["consents"]
    assert {c["merchant_id"] for c in consents} == {d["merchant_id"] for d in long_consents}

    _, explicit_tsv, _ = run(capsys, "consent", "list", "--format", "tsv")
    _, default, _ = run(capsys, "consent", "list")
    assert explicit_tsv == default

    # A table asked for off a terminal is not cut to 80 columns either.
    code, table, _ = run(capsys, "consent", "list", "--format", "table")
    assert code == 0 and "─" in table
    flat = table.replace("\n", "")
    for document in long_consents:
        assert document["consent_id"] in flat and document["merchant_id"] in flat
    assert LONG_GRANTOR in table   # one line, not wrapped

    code, out, err = run(capsys, "consent", "list", "--json", "--format", "tsv")
    assert code == 2 and out == "" and "--json and --format tsv" in err
    assert len(err.strip().splitlines()) == 1


def test_on_a_terminal_the_default_is_a_table(long_consents: list[dict[str, Any]],
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")   # how a caller tells Rich "this is a terminal"
    code, out, _ = run(capsys, "consent", "list")
    assert code == 0 and "consent" in out and "─" in out and "\t" not in out


@pytest.mark.loopback
def test_queue_complete_recover_and_history_pipe_full_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    emulator = make_emulator(SeedConfig(merchants=2, orders_per_location=6))
    write_demo_files(tmp_path, emulator.merchants)
    with LoopbackServer(emulator) as server:
        monkeypatch.setenv("RECON_SQUARE_BASE_URL", server.base_url)
        monkeypatch.setenv("RECON_CREDENTIALS", str(tmp_path / "credentials.toml"))
        assert run(capsys, "consent", "import", str(tmp_path / "consents.json"))[0] == 0

        code, out, _ = run(capsys, "queue", "--include-ineligible", "--format", "json")
        assert code == 0
        orders = json.loads(out)["orders"]
        code, out, _ = run(capsys, "queue", "--include-ineligible")
        assert code == 0
        rows = tsv(out)
        assert [(r["merchant_id"], r["order_id"], r["location_id"]) for r in rows] == [
            (o["merchant_id"], o["order_id"], o["location_id"]) for o in orders]
        assert {r["created_at"] for r in rows} == {o["created_at"] for o in orders}
        assert {r["eligible"] for r in rows} == {"yes", "no"}

        merchant = emulator.merchants[0].merchant.id
        code, out, _ = run(capsys, "complete", "--merchant", merchant, "--dry-run")
        assert code == 0
        planned = tsv(out)
        assert planned and {r["merchant_id"] for r in planned} == {merchant}
        assert {r["reason"] for r in planned} == {"DRY_RUN"}
        code, out, _ = run(capsys, "complete", "--merchant", merchant, "--yes")
        assert code == 0
        done = tsv(out)
        assert list(done[0]) == ["merchant_id", "order_id", "version", "outcome", "reason",
                                 "detail"]
        assert {r["order_id"] for r in done} == {r["order_id"] for r in planned}
        assert {r["outcome"] for r in done} == {"completed"}

        code, out, err = run(capsys, "recover")
        assert code == 0 and out == "" and "0 open intent(s)" in err   # nothing to list
        code, out, _ = run(capsys, "recover", "--format", "json")
        assert json.loads(out)["results"] == []

        code, out, _ = run(capsys, "remind", "history", "--format", "tsv")
        assert code == 0 and out.split("\n")[0].split("\t") == [
            "sent", "merchant", "merchant_id", "kind", "to", "orders", "status", "reason"]


# ---------------------------------------------------------------- item 8: help and exit codes
def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def test_every_option_of_every_parser_has_help_and_every_help_ends_with_exit_codes() -> None:
    parsers = list(_parsers(build_parser()))
    progs = {p.prog for p in parsers}
    assert {"recon-console", "recon-console consent list", "recon-console queue",
            "recon-console audit export", "recon-console remind history",
            "recon-console emulator serve"} <= progs
    missing = [f"{p.prog} {action.option_strings or action.dest}"
               for p in parsers for action in p._actions
               if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert missing == []
    for parser in parsers:
        text = parser.format_help()
        assert text.rstrip().endswith(EXIT_CODES_EPILOG.rstrip()), parser.prog
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"^  {code} +\S", EXIT_CODES_EPILOG, re.M)


def test_help_prints_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["consent", "list", "--help"], ["audit", "export", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes:" in out and "130  cancelled by the operator" in out
        assert out.index("exit codes:") > out.index("options")


def test_every_listing_command_takes_format() -> None:
    listing = {"consent list", "queue", "complete", "recover", "remind", "remind send",
               "remind history"}
    for parser in _parsers(build_parser()):
        command = parser.prog.removeprefix("recon-console").strip()
        flags = {flag for action in parser._actions for flag in action.option_strings}
        if command in listing:
            assert {"--format", "--json"} <= flags, command
            listing.discard(command)
    assert listing == set()


# ---------------------------------------------------------------- item 8: audit export default
def test_audit_export_without_format_writes_json_lines(
        long_consents: list[dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "export")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert records and {r["merchant_id"] for r in records} >= {
        d["merchant_id"] for d in long_consents}
    code, _, err = run(capsys, "audit", "export", "--output", str(tmp_path / "a.jsonl"))
    assert code == 0 and "written to" in err
    assert (tmp_path / "a.jsonl").read_text() == out
    code, out, err = run(capsys, "audit", "export", "--format", "xml")
    assert code == 2 and "jsonl" in err and "csv" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- item 9: the README's examples
def test_example_consents_fit_the_readmes_emulator_and_validate() -> None:
    """The merchant ids come from the seed and the counts of the README's `emulator serve`
    command: regenerate them from that command and compare with the shipped files."""
    merchants = readme_merchants()
    expected = example_documents(merchants)
    shipped = {path.name: json.loads(path.read_text())
               for path in sorted(EXAMPLES.glob("*.json"))}
    assert shipped == expected, "run `python -m tools.example_consents` and commit"
    seeded = {m.merchant.id: m for m in merchants}
    schema = json.loads((ROOT / "consent.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for name, document in shipped.items():
        errors = [error.message for error in validator.iter_errors(document)]
        assert errors == [], name
        assert document["merchant_id"] in seeded, name
    assert README.count("examples/consents/*.json") >= 1


@pytest.mark.loopback
def test_example_consents_import_cleanly_for_the_readmes_emulator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """What a newcomer types: the example files import without a warning against the
    credentials that `--write-demo-files` writes for the README's emulator, and are active."""
    merchants = readme_merchants()
    write_demo_files(tmp_path, merchants)
    monkeypatch.setenv("RECON_CREDENTIALS", str(tmp_path / "credentials.toml"))
    files = [str(path) for path in sorted(EXAMPLES.glob("*.json"))]
    code, _, err = run(capsys, "consent", "import", *files)
    assert code == 0 and "warning" not in err, err
    code, out, _ = run(capsys, "consent", "list")
    assert {r["status"] for r in tsv(out)} == {"active"}
    assert len(tsv(out)) == len(files)


def test_readme_walkthrough_is_the_newcomers() -> None:
    walkthrough = README[README.index("### Trying it against the emulator"):]
    assert "DIR=$(mktemp -d)" in walkthrough and "/tmp/emu" not in README
    assert "RECON_OPERATOR=" in walkthrough
    assert "kill $EMU" in walkthrough
    assert re.search(r"^\.venv/bin/recon-console +# the console", walkthrough, re.M)
    assert "manifest" in walkthrough and "access token" in walkthrough
    glossary = README[README.index("## Glossary"):]
    for term in ("Candidate", "Blocked", "Manual only", "Held back", "Approved set",
                 "Next sync", "sparkline", "Checkpoint", "Recover", "Lease"):
        assert term in glossary, term
    assert "Mutation score" in README and "docs/mutation.md" in README


def test_an_empty_operator_is_refused(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`RECON_OPERATOR="$USER"` where $USER is unset (a container, tmux as root) must not
    record every action under no one."""
    monkeypatch.setenv("RECON_OPERATOR", "")
    code, out, err = run(capsys, "consent", "list")
    assert code == 2 and out == "" and "operator is empty" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.delenv("RECON_OPERATOR")
    code, _, err = run(capsys, "--operator", " ", "consent", "list")
    assert code == 2 and "RECON_OPERATOR or --operator" in err


@pytest.mark.loopback
def test_emulator_serve_says_where_and_how_to_stop_it(tmp_path: Path) -> None:
    """Started with `&` as the README does, it says one line on stderr, not nothing."""
    import subprocess
    import sys
    import time
    manifest = tmp_path / "manifest.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "emulator", "serve", "--port", "0",
         "--merchants", "1", "--orders-per-location", "1", "--manifest", str(manifest)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not manifest.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    line = err.strip().splitlines()[0]
    assert line.startswith("emulator: 1 merchant (seed 7) on 127.0.0.1")
    assert f"manifest {manifest}" in line and f"kill {process.pid}" in line
    assert json.loads(manifest.read_text())["base_url"].startswith("http://127.0.0.1:")


def test_complete_takes_several_ids_after_one_option_as_interfaces_md_says() -> None:
    """`complete (--merchant ID... | --all-merchants) [--order ID...]`: both spellings work."""
    from console.cli import build_parser, merge_global_options
    args = merge_global_options(build_parser().parse_args(
        ["complete", "--merchant", "M1", "M2", "--order", "A", "B", "--order", "C",
         "--dry-run"]))
    assert args.merchant == ["M1", "M2"] and args.order == ["A", "B", "C"]
    args = merge_global_options(build_parser().parse_args(
        ["complete", "--merchant", "M1", "--merchant", "M2", "--dry-run"]))
    assert args.merchant == ["M1", "M2"]


@pytest.mark.parametrize(("isatty", "typed", "code"), [
    (False, None, 2), (True, "4", 130), (True, " 3 ", None), (False, "yes-flag", None)])
def test_the_typed_count_approves_only_the_exact_count(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], isatty: bool,
        typed: str | None, code: int | None) -> None:
    """`complete` and `remind` share one confirmation: off a terminal it needs --yes (exit 2);
    a wrong count sends nothing (130); the exact count, or --yes, approves."""
    from console.commands import _typed_count_refused
    monkeypatch.setattr("sys.stdin.isatty", lambda: isatty)
    monkeypatch.setattr("builtins.input", lambda prompt: typed)
    yes = typed == "yes-flag"
    assert _typed_count_refused(yes, 3, "orders", "complete them", "approve it") == code
    if code == 2:
        assert "--yes" in capsys.readouterr().err
