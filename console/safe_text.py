"""The one way text reaches the console's screen: as inert Rich `Text`.

Anything that is not a literal in this code (names, notes, ids and details from Square, consent
files, the audit, settings, error messages) is third-party text. Textual and Rich parse a plain
`str` as markup, so `[/]` in a merchant's name would crash a screen and `[@click=...]` would
turn it into a button; and they pass control characters through, so `\\x1b[2J` would reach the
terminal. A `SafeText` is never parsed as markup, and every string that enters one goes through
`services.text_safety.printable` (controls and bidi overrides become visible placeholders).

Screens, widgets and the CLI's tables build what they show with `safe(...)` (one value) or
`safe_join(...)` (several, each optionally styled), and never import `rich.text` themselves;
tests/test_untrusted_text.py checks that.
"""

from __future__ import annotations

from typing import Any

from rich.style import Style
from rich.text import Text

from services.text_safety import printable

__all__ = ["SafeText", "clip", "printable", "safe", "safe_join"]


def _lines(text: str) -> str:
    """`printable`, keeping line breaks: a SafeText's own "\n" lays out lines."""
    return "\n".join(printable(line) for line in text.split("\n"))


class SafeText(Text):
    """Rich `Text` whose every string is `printable` (line breaks kept), at construction and
    on `append`. A single outside value goes in as `safe(value)`, which keeps no line break."""

    def __init__(self, text: str = "", style: str | Style = "", **options: Any) -> None:
        super().__init__(_lines(text), style, **options)

    def append(self, text: str | Text, style: str | Style | None = None) -> SafeText:
        if isinstance(text, str):
            text = _lines(text)
        elif not isinstance(text, SafeText):
            text = SafeText(text.plain, text.style)
        super().append(text, style)
        return self


def safe(value: object, style: str | Style = "", **options: Any) -> SafeText:
    """One value, shown literally on one line (None shows as nothing; a newline in it is
    shown as ␊, so a name cannot add lines of its own to a dialog)."""
    text = SafeText("", style, **options)
    text.append(printable("" if value is None else str(value)))
    return text


def safe_join(*parts: object | tuple[object, str]) -> SafeText:
    """Several values in a row, each as `safe` shows it; a part may be `(value, style)`."""
    text = SafeText()
    for part in parts:
        value, style = part if isinstance(part, tuple) else (part, None)
        text.append(printable("" if value is None else str(value)), style)
    return text


def clip(value: object, width: int) -> str:
    """A value cut to `width` characters (… marks the cut), so a 10,000-character name cannot
    push a table's other columns off the screen."""
    text = printable("" if value is None else str(value))
    return text if len(text) <= width else text[:width - 1] + "…"
