"""Text written by third parties (Square's merchants, customers, consent files) on its way to a
terminal, a spreadsheet or a JSON Lines file.

- `printable(s)`: what a terminal may be sent. Control characters (C0, DEL, C1, ESC among them)
  become visible placeholders, and bidirectional overrides are named, not applied, so a name
  cannot move the cursor, wipe the screen, write the clipboard (OSC 52), hide text (SGR 8) or
  reorder what the operator reads. Everything else is kept, so the text still reads as written.
- `csv_cell(value)`: one CSV cell, safe to open in a spreadsheet (OWASP's CSV-injection
  guidance): a text cell that begins with `=`, `+`, `-`, `@`, TAB or CR gets a leading `'`, so
  it is never evaluated as a formula; numbers (money in minor units) stay numbers. CSV is read
  by people, so control characters are shown as placeholders there too.
- `json_line(document)`: one JSON Lines record that keeps every character exactly (parse it and
  you get the original back) but escapes the ones a terminal would act on.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = ["FORMULA_PREFIXES", "csv_cell", "json_inert", "json_line", "printable"]

# C0 controls (ESC, BEL, newline, tab... all of them), DEL, C1 controls (CSI U+009B, OSC
# U+009D...); the bidirectional embeddings, overrides and isolates (U+202A-U+202E,
# U+2066-U+2069) and marks (U+200E, U+200F, U+061C); line and paragraph separators, which
# some terminals treat as newlines; lone surrogates, which cannot be encoded at all.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")
# What a JSON Lines record escapes beyond what JSON requires (orjson escapes C0 already).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                          "\u2066-\u2069]")

# The same characters, UTF-8 encoded, for JSON already serialized as bytes (UTF-8 is
# self-synchronizing: these sequences only match whole characters).
_JSON_UNSAFE_BYTES = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xd8\x9c|\xe2\x80[\x8e\x8f\xa8-\xae]"
                                rb"|\xe2\x81[\xa6-\xa9]")

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _placeholder(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if code < 0x20:
        return chr(0x2400 + code)      # the Control Pictures block: ␛ for ESC, ␊ for LF
    if code == 0x7F:
        return "\u2421"                # ␡
    if 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return f"<U+{code:04X}>"           # C1 controls and bidi marks, named


def printable(text: str) -> str:
    """`text` with every control character and bidi override made visible and inert."""
    if _UNSAFE.search(text) is None:  # the common case costs one scan
        return text
    return _UNSAFE.sub(_placeholder, text)


def csv_cell(value: Any) -> Any:
    """One CSV cell: text is shown as `printable` and never starts a formula; other values
    (integers, None) are written as they are."""
    if not isinstance(value, str):
        return value
    shown = printable(value)
    return "'" + shown if value.startswith(FORMULA_PREFIXES) else shown


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_line(document: Any) -> str:
    """`document` as one line of JSON, keys sorted; parsing it gives `document` back exactly."""
    text = orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode()
    # Inside JSON strings these characters may be written as \\uXXXX; outside strings they
    # cannot occur, so the substitution never changes the structure.
    return _JSON_UNSAFE.sub(_json_escape, text)


def json_inert(data: bytes) -> bytes:
    """Serialized JSON (UTF-8) with what `json_line` escapes escaped too: same document.

    Safe on a whole document, not only on its strings: every character escaped here is DEL or
    beyond ASCII, and outside its strings JSON is ASCII punctuation, digits, literals and
    whitespace only, so a match is always inside a string, where `\\uXXXX` means the same."""
    # Plain ASCII without DEL (the common case, 55 MB of `queue --json`): two C scans, ~40x
    # faster than the regex's.
    if data.isascii() and b"\x7f" not in data:
        return data
    if _JSON_UNSAFE_BYTES.search(data) is None:
        return data
    return _JSON_UNSAFE_BYTES.sub(
        lambda m: f"\\u{ord(m.group().decode()):04x}".encode(), data)
