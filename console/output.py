"""What every command writes: exit codes, one-line messages on stderr, JSON on stdout, and the
Ctrl-C that cancels. Its own module so the command line and the commands both use it without
importing each other."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from services.text_safety import json_inert

__all__ = ["EXIT_CANCELLED", "EXIT_FAILURES", "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE",
           "OBJECTS_SEPARATOR", "err", "install_cancel", "print_json", "print_json_objects",
           "print_json_stream"]

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
# Four-eyes: nothing was sent, because the batch needs (or lacks) a second operator's approval.
EXIT_REFUSED = 3


def err(message: str) -> None:
    # Messages carry names, ids and Square's error text: no escape reaches the terminal.
    from services.text_safety import printable
    print(printable(message), file=sys.stderr, flush=True)


_JSON_OPTIONS = (orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
                 | orjson.OPT_PASSTHROUGH_DATACLASS)


def print_json(document: Any) -> None:
    # orjson: `queue --json` of 100,000 orders is ~50 MB, 7x faster than json.dumps (issue 11),
    # written as bytes (no second 50 MB copy as text). Datetimes and dataclasses still go
    # through str(), as json.dumps(default=str) wrote them.
    # Outside text's C1 controls and bidi overrides: escaped, as the audit's JSON Lines are.
    data = json_inert(orjson.dumps(document, default=str,
                                   option=_JSON_OPTIONS | orjson.OPT_APPEND_NEWLINE))
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (some test harnesses)
        sys.stdout.write(data.decode())
        return
    sys.stdout.flush()
    buffer.write(data)
    buffer.flush()


def _print_document(key: str, blocks: Iterable[bytes], rest: dict[str, Any]) -> None:
    """`{key: [...], **rest}` as `print_json` lays it out, the list written a block at a time
    (each block: some of its items, already indented and comma-joined), each write escaped."""
    buffer = getattr(sys.stdout, "buffer", None)

    def write(data: bytes) -> None:
        data = json_inert(data)
        if buffer is None:
            sys.stdout.write(data.decode())
        else:
            buffer.write(data)

    sys.stdout.flush()
    write(b"{\n  " + orjson.dumps(key) + b": [")
    first = True
    for block in blocks:
        if block:
            write((b"\n" if first else b",\n") + block)
            first = False
    write(b"]" if first else b"\n  ]")
    for name, value in rest.items():
        write(b",\n  " + orjson.dumps(name) + b": " + orjson.dumps(
            value, default=str, option=_JSON_OPTIONS).replace(b"\n", b"\n  "))
    write(b"\n}\n")
    if buffer is not None:
        buffer.flush()


def print_json_stream(key: str, items: Iterable[Any], rest: dict[str, Any],
                      chunk: int = 5000) -> None:
    """`print_json({key: list(items), **rest})`, byte for byte, written a chunk of items at a
    time: 100,000 queued orders as dicts at once cost ~150 MB (issue 11)."""
    def blocks() -> Iterator[bytes]:
        iterator = iter(items)
        while batch := list(itertools.islice(iterator, chunk)):
            # "[\n  {...},\n  {...}\n]" -> its items, one level deeper (strings in JSON hold
            # no raw newlines, so every newline is indentation).
            inner = orjson.dumps(batch, default=str, option=_JSON_OPTIONS)[2:-2]
            yield b"  " + inner.replace(b"\n", b"\n  ")
    _print_document(key, blocks(), rest)


# Between two items of `print_json_objects`' list: a store may join them so itself.
OBJECTS_SEPARATOR = ",\n    "


def print_json_objects(key: str, chunks: Iterable[Sequence[bytes]], rest: dict[str, Any]
                       ) -> None:
    """`print_json({key: [...], **rest})` for items that are JSON objects already (UTF-8), as
    the store writes `queue --json`'s orders: one per line, a chunk at a time, with no
    object per item in Python (issue 11). The same document as `print_json` (parsed), with
    the same escaping of what a terminal would act on."""
    separator = OBJECTS_SEPARATOR.encode()
    _print_document(key, (b"    " + separator.join(chunk) for chunk in chunks if chunk), rest)


def install_cancel(loop: asyncio.AbstractEventLoop, cancel: asyncio.Event) -> None:
    def on_sigint() -> None:
        if cancel.is_set():
            return
        err("cancelling: no new orders will be sent; waiting for calls in flight…")
        cancel.set()
    if os.name == "posix":
        loop.add_signal_handler(signal.SIGINT, on_sigint)
